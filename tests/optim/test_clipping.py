"""Tests for keras_fancyrnn.optim: clip functions, ClippingOptimizer, ClippingStats.

Every expected value comes from an independent reference: numpy code (float64, clip_reference.py),
or a hand computation (the linear-regression gradient 2/N X^T r). Nothing is compared with itself.
The tests marked all_backends run on TensorFlow, JAX and torch; the others test TensorFlow's
parts (tf.function with XLA, tf.distribute, IndexedSlices) and import TensorFlow in their body.

Long (over 400 lines): the clip functions', the optimizer's and the callback's tests share the
data and references here and in clip_reference.py; the tests written for the other backends are in
test_optimizer_backends.py and test_optimizer_backends_crosscheck.py.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
from clip_reference import (
    all_nan_after_first_batch,
    linear_clean,
    linear_data,
    np_agc,
    np_autoclip_thresholds,
    np_clip_each,
    np_clip_global,
    np_clipped_sgd,
    np_global_norm,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from keras import ops

import keras_fancyrnn as fr
from keras_fancyrnn.optim import clipping as fo

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)

def tensor(a):
    """A tensor of this backend (float32 for Python floats, as ``tf.constant`` gives)."""
    return ops.convert_to_tensor(a)


def to_np(xs):
    return [None if x is None else np.asarray(keras.ops.convert_to_numpy(x)) for x in xs]


# --------------------------------------------------------------------------------------------------
# pure functions: optax-style properties
# --------------------------------------------------------------------------------------------------

_shapes = st.sampled_from([(3,), (2, 3), (4, 1), (2, 2, 3), (1,)])
_values = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
_grad_lists = st.lists(
    _shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=_values)), min_size=1, max_size=3
)
_thresholds = st.floats(1e-3, 1e3)


@pytest.mark.all_backends
@PROPERTY
@given(grads=_grad_lists, tau=_thresholds)
def test_global_norm_clip_properties(grads, tau):
    clipped, fired = fo.clip_by_global_norm([tensor(g) for g in grads], tau)
    clipped = to_np(clipped)
    n, n_after = np_global_norm(grads), np_global_norm(clipped)
    assert n_after <= tau * (1 + 1e-6)
    if abs(n - tau) > 1e-5 * tau:  # away from the boundary the decision is unambiguous
        assert bool(fired) == (n > tau)
    if bool(fired):
        np.testing.assert_allclose(n_after, tau, rtol=1e-6)
        for c, r in zip(clipped, np_clip_global(grads, tau), strict=True):
            np.testing.assert_allclose(c, r, rtol=1e-5, atol=1e-6 * tau)
    else:
        for c, g in zip(clipped, grads, strict=True):
            np.testing.assert_array_equal(c, g)  # bit-identical under the threshold
    twice, _ = fo.clip_by_global_norm([tensor(c) for c in clipped], tau)
    for a, b in zip(to_np(twice), clipped, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * tau)


@pytest.mark.all_backends
@PROPERTY
@given(grads=_grad_lists, tau=_thresholds)
def test_norm_and_value_clip_properties(grads, tau):
    by_norm, _ = fo.clip_by_norm([tensor(g) for g in grads], tau)
    by_norm = to_np(by_norm)
    for c, r in zip(by_norm, np_clip_each(grads, tau), strict=True):
        assert np.linalg.norm(c.ravel()) <= tau * (1 + 1e-6)
        np.testing.assert_allclose(c, r, rtol=1e-5, atol=1e-6 * tau)
    twice, _ = fo.clip_by_norm([tensor(c) for c in by_norm], tau)
    for a, b in zip(to_np(twice), by_norm, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * tau)

    by_value, fired = fo.clip_by_value([tensor(g) for g in grads], tau)
    by_value = to_np(by_value)
    assert bool(fired) == any(np.any(np.abs(g) > np.float32(tau)) for g in grads)
    for c, g in zip(by_value, grads, strict=True):
        np.testing.assert_array_equal(c, np.clip(g, -np.float32(tau), np.float32(tau)))
    twice, fired_twice = fo.clip_by_value([tensor(c) for c in by_value], tau)
    assert not bool(fired_twice)
    for a, b in zip(to_np(twice), by_value, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.all_backends
@PROPERTY
@given(
    data=st.data(),
    shapes=st.lists(st.sampled_from([(3,), (2, 3), (4, 2), (2, 2, 3)]), min_size=1, max_size=3),
    lam=st.floats(1e-3, 10.0),
)
def test_adaptive_clip_matches_numpy_unitwise(data, shapes, lam):
    grads = [data.draw(hnp.arrays(np.float32, s, elements=_values)) for s in shapes]
    params = [
        data.draw(hnp.arrays(np.float32, s, elements=st.floats(-3, 3, width=32))) for s in shapes
    ]
    params[0][..., 0] = 0.0  # a zero unit: the eps floor decides
    clipped, fired = fo.adaptive_clip([tensor(g) for g in grads], params, lam)
    clipped = to_np(clipped)
    reference = np_agc(grads, params, lam)
    for c, r in zip(clipped, reference, strict=True):
        np.testing.assert_allclose(c, r, rtol=1e-5, atol=1e-30)
    changed = any(not np.array_equal(r, g) for r, g in zip(reference, grads, strict=True))
    assert bool(fired) == changed
    twice, _ = fo.adaptive_clip([tensor(c) for c in clipped], params, lam)
    for a, b in zip(to_np(twice), clipped, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.all_backends
def test_adaptive_clip_units_are_columns_of_keras_kernels():
    # kernel (in=2, out=2): column 0 has weight norm 5 and gradient norm 10 -> scaled to 0.5 * 5;
    # column 1 is under the ratio. Bias: element-wise, the zero bias gets the eps floor.
    w = np.array([[3.0, 1.0], [4.0, 0.0]], np.float32)
    g = np.array([[6.0, 0.1], [8.0, 0.1]], np.float32)
    b, gb = np.array([0.0, 2.0], np.float32), np.array([1.0, 0.5], np.float32)
    (ck, cb), fired = fo.adaptive_clip([tensor(g), tensor(gb)], [w, b], 0.5)
    np.testing.assert_allclose(ck, [[1.5, 0.1], [2.0, 0.1]], rtol=1e-6)
    np.testing.assert_allclose(cb, [0.5 * 1e-3, 0.5], rtol=1e-6)
    assert bool(fired)


@pytest.mark.all_backends
def test_norms_do_not_overflow_for_large_finite_gradients():
    g = np.full((4, 3), 1e25, np.float32)  # its squares overflow float32
    assert np.isfinite(float(fo.global_norm([g])))
    np.testing.assert_allclose(float(fo.global_norm([g, -g])), np.sqrt(24.0) * 1e25, rtol=1e-6)
    (c,), fired = fo.clip_by_global_norm([tensor(g)], 2.0)
    assert bool(fired)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(c, np.float64)), 2.0, rtol=1e-6)
    (c,), _ = fo.clip_by_norm([tensor(g)], 2.0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(c, np.float64)), 2.0, rtol=1e-6)
    assert np.isposinf(float(fo.global_norm([np.array([1.0, np.inf], np.float32)])))
    assert np.isnan(float(fo.global_norm([np.array([1.0, np.nan], np.float32)])))
    assert float(fo.global_norm([None, np.zeros(3, np.float32)])) == 0.0


@pytest.mark.all_backends
def test_autoclip_threshold_matches_numpy_percentile():
    rng = np.random.default_rng(3)
    norms = rng.lognormal(size=11).astype(np.float32)
    for p in (10.0, 50.0, 73.0, 100.0):
        history, count = np.zeros(4, np.float32), 0
        expected = np_autoclip_thresholds(norms, p, 4)
        for n, want in zip(norms, expected, strict=True):
            threshold, history, count = fo.autoclip_threshold(history, count, n, p)
            np.testing.assert_allclose(float(threshold), want, rtol=1e-6)
        assert int(count) == len(norms)


# --------------------------------------------------------------------------------------------------
# the optimizer, step by step
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("method", ["global_norm", "norm", "value", "adaptive"])
def test_optimizer_update_is_the_clipped_gradient(method, jit):
    tf = pytest.importorskip("tensorflow")  # TensorFlow only
    rng = np.random.default_rng(0)
    w0 = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)]
    grads = [
        rng.normal(size=(3, 4)).astype(np.float32) * 3,
        rng.normal(size=(4,)).astype(np.float32),
    ]
    tau = {"global_norm": 2.0, "norm": 2.0, "value": 1.0, "adaptive": 0.3}[method]
    reference = {
        "global_norm": lambda: np_clip_global(grads, tau),
        "norm": lambda: np_clip_each(grads, tau),
        "value": lambda: [np.clip(g, -tau, tau) for g in grads],
        "adaptive": lambda: np_agc(grads, w0, tau),
    }[method]()
    variables = [keras.Variable(w) for w in w0]
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(1.0), method=method, threshold=tau)
    opt.build(variables)
    tf.function(lambda gs: opt.apply(gs, variables), jit_compile=jit)(
        [tensor(g) for g in grads]
    )
    for v, w, r in zip(variables, w0, reference, strict=True):
        np.testing.assert_allclose(w - v.numpy(), r, rtol=1e-5, atol=1e-6)
    stats = opt.stats()
    assert stats["applied_steps"] == 1 and stats["clipped_steps"] == 1 and stats["clip_rate"] == 1
    np.testing.assert_allclose(stats["grad_norm"], np_global_norm(grads), rtol=1e-6)
    np.testing.assert_allclose(stats["clipped_grad_norm"], np_global_norm(reference), rtol=1e-5)
    assert int(opt.iterations) == 1


@pytest.mark.parametrize("jit", [False, True])
def test_autoclip_optimizer_matches_numpy_reference(jit):
    tf = pytest.importorskip("tensorflow")  # TensorFlow only
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=3).astype(np.float32) * s for s in (1, 5, 0.5, 9, 2, 2, 30, 0.1)]
    norms = [np_global_norm([g]) for g in grads]
    thresholds = np_autoclip_thresholds(norms, 30.0, 3)
    v = keras.Variable(np.zeros(3, np.float32))
    opt = fr.ClippingOptimizer(
        keras.optimizers.SGD(1.0), method="auto", percentile=30, history_size=3
    )
    opt.build([v])
    train_step = tf.function(lambda g: opt.apply([g], [v]), jit_compile=jit)
    expected, clipped_steps = np.zeros(3), 0
    for g, n, t in zip(grads, norms, thresholds, strict=True):
        before = v.numpy().copy()
        train_step(tensor(g))
        update = g * t / n if n > t else g
        clipped_steps += n > t
        np.testing.assert_allclose(before - v.numpy(), update, rtol=1e-5)
        expected = expected - update
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5)
    assert norms[0] <= thresholds[0]  # the first step is never clipped
    assert opt.stats()["clipped_steps"] == clipped_steps > 0
    np.testing.assert_allclose(np.sort(opt.norm_history.numpy()), np.sort(norms[-3:]), rtol=1e-6)


@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.all_backends), True])
def test_under_threshold_update_equals_inner_optimizer_exactly(jit):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    y = rng.normal(size=(16, 1)).astype(np.float32)

    def train(wrap):
        keras.utils.set_random_seed(4)
        model = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)]
        )
        opt = keras.optimizers.Adam(0.01)
        if wrap:
            opt = fr.ClippingOptimizer(opt, threshold=1e6)
        model.compile(opt, "mse", jit_compile=jit)
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        inner = opt.inner_optimizer if wrap else opt
        return model.get_weights(), [v.numpy() for v in inner.variables], opt

    plain_w, plain_opt, _ = train(False)
    wrapped_w, wrapped_opt, opt = train(True)
    for a, b in zip(plain_w + plain_opt, wrapped_w + wrapped_opt, strict=True):
        np.testing.assert_array_equal(a, b)
    assert opt.stats()["clipped_steps"] == 0 and opt.stats()["applied_steps"] == 4


def _snapshot(model, opt):
    return [np.array(v.numpy()) for v in model.weights + opt.inner_optimizer.variables]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_gradient_step_changes_nothing(jit, bad):
    tf = pytest.importorskip("tensorflow")  # TensorFlow only
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    opt = fr.ClippingOptimizer(keras.optimizers.Adam(0.1), threshold=0.5)
    opt.build(model.trainable_variables)
    step = tf.function(lambda gs: opt.apply(gs, model.trainable_variables), jit_compile=jit)
    good = [tf.ones_like(v) for v in model.trainable_variables]
    step(good)
    before = _snapshot(model, opt)
    stats_before = opt.stats()
    poisoned = [g.numpy() for g in good]
    poisoned[1][0] = bad  # one entry of one gradient
    step([tensor(g) for g in poisoned])
    for a, b in zip(before, _snapshot(model, opt), strict=True):
        np.testing.assert_array_equal(a, b)  # model, inner slots and iterations, bit for bit
    stats = opt.stats()
    assert int(opt.iterations) == 1
    assert stats["skipped_steps"] == 1 and stats["consecutive_skips"] == 1
    assert stats["applied_steps"] == 1 and stats["clipped_steps"] == stats_before["clipped_steps"]
    assert stats["clipped_grad_norm"] == 0.0 and not np.isfinite(stats["grad_norm"])
    step(good)
    assert opt.stats()["consecutive_skips"] == 0 and int(opt.iterations) == 2


@pytest.mark.all_backends
def test_nonfinite_batch_in_fit_is_skipped_and_weights_are_kept():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 4, 2)).astype(np.float32)
    y = rng.normal(size=(8, 1)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4, 2)), keras.layers.SimpleRNN(3), keras.layers.Dense(1)]
    )
    opt = fr.ClippingOptimizer(keras.optimizers.Adam(0.1))
    model.compile(opt, "mse")
    model.fit(x[:4], y[:4], batch_size=4, verbose=0)
    before = _snapshot(model, opt)
    x_bad = x[4:].copy()
    x_bad[2, 1, 0] = np.nan
    model.fit(x_bad, y[4:], batch_size=4, verbose=0)
    for a, b in zip(before, _snapshot(model, opt), strict=True):
        np.testing.assert_array_equal(a, b)
    assert opt.stats()["skipped_steps"] == 1 and int(opt.iterations) == 1


@pytest.mark.all_backends
def test_skip_nonfinite_false_passes_nonfinite_gradients_on():
    v = keras.Variable(np.zeros(2, np.float32))
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(1.0), skip_nonfinite=False)
    opt.apply([tensor([np.nan, 1.0])], [v])  # a nan norm never exceeds the threshold
    assert np.isnan(v.numpy()[0]) and v.numpy()[1] == -1.0
    assert opt.stats()["skipped_steps"] == 0 and opt.stats()["applied_steps"] == 1


# --------------------------------------------------------------------------------------------------
# model.fit: counters against a numpy simulation of clipped SGD on linear regression
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.all_backends), True])
def test_counters_and_history_after_fit(jit):
    x, y = linear_data()
    tau, lr = 2.5, 0.1
    w, b, ref = np_clipped_sgd(x, y, batch=4, epochs=2, lr=lr, tau=tau)
    assert 0 < ref["clipped"] < ref["applied"]  # the threshold fires on some steps only
    assert np.min(np.abs(np.array(ref["norms"]) / tau - 1)) > 1e-3  # no borderline decision

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(lr), threshold=tau)
    model.compile(opt, "mse", jit_compile=jit)
    history = model.fit(
        x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[fr.ClippingStats()]
    )
    np.testing.assert_allclose(model.layers[0].kernel.numpy(), w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.layers[0].bias.numpy(), b, rtol=1e-4, atol=1e-5)
    stats = opt.stats()
    assert stats["applied_steps"] == ref["applied"] == 8
    assert stats["skipped_steps"] == ref["skipped"] == 4
    assert stats["clipped_steps"] == ref["clipped"]
    assert int(opt.iterations) == 8 and stats["consecutive_skips"] == 0
    np.testing.assert_allclose(stats["clip_rate"], ref["clipped"] / ref["applied"], rtol=1e-6)
    np.testing.assert_allclose(stats["grad_norm"], ref["norms"][-1], rtol=1e-4)
    np.testing.assert_allclose(stats["clipped_grad_norm"], min(ref["norms"][-1], tau), rtol=1e-4)
    # ClippingStats put the statistics into History, one value per epoch
    got = [history.history[k] for k in ("grad_norm", "clip_rate", "skipped_steps")]
    np.testing.assert_allclose(np.transpose(got), ref["per_epoch"], rtol=1e-4)
    assert len(history.history["clipped_grad_norm"]) == 2


@pytest.mark.all_backends
def test_clipping_stats_shows_in_batch_logs_and_needs_a_clipping_optimizer():
    x, y = linear_data()
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(dict(logs))

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(fr.ClippingOptimizer("sgd"), "mse")
    callbacks = [fr.ClippingStats(), Spy()]
    model.fit(x, y, batch_size=12, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    assert [s["skipped_steps"] for s in seen] == [1, 2]
    assert set(fr.ClippingStats.KEYS) <= set(seen[0])

    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="ClippingOptimizer"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[fr.ClippingStats()])


# --------------------------------------------------------------------------------------------------
# max_consecutive_skips, under jit_compile False and True
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(
    "ignore:.*XLA compiles assertions away"
)  # the first fit has no callback
@pytest.mark.parametrize(
    "jit, callbacks, error",
    [
        (False, False, "InvalidArgumentError"),  # the in-graph assertion
        (True, True, "RuntimeError"),  # XLA drops assertions: ClippingStats raises
        (False, True, "InvalidArgumentError"),
    ],
)
def test_max_consecutive_skips_raises(jit, callbacks, error):
    tf = pytest.importorskip("tensorflow")  # TensorFlow only
    error = RuntimeError if error == "RuntimeError" else getattr(tf.errors, error)
    x, y = all_nan_after_first_batch()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=3)
    model.compile(opt, "mse", jit_compile=jit)
    model.fit(x[:8], y[:8], batch_size=8, verbose=0)
    weights = model.get_weights()
    cbs = [fr.ClippingStats()] if callbacks else []
    with pytest.raises(error, match=r"3 consecutive steps had a non-finite gradient"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=cbs)
    # the limit was reached at the 4th batch of the second fit (1 finite, then 3 non-finite)
    assert opt.stats()["skipped_steps"] == 3 and int(opt.iterations) == 2
    assert not np.array_equal(weights[0], model.get_weights()[0])  # the finite batch was applied


def test_max_consecutive_skips_under_xla_without_callback_warns_and_freezes():
    x, y = all_nan_after_first_batch()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=2)
    model.compile(opt, "mse", jit_compile=True)
    with pytest.warns(UserWarning, match="ClippingStats"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert opt.stats()["skipped_steps"] == 4 and opt.stats()["consecutive_skips"] == 4
    assert int(opt.iterations) == 1


def test_check_skip_limit_enforces_the_limit_in_a_custom_xla_loop():
    """A custom loop under XLA (no in-graph assertion) that calls check_skip_limit after each step
    raises at the N-th skip in a row, and skip_limit_checked_outside silences the warning."""
    tf = pytest.importorskip("tensorflow")  # TensorFlow only
    var = keras.Variable(np.array([1.0, 2.0], np.float32))
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=2)
    opt.skip_limit_checked_outside = True
    opt.build([var])
    step = tf.function(lambda g: opt.apply([g], [var]), jit_compile=True)
    finite, bad = tensor([0.3, 0.4]), tensor([np.nan, 1.0])  # |finite| < 1: unclipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the XLA warning would fail here
        for g in (bad, finite, bad):  # the finite step ends the first run of skips
            step(g)
            opt.check_skip_limit()
        step(bad)
    with pytest.raises(RuntimeError, match=r"2 consecutive steps had a non-finite gradient"):
        opt.check_skip_limit()
    np.testing.assert_allclose(var.numpy(), [0.97, 1.96], rtol=1e-6)  # the finite step alone
    assert opt.stats()["skipped_steps"] == 3 and int(opt.iterations) == 1


@pytest.mark.all_backends
@PROPERTY
@given(
    hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=4),
               elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    hnp.arrays(np.float32, (3,), elements=st.floats(-10, 10, width=32)),
)
def test_all_finite_equals_numpy(a, b):
    grads = [a, None, b]
    expected = bool(np.all(np.isfinite(a)) and np.all(np.isfinite(b)))
    assert bool(fo.all_finite(grads)) is expected


@pytest.mark.all_backends
def test_find_clipping_optimizer_looks_inside_wrappers():
    from keras_fancyrnn.optim import find_clipping_optimizer

    clipping = fr.ClippingOptimizer(keras.optimizers.SGD(0.1))
    assert find_clipping_optimizer(clipping) is clipping
    assert find_clipping_optimizer(keras.optimizers.LossScaleOptimizer(clipping)) is clipping
    assert find_clipping_optimizer(keras.optimizers.SGD(0.1)) is None
    assert find_clipping_optimizer(None) is None


# --------------------------------------------------------------------------------------------------
# tf.distribute.MirroredStrategy on two logical CPUs (needs a fresh process)
# --------------------------------------------------------------------------------------------------

_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    import keras_fancyrnn as fr

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}

    def one_step(make_optimizer, per_replica_grads):
        with strategy.scope():
            v = keras.Variable(0.0)
            opt = make_optimizer()
            opt.build([v])

        @tf.function
        def step():
            def replica_fn():
                i = tf.distribute.get_replica_context().replica_id_in_sync_group
                opt.apply_gradients([(tf.gather(per_replica_grads, i), v)])
            strategy.run(replica_fn)

        step()
        return opt, [float(x.numpy()) for x in strategy.experimental_local_results(v.value)]

    sgd = lambda: keras.optimizers.SGD(1.0)
    _, out["keras_global_clipnorm"] = one_step(
        lambda: keras.optimizers.SGD(1.0, global_clipnorm=1.0), [10.0, 20.0])
    opt, out["clipped"] = one_step(lambda: fr.ClippingOptimizer(sgd(), threshold=1.0), [10.0, 20.0])
    out["clipped_stats"] = opt.stats()
    opt, out["unclipped"] = one_step(
        lambda: fr.ClippingOptimizer(sgd(), threshold=100.0), [10.0, 20.0])
    opt, out["value"] = one_step(
        lambda: fr.ClippingOptimizer(sgd(), method="value", threshold=25.0), [10.0, 20.0])
    opt, out["nan"] = one_step(lambda: fr.ClippingOptimizer(sgd()), [10.0, float("nan")])
    out["nan_stats"] = opt.stats()
    out["nan_iterations"] = int(opt.iterations.numpy())

    # model.fit: global batch 8 = 4 per replica; compared with numpy in the test
    rng = np.random.default_rng(7)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = (x @ np.array([[2.0], [-1.0], [0.5]]) + 3.0).astype("float32")
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)),
                                  keras.layers.Dense(1, kernel_initializer="zeros")])
        opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.1), threshold=4.0)
        model.compile(opt, "mse")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    out["fit_kernel"] = model.layers[0].kernel.numpy().tolist()
    out["fit_bias"] = model.layers[0].bias.numpy().tolist()
    out["fit_stats"] = opt.stats()
    print("RESULT" + json.dumps(out))
    """
)


