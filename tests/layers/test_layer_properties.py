"""Property tests (hypothesis): random shapes, masks and options; references are keras.layers with
copied weights, the reversed sequence, and the layers of a stack applied by hand."""

import keras
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_fancyrnn as fr

PAIRS = {
    "simple_rnn": (keras.layers.SimpleRNN, fr.SimpleRNN, {}),
    "lstm": (keras.layers.LSTM, fr.LSTM, {}),
    "gru": (keras.layers.GRU, fr.GRU, {}),
    "gru_before": (keras.layers.GRU, fr.GRU, {"reset_after": False}),
}
SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(sorted(PAIRS)))
    batch = draw(st.integers(1, 4))
    steps = draw(st.integers(1, 7))
    dim = draw(st.integers(1, 5))
    units = draw(st.integers(1, 6))
    options = {
        "return_sequences": draw(st.booleans()),
        "return_state": draw(st.booleans()),
        "go_backwards": draw(st.booleans()),
        "use_bias": draw(st.booleans()),
        "activation": draw(st.sampled_from(["tanh", "relu", "sigmoid"])),
    }
    if draw(st.booleans()):
        mask = np.array(draw(st.lists(st.lists(st.booleans(), min_size=steps, max_size=steps),
                                      min_size=batch, max_size=batch)))
    else:
        mask = None
    seed = draw(st.integers(0, 2**16))
    return kind, batch, steps, dim, units, options, mask, seed


@SETTINGS
@given(cases())
def test_random_configurations_equal_keras(case):
    kind, batch, steps, dim, units, options, mask, seed = case
    keras_cls, fr_cls, extra = PAIRS[kind]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, steps, dim)).astype("float32")
    ref, ours = keras_cls(units, **extra, **options), fr_cls(units, **extra, **options)
    ref.build((None, steps, dim))
    ours.build((None, steps, dim))
    weights = [rng.normal(0, 0.5, w.shape).astype("float32") for w in ref.get_weights()]
    ref.set_weights(weights)
    ours.set_weights(weights)
    x_t = tf.constant(x)
    results = []
    for layer in (ref, ours):
        with tf.GradientTape() as tape:
            tape.watch(x_t)
            out = tf.nest.flatten(layer(x_t, mask=mask))
            loss = sum(tf.reduce_sum(o * (i + 1.0)) for i, o in enumerate(out))
        results.append(out + tape.gradient(loss, [x_t] + layer.trainable_weights))
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5)


@SETTINGS
@given(cases())
def test_go_backwards_equals_forward_on_reversed_input(case):
    kind, batch, steps, dim, units, options, mask, seed = case
    _, fr_cls, extra = PAIRS[kind]
    options = {**options, "return_sequences": True, "go_backwards": False}
    forward = fr_cls(units, **extra, **options)
    backward = fr_cls(units, **extra, **{**options, "go_backwards": True})
    for layer in (forward, backward):
        layer.build((None, steps, dim))
    backward.set_weights(forward.get_weights())
    # haiku's habit: arange inputs starting at 1, so a wrong time index cannot hide
    x = np.arange(1, batch * steps * dim + 1, dtype="float32").reshape(batch, steps, dim)
    x /= x.size
    rev_mask = None if mask is None else mask[:, ::-1]
    got = backward(x, mask=mask)
    want = forward(x[:, ::-1], mask=rev_mask)
    for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 6), st.booleans(), st.integers(0, 1000))
def test_stacked_equals_its_layers_applied_by_hand(depth, steps, residual, seed):
    rng = np.random.default_rng(seed)
    units = 4
    layers = [fr.LSTM(units, return_sequences=True) if i % 2 == 0 else
              fr.GRU(units, return_sequences=True) for i in range(depth)]
    stack = fr.StackedRNN(layers, residual=residual)
    x = rng.normal(size=(2, steps, units)).astype("float32")
    got = stack(x)
    h = x
    for i, layer in enumerate(layers):
        out = layer(h)
        h = out + h if residual and i > 0 else out
    np.testing.assert_allclose(np.asarray(got), np.asarray(h), rtol=1e-6, atol=1e-6)
