"""The diagnosis (keras_fancyrnn.diagnostics.findings) on the three runs the issue names, and its
rules on curves built by hand.

Runs (small, seconds): the adding problem (keras_fancyrnn.datasets) at T = 40, where a tanh
SimpleRNN does not learn within the run and an LSTM does (its test loss falls far below the
baseline 1/6, checked here, so "trained" is measured, not assumed); and the large-init tanh RNN of
examples/exploding_gradients.py (U ~ N(0, 2.5² / units)) with a ClippingOptimizer at threshold 1.
"""

import logging
import math

import keras
import numpy as np
import pytest

import keras_fancyrnn as fr
from keras_fancyrnn.diagnostics import findings

T_ADD = 40


def _adding_run(make_layer, epochs):
    x, y = fr.datasets.adding_problem(2048 + 32, T_ADD, seed=0)
    y = y[:, None]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((T_ADD, 2)), make_layer(), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    monitor = fr.GradientNormMonitor((x[:32], y[:32]), every_n_batches=16, input_norms=False)
    history = model.fit(x[32:], y[32:], batch_size=64, epochs=epochs, verbose=0,
                        callbacks=[monitor])
    return monitor, history.history["loss"][-1]


def test_adding_problem_tanh_rnn_vanishes_and_a_trained_lstm_does_not(caplog):
    with caplog.at_level(logging.WARNING, logger="keras_fancyrnn.diagnostics"):
        tanh, tanh_loss = _adding_run(lambda: fr.SimpleRNN(16, name="rnn"), epochs=6)
    found = tanh.summary()
    assert tanh_loss > 0.1  # not learnt (baseline 1/6)
    vanishing = [f for f in found if f.kind == "vanishing"]
    assert [f.series for f in vanishing] == ["rnn"]
    f = vanishing[0]
    assert f.evidence["grad_ratio"] < findings.VANISHING_RATIO
    assert f.evidence["timesteps"] == T_ADD
    assert any("fr.LSTM or fr.GRU" in r for r in f.remedies)
    assert any("activation='relu'" in r and "Identity()" in r for r in f.remedies)
    assert f.text.startswith("rnn: vanishing gradients") and str(f) == f.text
    # fit logged it once, when it first appeared, though every later record still shows it
    logged = [r.getMessage() for r in caplog.records if "rnn: vanishing" in r.getMessage()]
    assert len(logged) == 1

    lstm, lstm_loss = _adding_run(lambda: fr.LSTM(16, name="rnn"), epochs=20)
    assert lstm_loss < 0.1 * (1 / 6)  # trained: a tenth of the baseline
    assert not [f for f in lstm.summary() if f.series == "rnn"]
    # at initialisation the same LSTM's gradient does vanish; the remedy names ChronoBias(T)
    first = findings.diagnose({"rnn": lstm.history["rnn"][:1]},
                              {k: v[:1] for k, v in lstm.scalars.items()}, lstm.steps[:1],
                              {"rnn": lstm.model.get_layer("rnn")})
    assert [f.kind for f in first] == ["vanishing"]
    assert any(f"ChronoBias({T_ADD})" in r for r in first[0].remedies)


@pytest.mark.all_backends
def test_large_init_rnn_of_the_exploding_example_is_flagged_exploding():
    length, units, gain = 30, 32, 2.5  # examples/exploding_gradients.py's defaults
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (256, length, 1)).astype("float32")
    y = x[:, -5:, 0].sum(1, keepdims=True)
    keras.utils.set_random_seed(0)
    init = keras.initializers.RandomNormal(stddev=gain / math.sqrt(units), seed=0)
    model = keras.Sequential([keras.Input((length, 1)),
                              keras.layers.SimpleRNN(units, recurrent_initializer=init),
                              keras.layers.Dense(1)])
    model.compile(fr.ClippingOptimizer(keras.optimizers.SGD(0.1), threshold=1.0), "mse")
    monitor = fr.GradientNormMonitor((x[:32], y[:32]), every_n_batches=4)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[monitor])
    found = monitor.summary()
    curve = [f for f in found if f.kind == "exploding" and f.series != "clip"]
    clip = [f for f in found if f.series == "clip"]
    assert curve and curve[0].evidence["grad_ratio"] > findings.EXPLODING_RATIO
    assert clip and clip[0].evidence["clip_rate"] > findings.HIGH_CLIP_RATE
    assert clip[0].evidence["clip_factor"] > findings.CLIP_FACTOR
    # the threshold offered is the median of the recorded pre-clip global norms
    norms = monitor.scalars["clip/grad_norm"]
    want = np.median(norms[np.isfinite(norms)])
    assert f"threshold={want:.3g}" in clip[0].remedies[0]
    assert not [f for f in found if f.kind == "vanishing"]