def test_mirrored_strategy_clips_the_summed_gradient():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT") :])
    assert out["replicas"] == 2
    # the example: gradients 10 and 20, threshold 1, lr 1
    assert out["keras_global_clipnorm"] == [-2.0, -2.0]  # Keras clips per replica
    assert out["clipped"] == [-1.0, -1.0]  # the sum, 30, is clipped to 1
    assert out["clipped_stats"]["grad_norm"] == 30.0
    assert out["clipped_stats"]["clipped_grad_norm"] == 1.0
    assert out["unclipped"] == [-30.0, -30.0]
    assert out["value"] == [-25.0, -25.0]  # element-wise clip of the sum, not of each part
    assert out["nan"] == [0.0, 0.0] and out["nan_iterations"] == 0  # one replica poisons both
    assert out["nan_stats"]["skipped_steps"] == 1
    # fit on 2 replicas = clipped SGD on the global batch
    x, y = linear_clean()
    w, b, ref = np_clipped_sgd(x, y, batch=8, epochs=2, lr=0.1, tau=4.0)
    assert 0 < ref["clipped"] < ref["applied"]
    assert np.min(np.abs(np.array(ref["norms"]) / 4.0 - 1)) > 1e-3
    np.testing.assert_allclose(out["fit_kernel"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["fit_bias"], b, rtol=1e-4, atol=1e-5)
    assert out["fit_stats"]["applied_steps"] == 6
    assert out["fit_stats"]["clipped_steps"] == ref["clipped"]


# --------------------------------------------------------------------------------------------------
# mixed precision, save/load, serialization, arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.all_backends
def test_mixed_precision_clips_the_unscaled_gradient():
    x, y = linear_clean()
    x, y = x[:8], y[:8]
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="zeros")]
        )
        # learning rate 0: the weights stay 0, so every step has the same, hand-computed gradient
        opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.0), threshold=1.0)
        model.compile(opt, "mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.optimizer.inner_optimizer is opt
        model.fit(x, y, batch_size=8, epochs=6, verbose=0)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    # at w = 0, b = 0 the gradient of the MSE is (-2/N X^T y, -2/N sum y)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    n = np_global_norm([2 / 8 * xd.T @ yd, 2 / 8 * yd.sum(0)])
    scale = float(model.optimizer.dynamic_scale)
    stats = opt.stats()
    # the loss scale started at 2**15, where the float16 gradient overflows: the
    # LossScaleOptimizer skipped those steps and halved its scale; the others reached the wrapper
    lowered = round(np.log2(2.0**15 / scale))
    assert lowered >= 1 and stats["applied_steps"] == 6 - lowered and stats["skipped_steps"] == 0
    np.testing.assert_allclose(stats["grad_norm"], n, rtol=1e-2)  # unscaled; float16 forward
    assert n > 1.0 and stats["clip_rate"] == 1.0
    np.testing.assert_allclose(stats["clipped_grad_norm"], 1.0, rtol=1e-5)


@pytest.mark.all_backends
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # keras + numpy 2
def test_save_load_resume_is_bit_identical(tmp_path):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(24, 5, 2)).astype(np.float32)
    y = rng.normal(size=(24, 1)).astype(np.float32)
    x[13, 2, 1] = np.nan  # a skipped step in the first half

    def make():
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [keras.Input((5, 2)), keras.layers.SimpleRNN(4), keras.layers.Dense(1)]
        )
        opt = fr.ClippingOptimizer(
            keras.optimizers.Adam(0.05), method="auto", percentile=50, history_size=3
        )
        model.compile(opt, "mse")
        return model

    def fit(model, epochs):
        model.fit(x, y, batch_size=6, epochs=epochs, shuffle=False, verbose=0)

    straight = make()
    fit(straight, 4)
    first = make()
    fit(first, 2)
    path = tmp_path / "model.keras"
    first.save(path)
    resumed = keras.models.load_model(path)
    assert isinstance(resumed.optimizer, fr.ClippingOptimizer)
    assert resumed.optimizer.stats() == first.optimizer.stats()
    assert resumed.optimizer.stats()["skipped_steps"] == 2
    np.testing.assert_array_equal(
        resumed.optimizer.norm_history.numpy(), first.optimizer.norm_history.numpy()
    )
    fit(resumed, 2)
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(straight.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))
    assert straight.optimizer.stats() == resumed.optimizer.stats()


