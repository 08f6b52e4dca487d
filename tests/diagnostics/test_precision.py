"""The monitor in other precisions, against the float32 monitor on the same weights: mixed_float16
(finite where float32 is, also when the loss scale would overflow float16) and mixed_bfloat16 within
their unit roundoff's tolerance; the float64 probe pass equal to float32's where both are
representable and nonzero where float32's backward pass underflows."""

import keras
import ml_dtypes
import numpy as np
import pytest
from tolerance import assert_close, rounding_chain, tolerance

import keras_fancyrnn as fr
from keras_fancyrnn.diagnostics import GradientNormMonitor, gradient_norms

D, OUT = 3, 1
LOW = {"mixed_float16": np.float16, "mixed_bfloat16": ml_dtypes.bfloat16}


def lstm_model(units, steps, optimizer=None):
    inp = keras.Input((steps, D))
    out = keras.layers.Dense(OUT, name="head")(fr.LSTM(units, name="l")(inp))
    model = keras.Model(inp, out)
    model.compile(optimizer=optimizer or "sgd", loss="mse")
    return model


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("clipping", [
    True,  # ClippingOptimizer: TensorFlow here (its other backends are tested in tests/optim)
    pytest.param(False, marks=pytest.mark.all_backends),  # Keras's LossScaleOptimizer alone
])
def test_float16_records_stay_finite_when_the_loss_scale_would_overflow(rng, policy, clipping):
    """The issue's run: fr.LSTM(32), T=50, ClippingOptimizer(Adam(1e-2)), a record every 8 steps.
    Large targets make ∂ℓ_i/∂h_t large: times the loss scale (32768 at first, lowered by
    training's own overflows) that is past float16's 65504 (the records at steps 8 and 16 were
    NaN when the pass scaled the sum of the losses)."""
    steps, units = 50, 32
    x = rng.normal(0, 1, (64, steps, D)).astype("float32")
    y = 30 * rng.normal(0, 1, (64, OUT)).astype("float32")
    policy("mixed_float16")
    keras.utils.set_random_seed(0)
    optimizer = keras.optimizers.Adam(1e-2)
    model = lstm_model(units, steps, fr.ClippingOptimizer(optimizer) if clipping else optimizer)
    monitor = GradientNormMonitor((x[:8], y[:8]), every_n_batches=8)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor])
    policy("float32")
    assert list(monitor.steps) == [0, 8, 16]
    reference = lstm_model(units, steps)
    reference.set_weights(model.get_weights())  # the weights of the last record (step 16)
    want = gradient_norms(reference, x[:8], y[:8])
    chain = rounding_chain(steps, 8, D, units)
    for key, rows in monitor.history.items():
        assert np.all(np.isfinite(rows)), key
        assert_close(rows[-1], want[key], chain, dtype=np.float16, name=key)


@pytest.mark.all_backends
@pytest.mark.parametrize("name", sorted(LOW))
def test_mixed_precision_equals_float32_on_the_same_weights(rng, policy, name):
    steps, units, batch = 4, 4, 4  # a short chain: bfloat16's bound, 2·8·√n·2⁻⁸ of the max,
    # grows fast with n (tests/tolerance.py)
    x = rng.normal(0, 1, (batch, steps, D)).astype("float32")
    y = rng.normal(0, 1, (batch, OUT)).astype("float32")
    keras.utils.set_random_seed(1)
    reference = lstm_model(units, steps)
    want = gradient_norms(reference, x, y)
    policy(name)
    model = lstm_model(units, steps)
    model.set_weights(reference.get_weights())
    monitor = GradientNormMonitor((x, y), every_n_batches=1)
    monitor.set_model(model)
    got = monitor.record()
    assert model.get_layer("l").compute_dtype == name.split("_")[1]
    chain = rounding_chain(steps, batch, D, units)
    for key in want:
        assert_close(got[key], want[key], chain, dtype=LOW[name], name=key)


@pytest.mark.parametrize("layer", [fr.SimpleRNN, keras.layers.SimpleRNN])
def test_float64_pass_follows_the_curve_below_float32s_range(rng, layer):
    """A tanh RNN with small recurrent weights: ‖∂ℓ/∂h_t‖ falls by ~1e-1 a step, below float32's
    smallest normal number (1.2e-38) some 40 steps before the end."""
    steps, units, batch = 120, 8, 4
    x = rng.normal(0, 1, (batch, steps, D)).astype("float32")
    y = rng.normal(0, 1, (batch, OUT)).astype("float32")
    inp = keras.Input((steps, D))
    small = keras.initializers.RandomNormal(0, 0.05, seed=0)
    rnn = layer(units, recurrent_initializer=small, name="rnn")
    model = keras.Model(inp, keras.layers.Dense(OUT)(rnn(inp)))
    model.compile(loss="mse")
    weights = model.get_weights()
    f32 = gradient_norms(model, x, y)
    monitor = GradientNormMonitor((x, y), probe_dtype="float64", every_n_batches=1)
    monitor.set_model(model)
    f64 = monitor.record()
    assert monitor.history["rnn"].dtype == np.float64
    chain = rounding_chain(steps, batch, D, units, gates=1)
    for key in ("rnn", "rnn/input"):
        both = f32[key] > 0
        assert 0 < both.sum() < steps  # float32's curve stops inside the sequence
        assert np.all(f64[key] > 0)
        # float32's curve is 0 where components (or the H products summed into each) fall
        # below its smallest normal number `tiny`: a norm of at most √S·H·tiny
        tiny = np.finfo(np.float32).tiny
        assert f64[key][~both].max() < np.sqrt(units) * units * tiny
        # representable in both: the terms float32 flushed are below its roundoff u
        normal = f32[key] > np.sqrt(units) * units * tiny / np.finfo(np.float32).eps
        assert normal.sum() >= 20
        rel = np.abs(f32[key][normal] / f64[key][normal] - 1)
        assert rel.max() < tolerance(chain, np.float32), key
    # the training model is untouched
    assert model.get_layer("rnn").compute_dtype == "float32"
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)


def test_probe_dtype_is_checked():
    with pytest.raises(ValueError, match="probe_dtype must be None, 'float32' or 'float64'"):
        GradientNormMonitor((np.zeros((1, 2, 1)), np.zeros((1, 1))), probe_dtype="float16")


def test_float64_pass_on_a_masked_functional_model(rng):
    """Masking in a functional model (Keras ops beside the layers in its graph): the float64 copy
    gives float32's curves and counts within float32's rounding."""
    steps, units, batch = 8, 4, 3
    x = rng.normal(0, 1, (batch, steps, D)).astype("float32")
    x[0, 5:] = 0.0
    y = rng.normal(0, 1, (batch, OUT)).astype("float32")
    inp = keras.Input((steps, D))
    h = fr.LSTM(units, name="rnn")(keras.layers.Masking(0.0)(inp))
    model = keras.Model(inp, keras.layers.Dense(OUT)(h))
    model.compile(loss="mse")
    f32 = gradient_norms(model, x, y)
    f64 = gradient_norms(model, x, y, probe_dtype="float64")
    assert set(f32) == set(f64) and "rnn/count" in f32
    np.testing.assert_array_equal(f64["rnn/count"], [3, 3, 3, 3, 3, 2, 2, 2])
    chain = rounding_chain(steps, batch, D, units)
    for key in ("rnn", "rnn/cell", "rnn/input"):
        assert_close(f32[key], f64[key], chain, name=key)