def _record(curves, scalars):
    n = len(next(iter(curves.values())))
    return curves, scalars, np.arange(n)


@pytest.mark.all_backends
def test_rules_on_hand_made_curves():
    """Curves g_t = exp(rate * t) over T = 50 steps: ratio exp(-49 rate). The per-record scalars are
    those the monitor computes (ratio_first_last, decay_rate of the same curve)."""
    t = np.arange(50)

    def run(rate, extra=None):
        curve = np.exp(rate * t)[None].repeat(3, 0)
        scalars = {"r/grad_ratio": np.full(3, fr.diagnostics.ratio_first_last(curve[0])),
                   "r/grad_decay": np.full(3, fr.diagnostics.decay_rate(curve[0]))}
        scalars.update(extra or {})
        return findings.diagnose({"r": curve}, scalars, [0, 10, 20])

    flat = run(0.01)  # ratio 0.61
    assert flat == []
    vanishing = run(0.2)  # ratio exp(-9.8) = 5.5e-5
    assert [f.kind for f in vanishing] == ["vanishing"]
    # falls below 1e-2 of its last value at exp(-0.2 k) < 1e-2: k = 24 steps back
    assert vanishing[0].evidence["reach"] == 24 and vanishing[0].step == 20
    growing = run(-0.2)
    assert [f.kind for f in growing] == ["exploding"]
    assert any("bptt_truncate=24" in r for r in growing[0].remedies)
    skipped = run(0.01, {"clip/skipped_steps": np.array([0, 0, 2.0]),
                         "clip/clip_rate": np.array([0.1, 0.2, 0.2]),
                         "clip/grad_norm": np.array([1.0, 3.0, 500.0])})
    assert [(f.kind, f.series) for f in skipped] == [("exploding", "clip")]
    assert skipped[0].evidence == {"skipped_steps": 2, "norm_growth": 500.0}
    assert "threshold=3" in skipped[0].remedies[0]
    assert findings.diagnose({}, {}, []) == []
    # most steps clipped, but by little: a low threshold, not an explosion
    mild = run(0.01, {"clip/clip_rate": np.array([0.9, 0.9, 0.9]),
                      "clip/grad_norm": np.array([3.0, 3.0, 3.0]),
                      "clip/clipped_grad_norm": np.array([1.0, 1.0, 1.0])})
    assert mild == []
    strong = run(0.01, {"clip/clip_rate": np.array([0.9, 0.9, 0.9]),
                        "clip/grad_norm": np.array([30.0, 40.0, 50.0]),
                        "clip/clipped_grad_norm": np.array([1.0, 1.0, 1.0])})
    assert strong[0].evidence == {"clip_rate": 0.9, "clip_factor": 40.0}
    early = run(0.01, {"clip/clip_rate": np.array([1.0, 1.0, 1.0]),
                       "clip/grad_norm": np.array([30.0, 40.0, 50.0]),
                       "clip/clipped_grad_norm": np.array([1.0, 1.0, 1.0]),
                       "clip/applied_steps": np.array([1.0, 2.0, 3.0])})
    assert early == []  # three steps are too few to call a clip rate
    # a step whose clipped norm is 0 (a zero or skipped gradient) has no clip factor
    zero = run(0.01, {"clip/clip_rate": np.array([0.9, 0.9, 0.9]),
                      "clip/grad_norm": np.array([0.0, 40.0, 50.0]),
                      "clip/clipped_grad_norm": np.array([0.0, 1.0, 1.0])})
    assert zero[0].evidence == {"clip_rate": 0.9, "clip_factor": 45.0}


@pytest.mark.all_backends
def test_a_finding_as_dict_is_plain_data():
    f = findings.Finding("vanishing", "rnn", 3, {"grad_ratio": 1e-5}, ("use an LSTM",), "text")
    assert f.as_dict() == {"kind": "vanishing", "series": "rnn", "step": 3,
                           "evidence": {"grad_ratio": 1e-5}, "remedies": ["use an LSTM"],
                           "text": "text"}


@pytest.mark.all_backends
def test_summary_is_empty_before_a_record():
    monitor = fr.GradientNormMonitor((np.zeros((2, 3, 1)), np.zeros((2, 1))))
    assert monitor.summary() == []