@pytest.mark.all_backends
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"method": "auto", "percentile": 90, "history_size": 7, "max_consecutive_skips": 3},
        {"method": "adaptive", "threshold": 0.02, "eps": 1e-4, "skip_nonfinite": False},
        {"method": "value", "threshold": 2, "loss_scale_factor": 128.0, "name": "clip"},
    ],
)
def test_config_round_trip(kwargs):
    opt = fr.ClippingOptimizer(keras.optimizers.Adam(0.003), **kwargs)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert type(again) is fr.ClippingOptimizer
    assert again.get_config() == opt.get_config()
    assert isinstance(again.inner_optimizer, keras.optimizers.Adam)
    np.testing.assert_allclose(float(again.learning_rate), 0.003)
    for key, value in kwargs.items():
        assert again.get_config()[key] == value
    defaults = fr.ClippingOptimizer("sgd").get_config()
    assert defaults["method"] == "global_norm" and defaults["threshold"] == 1.0


def test_delegates_learning_rate_and_iterations():
    tf = pytest.importorskip("tensorflow")  # TensorFlow only
    inner = keras.optimizers.SGD(0.1)
    opt = fr.ClippingOptimizer(inner)
    opt.learning_rate = 0.5
    np.testing.assert_allclose(float(inner.learning_rate), 0.5)
    assert opt.iterations is inner.iterations
    v = keras.Variable(np.ones(2, np.float32))
    opt.apply([tf.IndexedSlices(tf.constant([4.0]), tf.constant([1]), tf.constant([2]))], [v])
    np.testing.assert_allclose(v.numpy(), [1.0, 1.0 - 0.5])  # densified, clipped to norm 1
    with pytest.raises(ValueError, match="before it is built"):
        fr.ClippingOptimizer("sgd").stats()


