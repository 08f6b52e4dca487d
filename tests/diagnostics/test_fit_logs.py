"""What the monitor puts into fit's logs: by default one scalar per monitored layer, nothing
duplicated from ClippingStats, and a verbose=1 progress line of a two-layer model of about 200
characters (read from what fit prints); every scalar still in monitor.scalars, and
log_scalars="all" puts them all into the logs."""

import re

import keras
import numpy as np
import pytest

import keras_fancyrnn as fr

T, D = 12, 3


def _two_layer_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((T, D))
    h = fr.LSTM(8, return_sequences=True, name="lstm")(inp)
    h = fr.GRU(8, name="gru")(h)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(fr.ClippingOptimizer(keras.optimizers.Adam(1e-3), threshold=1.0), "mse")
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, T, D)).astype("float32"), rng.normal(size=(32, 1)).astype(
        "float32")


def _fit(capsys, **monitor_kwargs):
    model = _two_layer_model()
    x, y = _data()
    monitor = fr.GradientNormMonitor((x[:8], y[:8]), every_n_batches=2, **monitor_kwargs)
    capsys.readouterr()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=1,
                        callbacks=[monitor, fr.ClippingStats()])
    printed = capsys.readouterr().out
    return monitor, history.history, printed


def _progress_lines(printed):
    """The progress bar's lines as the terminal shows them: the text after the last carriage
    return of each line, without ANSI escapes."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", printed)
    return [line.split("\r")[-1] for line in plain.split("\n") if " - loss:" in line]


def test_default_logs_one_scalar_per_layer_and_a_short_progress_line(capsys):
    monitor, history, printed = _fit(capsys)
    added = {k for k in history if k.startswith(("lstm", "gru"))}
    assert added == {"lstm/grad_ratio", "gru/grad_ratio"}
    assert not any(k.startswith("clip/") for k in history)  # ClippingStats logs grad_norm once
    assert "grad_norm" in history and "clip_rate" in history
    lines = _progress_lines(printed)
    assert lines and all("lstm/grad_ratio" in line for line in lines)
    # about 200: ClippingStats's own four statistics take 98 characters, and the step time's
    # width varies with the machine's load
    assert max(len(line) for line in lines) <= 205, max(lines, key=len)
    without = _progress_lines(_fit(capsys, log_scalars=False)[2])
    assert max(len(line) for line in lines) - max(len(line) for line in without) < 60
    # everything else is kept by the monitor: per series, and the clip stats
    for key in ("lstm/cell/grad_ratio", "lstm/input/grad_decay", "gru/input/grad_ratio",
                "clip/grad_norm", "clip/clip_rate"):
        assert key in monitor.scalars
    np.testing.assert_array_equal(history["gru/grad_ratio"][-1], monitor.scalars[
        "gru/grad_ratio"][-1])


@pytest.mark.parametrize("mode,expect", [("all", True), (False, False)])
def test_all_or_nothing(capsys, mode, expect):
    monitor, history, _ = _fit(capsys, log_scalars=mode)
    logged = {k for k in history if k in monitor.scalars}
    assert logged == (set(monitor.scalars) if expect else set())


def test_log_scalars_is_checked():
    with pytest.raises(ValueError, match="log_scalars"):
        fr.GradientNormMonitor((np.zeros((1, T, D)), np.zeros((1, 1))), log_scalars="some")
