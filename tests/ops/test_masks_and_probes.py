"""Masks and probes in the whole-sequence kernels. References: keras.layers with copied weights
(masks: every pattern, both directions, ``zero_output_for_mask``, initial states), and the
engine's loop (probes: the values and the gradients ∂ℓ/∂h_t, ∂ℓ/∂c_t it gives). Float64 finite
differences through the masked and probed raw ops are in test_native.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from graphs import traced_ops
from kernel_kinds import GATES, PROJECT_OP, SEQUENCE_OPS, layer_kind, mask_patterns, weight_grad_ops
from tolerance import assert_close, assert_each_close, rounding_chain

import keras_fancyrnn as fr
from keras_fancyrnn.engine import probes as fr_probes

B, T, D, H = 9, 8, 5, 6


def _states(kind, rng):
    return [tf.constant(rng.normal(size=(B, H)).astype("float32"))
            for _ in range(2 if kind == "LSTM" else 1)]


def _kernel_ops(fn, *args):
    return {op for op in traced_ops(fn, *args) if op.startswith("KerasFancyrnn")}


@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("zero_output_for_mask", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("kind", SEQUENCE_OPS)
def test_masked_kernels_equal_keras(library, kind, go_backwards, zero_output_for_mask,
                                    return_sequences, rng):
    """Outputs (the sequence, or the last output), final states and the gradients of all of them
    with respect to the input, the initial states and every weight, with a mask of every
    pattern."""
    name, extra = layer_kind(kind)
    args = dict(return_sequences=return_sequences, return_state=True, go_backwards=go_backwards,
                zero_output_for_mask=zero_output_for_mask, **extra)
    keras.utils.set_random_seed(int(rng.integers(2**31)))  # Keras's initializers: one case a seed
    ours, theirs = getattr(fr, name)(H, **args), getattr(keras.layers, name)(H, **args)
    ours.build((B, T, D))
    theirs.build((B, T, D))
    weights = [w + 0.3 * rng.normal(size=w.shape) for w in theirs.get_weights()]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    x = tf.constant(rng.normal(size=(B, T, D)).astype("float32"))
    mask = tf.constant(mask_patterns(B, T, rng))
    states = _states(kind, rng)

    def call(layer):
        def fn(x):
            with tf.GradientTape() as tape:
                tape.watch([x, *states])
                outs = layer(x, initial_state=states, mask=mask)
                loss = sum(tf.reduce_sum(tf.sin((k + 1) * o)) for k, o in enumerate(outs))
            return outs, tape.gradient(loss, [x, *states, *layer.trainable_weights])
        return fn

    used = _kernel_ops(call(ours), x)
    assert used == {SEQUENCE_OPS[kind], SEQUENCE_OPS[kind] + "Grad", PROJECT_OP,
                    *weight_grad_ops()}
    (outs, grads), (outs_ref, grads_ref) = tf.function(call(ours))(x), call(theirs)(x)
    # Keras's own rounding on this case: its float32 results against float64 (tests/tolerance.py;
    # the ReLU RNN's gradients can grow along the recurrence, and their rounding with them)
    exact = getattr(keras.layers, name)(H, dtype="float64", **args)
    exact.build((B, T, D))
    exact.set_weights(weights)
    x, states[:] = tf.cast(x, "float64"), [tf.cast(s, "float64") for s in states]
    outs_64, grads_64 = call(exact)(x)
    chain = rounding_chain(steps=T, batch=B, dim=D, units=H, gates=GATES[kind])
    assert_each_close(outs, outs_ref, outs_64, chain, "output")
    assert_each_close(grads, grads_ref, grads_64, chain, "gradient")


def _probed(layer, x, mask, probe_values):
    """Outputs, and the gradients of a loss of them with respect to the probes, the input and the
    weights, with probes of the given values on every state."""
    def fn(x):
        probes = {i: tf.constant(v) for i, v in enumerate(probe_values)}
        with tf.GradientTape() as tape:
            tape.watch([x, *probes.values()])
            with fr_probes.scope({layer: probes}):
                out = layer(x, mask=mask)
            loss = tf.reduce_sum(tf.sin(3.0 * out))
        return out, tape.gradient(loss, [*probes.values(), x, *layer.trainable_weights])
    return fn


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("kind", SEQUENCE_OPS)
def test_probes_in_the_kernels_equal_the_loops(library, kind, go_backwards, masked, rng):
    """The probe gradients (∂ℓ/∂h_t, and ∂ℓ/∂c_t of the LSTM) and every other gradient through
    the kernels equal the loop's, zero probes (the monitor's) and nonzero ones alike; masked
    steps have a zero probe gradient in both. In float64: in float32 the two paths' rounding can
    put a ReLU pre-activation on either side of 0, and then no gradient agrees (the float32
    kernels are tested against Keras above and in test_sequence_kernel_properties.py)."""
    name, extra = layer_kind(kind)
    layer = getattr(fr, name)(H, return_sequences=True, go_backwards=go_backwards,
                              dtype="float64", **extra)
    layer.build((B, T, D))
    weights = [w + 0.3 * rng.normal(size=w.shape) for w in layer.get_weights()]
    # a contracting recurrence (U halved): where gradients grow step by step, rounding grows with
    # them, beyond what the bound of tests/tolerance.py assumes (the ReLU RNN's did here)
    weights[1] *= 0.5
    layer.set_weights(weights)
    x = tf.constant(rng.normal(size=(B, T, D)))
    mask = tf.constant(mask_patterns(B, T, rng)) if masked else None
    n_states = 2 if kind == "LSTM" else 1
    chain = rounding_chain(steps=T, batch=B, dim=D, units=H, gates=GATES[kind])
    for scale in (0.0, 0.2):
        values = [scale * rng.normal(size=(B, T, H)) for _ in range(n_states)]
        fn = _probed(layer, x, mask, values)
        assert SEQUENCE_OPS[kind] + "Grad" in _kernel_ops(fn, x)
        out, grads = tf.function(fn)(x)
        with fr.config.scope(sequence_kernels=False, native_kernels=False):
            assert not _kernel_ops(fn, x)
            out_ref, grads_ref = tf.function(fn)(x)
        assert_close(out, out_ref, chain, "float64", name=f"output (probes x {scale})")
        for k, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
            assert_close(g, g_ref, chain, "float64", name=f"gradient {k} (probes x {scale})")
        if masked:
            off = ~mask.numpy()
            for k in range(n_states):
                assert np.all(grads[k].numpy()[off] == 0), f"probe {k} at masked steps"
                assert np.any(grads[k].numpy()[~off] != 0), f"probe {k} at unmasked steps"


@pytest.mark.parametrize("masked", [False, True])
def test_lstm_probes_in_float32_rows_equal_the_loops(library, masked, rng):
    """The float32 LSTM's gate rows run packets of units and the scalar expressions for the
    units past the last whole packet (gate_math.h): 37 units take both at every vector width,
    with the probes of h and c added and their gradients written in each. Against the loop in
    float32, nonzero probes."""
    units = 37
    layer = fr.LSTM(units, return_sequences=True)
    layer.build((B, T, D))
    layer.set_weights([w + 0.3 * rng.normal(size=w.shape) for w in layer.get_weights()])
    x = tf.constant(rng.normal(size=(B, T, D)).astype("float32"))
    mask = tf.constant(mask_patterns(B, T, rng)) if masked else None
    values = [(0.2 * rng.normal(size=(B, T, units))).astype("float32") for _ in range(2)]
    fn = _probed(layer, x, mask, values)
    assert "KerasFancyrnnLstmSequenceGrad" in _kernel_ops(fn, x)
    out, grads = tf.function(fn)(x)
    with fr.config.scope(sequence_kernels=False, native_kernels=False):
        out_ref, grads_ref = tf.function(fn)(x)
    chain = rounding_chain(steps=T, batch=B, dim=D, units=units, gates=4)
    assert_close(out, out_ref, chain, name="output")
    for k, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert_close(g, g_ref, chain, name=f"gradient {k}")