@pytest.mark.all_backends
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "max"}, r"method must be one of 'global_norm', .*got 'max'"),
        ({"threshold": -1}, r"threshold must be a positive number, got -1"),
        ({"threshold": 0.0}, r"threshold must be a positive number, got 0.0"),
        ({"threshold": float("nan")}, r"threshold must be a positive number, got nan"),
        ({"threshold": True}, r"threshold must be a positive number, got True"),
        ({"percentile": 10}, r"percentile applies only to method='auto'.*'global_norm'"),
        ({"history_size": 10, "method": "norm"}, r"history_size applies only to method='auto'"),
        ({"method": "auto", "threshold": 1.0}, r"threshold does not apply to method='auto'"),
        ({"method": "auto", "percentile": 0}, r"percentile must be a number in \(0, 100\], got 0"),
        ({"method": "auto", "percentile": 101}, r"percentile must be a number in \(0, 100\]"),
        ({"method": "auto", "history_size": 0}, r"history_size must be a positive integer, got 0"),
        ({"method": "auto", "history_size": 2.5}, r"history_size must be a positive integer"),
        ({"eps": 1e-3}, r"eps applies only to method='adaptive'"),
        ({"method": "adaptive", "eps": -1e-3}, r"eps must be a positive number"),
        ({"max_consecutive_skips": 0}, r"max_consecutive_skips must be a positive integer, got 0"),
        (
            {"max_consecutive_skips": 3, "skip_nonfinite": False},
            r"max_consecutive_skips needs skip_nonfinite=True",
        ),
        ({"skip_nonfinite": "yes"}, r"skip_nonfinite must be True or False"),
        ({"clipnorm": 1.0}, r"does not take `clipnorm`"),
        ({"weight_decay": 0.1}, r"set `weight_decay` on the inner optimizer"),
        ({"colour": "red"}, r"unknown arguments: \['colour'\]"),
    ],
)
def test_bad_arguments_are_rejected_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fr.ClippingOptimizer(keras.optimizers.SGD(0.1), **kwargs)


@pytest.mark.all_backends
@pytest.mark.parametrize(
    "inner, match",
    [
        (42, r"inner_optimizer must be a keras.optimizers.Optimizer instance, got 42"),
        (keras.optimizers.SGD(global_clipnorm=1.0), r"inner_optimizer must not clip"),
        (keras.optimizers.SGD(loss_scale_factor=8.0), r"must not have a loss_scale_factor"),
        (
            keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
            r"must not be a LossScaleOptimizer",
        ),
    ],
)
def test_bad_inner_optimizers_are_rejected(inner, match):
    with pytest.raises(ValueError, match=match):
        fr.ClippingOptimizer(inner)
