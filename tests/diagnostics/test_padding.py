"""Variable-length sequences: a padded batch against each example run alone, unpadded.

The reference for example ``i`` of length ``L_i`` is the monitor's curve of a batch holding only
``x[i, :L_i]`` (no padding, no mask; that curve is checked against a numpy BPTT and hand-unrolled
cells in test_monitor.py). The padded batch's curve at ``t`` must be the mean of the references
of the examples longer than ``t`` (``align="time"``), or of the references shifted to end at
``T - 1`` (``align="end"``); the counts are the number of such examples; the derived scalars are
the per-example ratios and rates of the references, aggregated (geometric mean, mean)."""

import math

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_fancyrnn as fr
from keras_fancyrnn import diagnostics as mon
from keras_fancyrnn.diagnostics import GradientNormMonitor, gradient_norms
from keras_fancyrnn.diagnostics.aggregate import per_example_scalars
from keras_fancyrnn.diagnostics.series import decay_rate, ratio_first_last

pytestmark = pytest.mark.all_backends

T, D, H = 6, 3, 4
LENGTHS = [3, 6, 2, 5]
RTOL = 1e-5  # float32 rounding of the same arithmetic in a different batch


def _masked_model(recurrent, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, D))
    h = recurrent()(keras.layers.Masking(0.0)(inp))
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(h))
    model.compile(loss="mse")
    return model


def _padded(rng, lengths=LENGTHS):
    x = np.zeros((len(lengths), T, D), "float32")
    for i, n in enumerate(lengths):
        x[i, :n] = rng.normal(0, 1, (n, D)) + 3.0  # never all zero: Masking keeps every step
    y = rng.normal(0, 1, (len(lengths), 1)).astype("float32")
    return x, y


def _alone(model, x, y, lengths=LENGTHS):
    return [gradient_norms(model, x[i:i + 1, :n], y[i:i + 1]) for i, n in enumerate(lengths)]


def _expected(alone, key, lengths, align):
    rows = np.full((len(lengths), T), np.nan)
    for i, n in enumerate(lengths):
        start = 0 if align == "time" else T - n
        rows[i, start:start + n] = alone[i][key]
    count = np.isfinite(rows).sum(0)
    return np.nanmean(rows, 0), count


@pytest.mark.parametrize("align", ["time", "end"])
@pytest.mark.parametrize("recurrent", [
    lambda: fr.GRU(H, name="rnn"),
    lambda: fr.Bidirectional(fr.LSTM(H), name="rnn"),
    lambda: keras.layers.LSTM(H, name="rnn"),  # Keras's own layer: its /input series
], ids=["fr.GRU", "fr.Bidirectional", "keras.LSTM"])
def test_padded_batch_equals_examples_alone(rng, recurrent, align):
    model = _masked_model(recurrent)
    x, y = _padded(rng)
    alone = _alone(model, x, y)
    whole = gradient_norms(model, x, y, align=align)
    series = [k for k in alone[0] if not k.endswith("/count")]
    assert series and all(k in whole for k in series)
    counted = set()
    for key in series:
        want, count = _expected(alone, key, LENGTHS, align)
        np.testing.assert_allclose(whole[key], want, rtol=RTOL)
        owner = key.rsplit("/", 1)[0] if key.endswith(("/input", "/cell")) else key
        np.testing.assert_array_equal(whole[f"{owner}/count"], count)
        counted.add(f"{owner}/count")
    assert set(whole) == set(series) | counted


def test_two_lengths_the_short_example_does_not_halve_the_curve(rng):
    """The issue's case: lengths 3 and 6; at t = 3..5 the curve is the long example's own."""
    model = _masked_model(lambda: fr.SimpleRNN(H, name="rnn"))
    x, y = _padded(rng, [3, 6])
    long_alone = gradient_norms(model, x[1:], y[1:])["rnn"]
    whole = gradient_norms(model, x, y)
    np.testing.assert_allclose(whole["rnn"][3:], long_alone[3:], rtol=RTOL)
    assert whole["rnn/count"].tolist() == [2, 2, 2, 1, 1, 1]


def test_a_step_no_example_reaches_is_nan_and_scalars_are_per_example(rng):
    model = _masked_model(lambda: fr.LSTM(H, name="rnn"))
    lengths = [2, 4, 3]
    x, y = _padded(rng, lengths)  # no example reaches t = 4, 5
    alone = _alone(model, x, y, lengths)
    monitor = GradientNormMonitor((x, y), every_n_batches=1)
    monitor.set_model(model)
    monitor.record(0)
    assert np.all(np.isnan(monitor.history["rnn"][0, 4:]))
    assert monitor.history["rnn/count"][0].tolist() == [3, 3, 2, 1, 0, 0]
    for key in ("rnn", "rnn/cell", "rnn/input"):
        ratios = [mon.ratio_first_last(a[key]) for a in alone]
        rates = [mon.decay_rate(a[key]) for a in alone]
        assert monitor.scalars[f"{key}/grad_ratio"][0] == pytest.approx(
            math.exp(np.mean(np.log(ratios))), rel=1e-4)
        assert monitor.scalars[f"{key}/grad_decay"][0] == pytest.approx(np.mean(rates), rel=1e-4)
    assert "rnn/count/grad_ratio" not in monitor.scalars


def test_mask_zero_embedding_aligned_at_the_end(rng):
    """Post-padded token ids with an Embedding(mask_zero=True): the mask the model computes."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((None,), dtype="int32")
    h = fr.GRU(H, name="rnn")(keras.layers.Embedding(7, D, mask_zero=True)(inp))
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(loss="mse")
    lengths = [2, 6, 4]
    ids = np.zeros((3, T), "int32")
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, 7, n)
    y = rng.normal(0, 1, (3, 1)).astype("float32")
    alone = [gradient_norms(model, ids[i:i + 1, :n], y[i:i + 1]) for i, n in enumerate(lengths)]
    whole = gradient_norms(model, ids, y, align="end")
    want, count = _expected(alone, "rnn", lengths, "end")
    np.testing.assert_allclose(whole["rnn"], want, rtol=RTOL)
    assert whole["rnn/count"].tolist() == count.tolist() == [1, 1, 2, 2, 3, 3]


def test_align_is_checked():
    with pytest.raises(ValueError, match="align"):
        GradientNormMonitor((np.zeros((1, T, D)), np.zeros((1, 1))), align="start")


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_per_example_scalars_equal_the_per_curve_definitions(batch, steps, seed):
    """All rows at once against ``series.ratio_first_last`` / ``decay_rate`` of each example's
    curve (masked steps as zeros), aggregated by hand: geometric mean, mean."""
    r = np.random.default_rng(seed)
    norms = np.exp(r.normal(0, 3, (batch, steps)))
    norms[r.random((batch, steps)) < 0.2] = 0.0  # zero norms are skipped like masked steps
    mask = r.random((batch, steps)) < 0.8
    ratio, decay = per_example_scalars(norms, mask)
    rows = [np.where(m, n, 0.0) for n, m in zip(norms, mask)]
    ratios = [ratio_first_last(row) for row in rows]
    rates = [decay_rate(row) for row in rows]
    logs = [np.log(v) for v in ratios if np.isfinite(v) and v > 0]
    rates = [v for v in rates if np.isfinite(v)]
    want = (np.exp(np.mean(logs)) if logs else np.nan, np.mean(rates) if rates else np.nan)
    np.testing.assert_allclose([ratio, decay], want, rtol=1e-12, atol=1e-12)
