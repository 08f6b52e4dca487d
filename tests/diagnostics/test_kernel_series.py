"""The opt-in series ``name/recurrent_kernel``: per t the Frobenius norm of step t's term of the
BPTT sum for the recurrent kernel U. References: the tape gradient of Σ_i ℓ_i for U (the terms
must sum to it), and for the tanh RNN a numpy BPTT after the WildML tutorial's ``bptt``
(dℓ/dU = Σ_t h_{t-1}ᵀ δ_t, δ_t = dℓ/dh_t ⊙ (1 - h_t²)), in float64."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tolerance import assert_close, rounding_chain

import keras_fancyrnn as fr
from keras_fancyrnn import diagnostics as mon

B, T, D, H, OUT = 4, 7, 3, 5, 2


def _model(layer, mask=False):
    keras.utils.set_random_seed(0)
    inp = keras.Input((T, D))
    h = layer(keras.layers.Masking(0.0)(inp) if mask else inp)
    model = keras.Model(inp, keras.layers.Dense(OUT, name="head")(h))
    model.compile(loss="mse")
    r = np.random.default_rng(3)
    model.set_weights([r.normal(0, 0.5, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def _data(seed=0):
    r = np.random.default_rng(seed)
    return (r.normal(0, 1, (B, T, D)).astype("float32"),
            r.normal(0, 1, (B, OUT)).astype("float32"))


def _tape_gradient(model, layer, x, y):
    """d(Σ_i ℓ_i)/dU with ℓ_i the mean squared error of example i (the compiled loss)."""
    kernel = layer.cell.recurrent_kernel
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(tf.reduce_mean((model(x) - y) ** 2, axis=-1))
    return tape.gradient(total, kernel).numpy()


@pytest.mark.parametrize("make,gates", [
    (lambda: fr.SimpleRNN(H, name="l"), 1),
    (lambda: fr.LSTM(H, name="l"), 4),
    (lambda: fr.GRU(H, name="l"), 3),
    (lambda: fr.GRU(H, reset_after=False, name="l"), 3),
    (lambda: fr.LSTM(H, go_backwards=True, name="l"), 4),
    (lambda: fr.SimpleRNN(H, bptt_truncate=2, unroll=True, name="l"), 1),
], ids=["SimpleRNN", "LSTM", "GRU", "GRU-reset_before", "LSTM-backwards", "truncated-unrolled"])
def test_terms_sum_to_the_tape_gradient_of_the_recurrent_kernel(make, gates):
    layer = make()
    model = _model(layer)
    x, y = _data()
    targets = [t for t in mon.discover(model) if t.states]
    for t in targets:
        t.kernel = True
    measured = mon.ProbePass(model, targets).measure(x, y)
    terms = measured.kernels["l/recurrent_kernel"]
    assert terms.shape == (T, *layer.cell.recurrent_kernel.shape)
    assert_close(terms.sum(0), _tape_gradient(model, layer, x, y),
                 rounding_chain(T, B, D, H, gates), name="Σ_t terms vs tape")
    curves = measured.curves()
    np.testing.assert_allclose(curves["l/recurrent_kernel"],
                               np.linalg.norm(terms.reshape(T, -1), axis=1), rtol=1e-6)
    if layer.bptt_truncate is None:  # the other series are unchanged by the extra probe
        np.testing.assert_allclose(curves["l"], fr.gradient_norms(model, x, y)["l"], rtol=1e-6)


def numpy_bptt_kernel_terms(x, W, U, b, Wd, bd, y, mask=None):
    """WildML ``bptt`` for h_t = tanh(x_t W + h_{t-1} U + b), a Dense head on the last state,
    per-example MSE summed over the batch: per t the term Σ_i h_{t-1}ᵀ δ_t of dℓ/dU (float64).
    A masked step keeps the previous state and contributes nothing."""
    x, W, U, b, Wd, bd, y = (np.asarray(a, np.float64) for a in (x, W, U, b, Wd, bd, y))
    n, steps, _ = x.shape
    mask = np.ones((n, steps), bool) if mask is None else mask
    hs = [np.zeros((n, U.shape[0]))]
    for t in range(steps):
        new = np.tanh(x[:, t] @ W + hs[-1] @ U + b)
        hs.append(np.where(mask[:, t, None], new, hs[-1]))
    g = 2.0 * (hs[-1] @ Wd + bd - y) @ Wd.T / Wd.shape[1]  # dℓ/dh_T
    terms = np.zeros((steps, *U.shape))
    for t in reversed(range(steps)):
        h_new = np.tanh(x[:, t] @ W + hs[t] @ U + b)
        delta = np.where(mask[:, t, None], g * (1.0 - h_new**2), 0.0)  # dℓ/dz_t
        terms[t] = hs[t].T @ delta
        g = np.where(mask[:, t, None], delta @ U.T, g)  # dℓ/dh_{t-1}
    return terms


@pytest.mark.parametrize("padded", [False, True])
def test_tanh_rnn_terms_equal_numpy_bptt(padded):
    layer = fr.SimpleRNN(H, name="l")
    model = _model(layer, mask=padded)
    x, y = _data(1)
    mask = None
    if padded:
        lengths = np.array([3, 7, 5, 2])
        mask = np.arange(T)[None] < lengths[:, None]
        x = np.where(mask[..., None], x + 3.0, 0.0).astype("float32")  # Masking(0) reads it
    W, U, b = (v.numpy() for v in (layer.cell.kernel, layer.cell.recurrent_kernel,
                                   layer.cell.bias))
    Wd, bd = model.get_layer("head").get_weights()
    want = numpy_bptt_kernel_terms(x, W, U, b, Wd, bd, y, mask)
    got = fr.gradient_norms(model, x, y, kernel_norms=True, input_norms=False)
    norms = np.linalg.norm(want.reshape(T, -1), axis=1)
    assert_close(got["l/recurrent_kernel"], norms, rounding_chain(T, B, D, H, 1),
                 name="‖term_t‖ vs numpy BPTT")


def test_monitor_records_the_kernel_series_only_when_asked():
    model = _model(fr.LSTM(H, name="l"))
    x, y = _data()
    plain = fr.GradientNormMonitor((x, y), every_n_batches=1)
    plain.set_model(model)
    plain.record(0)
    assert "l/recurrent_kernel" not in plain.history
    asked = fr.GradientNormMonitor((x, y), every_n_batches=1, kernel_norms=True)
    asked.set_model(model)
    asked.record(0)
    assert asked.history["l/recurrent_kernel"].shape == (1, T)
    assert "l/recurrent_kernel/grad_ratio" not in asked.scalars
    np.testing.assert_allclose(asked.history["l"], plain.history["l"], rtol=1e-6)


def test_the_kernel_probe_runs_on_the_loop_whatever_the_plan():
    """Whole-sequence kernels know nothing of E_t: a plan naming one falls back to the loop, so the
    terms still sum to the tape gradient (the plan is forced here; the dispatch may choose a
    sequence kernel for probed layers)."""
    from keras_fancyrnn.engine import dispatch, loop

    layer = fr.LSTM(H, name="l")
    x, _ = _data()
    layer(x)
    cell = layer.cell
    state = [tf.zeros((B, H)), tf.zeros((B, H))]
    probe = tf.zeros((T, H, 4 * H))
    coef = tf.constant(np.random.default_rng(0).normal(size=(B, H)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(probe)
        last, _, _ = loop.run(cell, tf.constant(x), state, probes={"recurrent_kernel": probe},
                              plan=dispatch.Plan("l", "sequence_kernel", "forced"))
        total = tf.reduce_sum(last * coef)
    terms, grad_u = tape.gradient(total, [probe, cell.recurrent_kernel])
    assert_close(tf.reduce_sum(terms, 0), grad_u, rounding_chain(T, B, D, H, 4))
