"""ClippingOptimizer and ClippingStats on every backend: TensorFlow, JAX (the JAX trainer's
``stateless_apply`` under ``jax.jit``) and torch.

References: numpy clipping rules and a numpy Adam (clip_reference.py) and the hand-derived gradient
of linear regression. The checks against the TensorFlow backend's step and on two JAX devices are
in test_optimizer_backends_crosscheck.py. This module does not import TensorFlow.

Tolerances: one float32 step rounds each value a few times (a norm over a few dozen terms, a
product, a difference), each time by at most 2^-24 relative, so 1e-5 relative (with 1e-6 absolute
for values near 0) bounds it with a margin; over the 8 steps of a fit the errors add (1e-4).
"""

import warnings

import keras
import numpy as np
import pytest
from clip_reference import (
    LINEAR_B0,
    LINEAR_W0,
    NumpyClipper,
    all_nan_after_first_batch,
    gradient_steps,
    linear_clean,
    linear_data,
    np_adam,
    np_clip_global,
    np_clipped_sgd,
    np_fit_linear,
    np_global_norm,
)
from keras import ops

import keras_fancyrnn as fr

pytestmark = [
    pytest.mark.all_backends,
    # Keras's Variable.numpy under numpy 2, on every read of a variable
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

BACKEND = keras.backend.backend()
STEP = {"rtol": 1e-5, "atol": 1e-6}  # one float32 step (module docstring)
FIT = {"rtol": 1e-4, "atol": 1e-5}  # 8 float32 steps
METHODS = ("global_norm", "norm", "value", "adaptive", "auto")
# the error a step raises at the max_consecutive_skips-th skip in a row: TensorFlow's in-graph
# assertion, torch's (and eager JAX's) RuntimeError
STEP_ERROR = "InvalidArgumentError" if BACKEND == "tensorflow" else "RuntimeError"
SKIP_LIMIT = r"consecutive steps had a non-finite gradient"


def tensor(a):
    return ops.convert_to_tensor(np.asarray(a, np.float32))


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def clipping(method, inner, thresholds, **kwargs):
    """The optimizer and its numpy counterpart; AutoClip at the median of 3 norms."""
    if method == "auto":
        opt = fr.ClippingOptimizer(inner, method="auto", percentile=50, history_size=3, **kwargs)
        return opt, NumpyClipper("auto", percentile=50.0, history_size=3)
    opt = fr.ClippingOptimizer(inner, method=method, threshold=thresholds[method], **kwargs)
    return opt, NumpyClipper(method, thresholds[method])


def snapshot(variables):
    return [np.array(numpy(v.value)) for v in variables]


# --------------------------------------------------------------------------------------------------
# one step at a time (apply, eager on every backend)
# --------------------------------------------------------------------------------------------------

APPLY_THRESHOLDS = {"global_norm": 2.0, "norm": 2.0, "value": 1.0, "adaptive": 1.0}


@pytest.mark.parametrize("method", METHODS)
def test_apply_is_sgd_on_the_clipped_gradient(method):
    w0, steps = gradient_steps()
    lr = 0.5
    variables = [keras.Variable(w) for w in w0]
    opt, reference = clipping(method, keras.optimizers.SGD(lr), APPLY_THRESHOLDS)
    expected = [w.astype(np.float64) for w in w0]
    applied = clipped = 0
    for grads in steps:
        before = snapshot(variables)
        opt.apply([tensor(g) for g in grads], variables)
        if not all(np.all(np.isfinite(g)) for g in grads):
            for a, b in zip(before, snapshot(variables), strict=True):
                np.testing.assert_array_equal(a, b)  # a skipped step changes nothing
            assert opt.stats()["consecutive_skips"] == 1 and opt.stats()["clipped_grad_norm"] == 0
            assert np.isnan(opt.stats()["grad_norm"])
            continue
        out, fired = reference.clip(grads, expected)
        expected = [w - lr * g for w, g in zip(expected, out, strict=True)]
        applied, clipped = applied + 1, clipped + fired
        for v, want in zip(variables, expected, strict=True):
            np.testing.assert_allclose(numpy(v.value), want, **STEP)
        stats = opt.stats()
        np.testing.assert_allclose(stats["grad_norm"], np_global_norm(grads), rtol=1e-5)
        np.testing.assert_allclose(stats["clipped_grad_norm"], np_global_norm(out), rtol=1e-5)
    assert reference.margin > 1e-3  # no decision the float32 rounding could flip
    assert 0 < clipped < applied  # both kinds of step were taken
    stats = opt.stats()
    assert (stats["applied_steps"], stats["clipped_steps"], stats["skipped_steps"]) == (
        applied, clipped, 1)
    assert stats["consecutive_skips"] == 0 and int(numpy(opt.iterations)) == applied
    np.testing.assert_allclose(stats["clip_rate"], clipped / applied, rtol=1e-6)


def test_apply_with_adam_is_numpy_adam_on_the_clipped_gradient():
    w0, steps = gradient_steps()
    steps = [steps[0], steps[1], steps[3]]  # clipped, not clipped, clipped
    tau = 2.0
    variables = [keras.Variable(w) for w in w0]
    opt = fr.ClippingOptimizer(keras.optimizers.Adam(0.1), threshold=tau)
    clipped = [np_clip_global(g, tau) for g in steps]
    expected, _, _ = np_adam(w0, clipped, lr=0.1)
    unclipped, _, _ = np_adam(w0, steps, lr=0.1)
    # Adam's bias correction 1 - beta_2^t cancels in float32: beta_2^t is off by up to t ulps of
    # 1, so 1 - beta_2^t is off by up to eps / (1 - beta_2) relative (6e-5 for beta_2 = 0.999),
    # its square root by half that; each step moves by at most lr per entry (|m / sqrt(v)| <= 1
    # for these steps) and the steps add up
    atol = len(steps) * 0.1 * np.finfo(np.float32).eps / (1 - 0.999) / 2
    for grads, want in zip(steps, expected, strict=True):
        opt.apply([tensor(g) for g in grads], variables)
        for v, w in zip(variables, want, strict=True):
            np.testing.assert_allclose(numpy(v.value), w, rtol=1e-5, atol=atol)
    # Adam is invariant to one scale for all steps, not to clipping some of them: the reference
    # without clipping is far from the clipped one, so this test tells them apart
    gap = max(np.max(np.abs(a - b)) for a, b in zip(expected[-1], unclipped[-1], strict=True))
    assert gap > 1e-2
    assert opt.stats()["clipped_steps"] == 2 and int(numpy(opt.iterations)) == 3


def test_eager_apply_raises_at_the_nth_skip_and_refuses_until_reset():
    var = keras.Variable(np.array([1.0, 2.0], np.float32))
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=2)
    finite, bad = tensor([0.3, 0.4]), tensor([np.nan, 1.0])  # |finite| < 1: not clipped
    for g in (bad, finite, bad):  # the finite step ends the first run of skips
        opt.apply([g], [var])
    for g in (bad, finite):  # the limit is reached, and then every step is refused
        with pytest.raises(Exception, match=SKIP_LIMIT) as info:
            opt.apply([g], [var])
        assert type(info.value).__name__ == STEP_ERROR
    np.testing.assert_allclose(numpy(var.value), [0.97, 1.96], **STEP)  # the finite step alone
    assert opt.stats()["skipped_steps"] == 4 and int(numpy(opt.iterations)) == 1
    opt.consecutive_skips.assign(0)
    opt.apply([finite], [var])
    np.testing.assert_allclose(numpy(var.value), [0.94, 1.92], **STEP)