@pytest.mark.all_backends
@pytest.mark.parametrize("bad", [{"grad_norm": "x"}, [1.0]])
def test_clip_stats_must_be_a_mapping_of_numbers(bad):
    from keras_fancyrnn.diagnostics.series import clip_scalars

    with pytest.raises(ValueError, match="clip_stats"):
        clip_scalars(bad)


def test_the_custom_loop_example_in_the_monitor_docstring_runs():
    """The class docstring's example (a tf.GradientTape loop with record(step, clip_stats=...))
    runs as written and prints what it shows."""
    import doctest

    finder = doctest.DocTestFinder(recurse=False)
    (test,) = finder.find(fr.GradientNormMonitor, "GradientNormMonitor", globs={})
    assert len(test.examples) > 10
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test)
    assert result.failed == 0 and result.attempted == len(test.examples)


def _numpy_tanh_states(x, W, U, b, mask=None):
    """h_t = tanh(x_t W + h_{t-1} U + b) in float64; a masked step keeps the previous state."""
    n, steps, _ = x.shape
    mask = np.ones((n, steps), bool) if mask is None else mask
    h, out = np.zeros((n, U.shape[0])), []
    for t in range(steps):
        new = np.tanh(x[:, t] @ W + h @ U + b)
        h = np.where(mask[:, t, None], new, h)
        out.append(h)
    return np.stack(out, 1)


@pytest.mark.all_backends
@pytest.mark.parametrize("rnn_class", [fr.SimpleRNN, keras.layers.SimpleRNN])
@pytest.mark.parametrize("scale,saturated", [(0.3, False), (30.0, True)])
@pytest.mark.parametrize("padded", [False, True])
def test_saturation_of_a_tanh_rnn_against_numpy_states(scale, saturated, padded, rnn_class):
    """The scalar rnn/saturation is the fraction of units with |h_t| > 0.99 over the valid steps,
    from a numpy forward pass of the same weights; large inputs saturate the units and are
    flagged, small ones are not; Keras's own SimpleRNN alike (through the probe model)."""
    from keras_fancyrnn.diagnostics.probe_pass import SATURATED

    steps, d, units = 12, 3, 8
    rng = np.random.default_rng(0)
    x = (scale * rng.normal(size=(16, steps, d))).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    mask = None
    keras.utils.set_random_seed(0)
    inp = keras.Input((steps, d))
    seq = keras.layers.Masking(0.0)(inp) if padded else inp
    layer = rnn_class(units, name="rnn", go_backwards=padded)
    model = keras.Model(inp, keras.layers.Dense(1)(layer(seq)))
    model.compile(loss="mse")
    if padded:
        mask = np.arange(steps)[None] < rng.integers(2, steps + 1, 16)[:, None]
        x = np.where(mask[..., None], x, 0.0).astype("float32")
    monitor = fr.GradientNormMonitor((x, y), every_n_batches=1)
    monitor.set_model(model)
    monitor.record(0)
    W, U, b = (v.numpy().astype(np.float64) for v in
               (layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias))
    xs = x[:, ::-1] if padded else x  # go_backwards: the layer reads the sequence reversed
    states = _numpy_tanh_states(xs.astype(np.float64), W, U, b,
                                None if mask is None else mask[:, ::-1])
    valid = np.ones(states.shape[:2], bool) if mask is None else mask[:, ::-1]
    want = (np.abs(states[valid]) > SATURATED).mean()
    got = monitor.scalars["rnn/saturation"][0]
    # a unit within float32 rounding of 0.99 may fall either way: one in B * T * H
    assert abs(got - want) <= 2.0 / states[valid].size
    found = [f for f in monitor.summary() if f.kind == "saturated"]
    assert bool(found) == saturated
    if saturated:
        assert want > findings.SATURATED_FRACTION and found[0].series == "rnn"
        assert f"{want:.0%}" in found[0].text or f"{got:.0%}" in found[0].text
    assert "rnn/saturation" not in monitor.history  # a scalar, not a curve


@pytest.mark.all_backends
def test_a_vanishing_finding_without_a_reach_in_the_latest_curve_says_nothing_of_it():
    """The per-example ratio can flag a curve whose mean never leaves the band (no reach)."""
    found = findings.diagnose({"r": np.full((1, 10), 0.5)},
                              {"r/grad_ratio": np.array([0.005]), "r/grad_decay": np.array([0.5])},
                              [0])
    assert [f.kind for f in found] == ["vanishing"]
    assert found[0].evidence["reach"] is None
    assert "None" not in found[0].text and "steps back of" not in found[0].text
