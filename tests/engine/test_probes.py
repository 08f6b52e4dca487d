"""keras_fancyrnn.engine.probes: scoped probe requests that the engine reads. References: the
tape's own gradient with respect to the input, and the values without probes (within float32
rounding, tests/tolerance.py)."""

import numpy as np
import pytest
import tensorflow as tf
from tolerance import assert_close, rounding_chain

import keras_fancyrnn as fr
from keras_fancyrnn.engine import probes

B, T, D, H = 3, 5, 4, 6


@pytest.mark.parametrize("layer_class", [fr.SimpleRNN, fr.LSTM, fr.GRU])
def test_input_and_state_probes_from_a_function(layer_class, rng):
    layer = layer_class(H, return_sequences=True)
    x = tf.constant(rng.normal(size=(B, T, D)).astype("float32"))
    coef = tf.constant(rng.normal(size=(B, T, H)).astype("float32"))
    plain = layer(x)
    made, calls = {}, []

    def request(called, sequences, mask):
        calls.append((called, tuple(sequences.shape), mask))
        made.update(input=tf.zeros_like(sequences), h=tf.zeros((B, T, H)))
        tape.watch(list(made.values()))
        return {"input": made["input"], 0: made["h"]}

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        with probes.scope({layer: request}):
            out = layer(x)
        loss = tf.reduce_sum(out * coef)
    assert calls == [(layer, (B, T, D), None)]
    # zero probes change nothing (the probed call runs the loop, the plain one the sequence kernel
    # where it can: float32 rounding apart)
    assert_close(out, plain, rounding_chain(T, B, D, H))
    # ∂ℓ/∂p_in is ∂ℓ/∂x; ∂ℓ/∂p_h at the last step is the loss's own coefficient there
    dx, dp_in, dp_h = tape.gradient(loss, [x, made["input"], made["h"]])
    np.testing.assert_allclose(dp_in.numpy(), dx.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dp_h.numpy()[:, -1], coef.numpy()[:, -1], rtol=1e-6)


def test_scopes_nest_and_end(rng):
    layer, other = fr.GRU(H), fr.GRU(H)
    x = tf.zeros((B, T, D))
    outer, inner = {0: tf.zeros((B, T, H))}, {0: tf.ones((B, T, H))}
    with probes.scope({layer: outer}):
        with probes.scope({layer: inner}):
            assert probes.for_call(layer, x)[0] is inner[0]
            assert probes.for_call(other, x) == {}
        assert probes.for_call(layer, x)[0] is outer[0]
    assert probes.for_call(layer, x) == {}


def test_a_probe_changes_the_value_where_it_is_not_zero(rng):
    """The probe is added to h_t after each step: a nonzero probe at the last step moves the
    last output by exactly that much (nothing after it reads it)."""
    layer = fr.SimpleRNN(H)
    x = tf.constant(rng.normal(size=(B, T, D)).astype("float32"))
    bump = np.zeros((B, T, H), "float32")
    bump[:, -1] = 0.5
    with probes.scope({layer: {0: tf.constant(bump)}}):
        bumped = layer(x)
    assert_close(bumped, layer(x).numpy() + 0.5, rounding_chain(T, B, D, H, gates=1))


def test_a_function_request_gets_the_layers_mask(rng):
    """The mask the layer runs with reaches the request (the monitor counts valid steps by it)."""
    layer = fr.GRU(H, return_sequences=True)
    x = tf.constant(rng.normal(size=(B, T, D)).astype("float32"))
    mask = np.arange(T)[None, :] < np.array([[2], [5], [3]])
    seen = []

    def request(called, sequences, got):
        seen.append(got)
        return {}

    with probes.scope({layer: request}):
        layer(x, mask=tf.constant(mask))
    np.testing.assert_array_equal(np.asarray(seen[0]), mask)