# --------------------------------------------------------------------------------------------------
# model.fit (the JAX trainer's stateless_apply under jax.jit, torch's trainer, TensorFlow's)
# --------------------------------------------------------------------------------------------------

FIT_THRESHOLDS = {"global_norm": 2.5, "norm": 2.0, "value": 2.0, "adaptive": 3.0}


def _linear_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.set_weights([LINEAR_W0, LINEAR_B0])
    return model


@pytest.mark.parametrize("method", METHODS)
def test_fit_is_numpy_clipped_sgd_with_skips_and_stats(method):
    """Linear regression, two non-finite batches of six, two epochs: weights, counters, norms and
    ClippingStats's History against numpy."""
    x, y = linear_data()
    opt, clipper = clipping(method, keras.optimizers.SGD(0.1), FIT_THRESHOLDS)
    w, b, ref = np_fit_linear(x, y, 4, 2, 0.1, clipper, LINEAR_W0, LINEAR_B0)  # batch 4, 2 epochs
    assert clipper.margin > 1e-3 and 0 < ref["clipped"] < ref["applied"] == 8

    model = _linear_model()
    model.compile(opt, "mse")
    history = model.fit(
        x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[fr.ClippingStats()]
    )
    np.testing.assert_allclose(model.layers[0].kernel.numpy(), w, **FIT)
    np.testing.assert_allclose(model.layers[0].bias.numpy(), b, **FIT)
    stats = opt.stats()
    assert (stats["applied_steps"], stats["skipped_steps"], stats["clipped_steps"]) == (
        8, 4, ref["clipped"])
    assert int(numpy(opt.iterations)) == 8 and stats["consecutive_skips"] == 0
    np.testing.assert_allclose(stats["grad_norm"], ref["norms"][-1], rtol=1e-4)
    np.testing.assert_allclose(stats["clipped_grad_norm"], ref["clipped_norms"][-1], rtol=1e-4)
    got = [history.history[k] for k in ("grad_norm", "clip_rate", "skipped_steps")]
    np.testing.assert_allclose(np.transpose(got), ref["per_epoch"], rtol=1e-4)
    if method == "auto":
        np.testing.assert_allclose(
            np.sort(numpy(opt.norm_history.value)), np.sort(ref["norms"][-3:]), rtol=1e-4
        )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_batch_in_fit_changes_no_variable(bad):
    """Model, Adam's slots, iterations: bit for bit after a batch with one non-finite entry."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=(8, 1)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(1)])
    opt = fr.ClippingOptimizer(keras.optimizers.Adam(0.1), threshold=0.5)
    model.compile(opt, "mse")
    model.fit(x[:4], y[:4], batch_size=4, verbose=0)
    tracked = model.weights + opt.inner_optimizer.variables
    before = snapshot(tracked)
    x_bad = x[4:].copy()
    x_bad[1, 2] = bad
    model.fit(x_bad, y[4:], batch_size=4, verbose=0)
    for a, b in zip(before, snapshot(tracked), strict=True):
        np.testing.assert_array_equal(a, b)
    stats = opt.stats()
    assert stats["skipped_steps"] == 1 and stats["consecutive_skips"] == 1
    assert stats["applied_steps"] == 1 and int(numpy(opt.iterations)) == 1


@pytest.mark.parametrize("callback", [True, False])
def test_max_consecutive_skips_in_fit(callback):
    """TensorFlow (no XLA) and torch raise at the step, JAX's jitted step cannot: ClippingStats
    raises after the batch, and without it the optimizer warns and refuses every step."""
    x, y = all_nan_after_first_batch()
    model = _linear_model()
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=3)
    model.compile(opt, "mse", jit_compile=BACKEND == "jax")
    callbacks = [fr.ClippingStats()] if callback else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x[:8], y[:8], batch_size=8, verbose=0, callbacks=callbacks)
        after_finite = model.get_weights()
        if BACKEND == "jax" and not callback:
            model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
            skipped = 4  # every non-finite batch; the 4th is refused as well
        else:
            error = "RuntimeError" if BACKEND == "jax" else STEP_ERROR
            with pytest.raises(Exception, match="3 " + SKIP_LIMIT) as info:
                model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=callbacks)
            assert type(info.value).__name__ == error
            skipped = 3  # stopped at the 4th batch: 1 finite, then 3 non-finite
    warned = any("ClippingStats" in str(w.message) for w in caught)
    assert warned == (BACKEND == "jax" and not callback)  # nothing else would raise
    assert opt.stats()["skipped_steps"] == skipped and int(numpy(opt.iterations)) == 2
    assert not np.array_equal(after_finite[0], LINEAR_W0)  # the finite batches were applied
    assert not np.array_equal(after_finite[0], model.get_weights()[0])


def test_stats_in_a_callback_during_fit():
    """Through Callback.model the statistics are current after every batch on every backend; the
    JAX trainer holds them during an epoch, so reading the optimizer alone there is refused."""
    x, y = linear_clean()
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.1), threshold=2.5)
    seen, refused = [], []

    class Reader(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            try:
                opt.stats()
            except ValueError as err:
                refused.append(str(err))
            seen.append(self.model.optimizer.stats()["applied_steps"])

    model = _linear_model()
    model.compile(opt, "mse")
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[Reader()])
    assert seen == [1, 2, 3]
    if BACKEND == "jax":  # before Callback.model attached the trainer's state
        assert len(refused) == 3 and "held by the JAX trainer" in refused[0]
    else:
        assert refused == []


def test_loss_scale_factor_is_divided_out_before_clipping():
    x, y = linear_clean()
    w, b, ref = np_clipped_sgd(x, y, batch=8, epochs=1, lr=0.1, tau=2.5)
    assert 0 < ref["clipped"] < ref["applied"]
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.1), threshold=2.5, loss_scale_factor=1024.0)
    model.compile(opt, "mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(model.layers[0].kernel.numpy(), w, **FIT)
    np.testing.assert_allclose(model.layers[0].bias.numpy(), b, **FIT)
    np.testing.assert_allclose(opt.stats()["grad_norm"], ref["norms"][-1], rtol=1e-4)
