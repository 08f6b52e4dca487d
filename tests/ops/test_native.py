"""The fused gate kernels (keras_fancyrnn.ops.native) against references written here: numpy
versions of the LSTM / GRU equations, float64 finite differences, keras.layers with copied
weights, and the cells' plain TensorFlow ops (second derivatives)."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from gradcheck import assert_gradients_match_finite_differences
from graphs import traced_nodes, traced_ops
from kernel_kinds import GATES, SEQUENCE_OPS, layer_kind, mask_patterns, needs_compiler
from tolerance import assert_close, assert_each_close, rounding_chain

import keras_fancyrnn as fr
from keras_fancyrnn.engine import probes as fr_probes
from keras_fancyrnn.ops import build, gradients, native

pytestmark = needs_compiler("the layers run their plain ops")


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def lstm_numpy(z, c_prev):
    """Hochreiter & Schmidhuber with the forget gate of Gers et al.; gates i, f, c, o (Keras)."""
    i, f, g, o = np.split(z, 4, axis=-1)
    c = sigmoid(f) * c_prev + sigmoid(i) * np.tanh(g)
    return sigmoid(o) * np.tanh(c), c


def gru_numpy(xp, rec, h_prev):
    """Cho et al. 2014 with the reset gate after the matmul (Keras's reset_after=True)."""
    x_z, x_r, x_h = np.split(xp, 3, axis=-1)
    r_z, r_r, r_h = np.split(rec, 3, axis=-1)
    z, r = sigmoid(x_z + r_z), sigmoid(x_r + r_r)
    return z * h_prev + (1 - z) * np.tanh(x_h + r * r_h)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernels_equal_the_equations(library, dtype, rng):
    batch, units = 5, 7
    z = rng.normal(size=(batch, 4 * units)) * 2
    c_prev = rng.normal(size=(batch, units))
    h, c = native.lstm_gates(tf.constant(z, dtype), tf.constant(c_prev, dtype))
    h_ref, c_ref = lstm_numpy(z, c_prev)
    tol = 1e-6 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(h.numpy(), h_ref, atol=tol)
    np.testing.assert_allclose(c.numpy(), c_ref, atol=tol)
    xp, rec = rng.normal(size=(2, batch, 3 * units)) * 2
    h_prev = rng.normal(size=(batch, units))
    h = native.gru_gates(*(tf.constant(a, dtype) for a in (xp, rec, h_prev)))
    np.testing.assert_allclose(h.numpy(), gru_numpy(xp, rec, h_prev), atol=tol)


def test_kernel_gradients_equal_finite_differences(library, rng):
    batch, units = 3, 4
    z, weights_h, weights_c = (rng.normal(size=(batch, 4 * units)),
                               rng.normal(size=(batch, units)), rng.normal(size=(batch, units)))
    c_prev = tf.Variable(rng.normal(size=(batch, units)))

    def lstm_loss(z):  # both outputs feed the loss, so both incoming gradients are exercised
        h, c = native.lstm_gates(z, c_prev)
        return tf.reduce_sum(h * weights_h + c * c * weights_c)

    assert_gradients_match_finite_differences(lstm_loss, z, [c_prev], rng)
    xp = rng.normal(size=(batch, 3 * units))
    rec, h_prev = tf.Variable(rng.normal(size=(batch, 3 * units))), tf.Variable(
        rng.normal(size=(batch, units)))

    def gru_loss(xp):
        return tf.reduce_sum(native.gru_gates(xp, rec, h_prev) ** 3 * weights_h)

    assert_gradients_match_finite_differences(gru_loss, xp, [rec, h_prev], rng)


def test_bad_shapes_name_the_input(library):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"KerasFancyrnnLstmGates: input z must have shape \[2, 12\]"):
        native.lstm_gates(tf.zeros((2, 13)), tf.zeros((2, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"KerasFancyrnnGruGates: input rec must have shape \[2, 9\]"):
        native.gru_gates(tf.zeros((2, 9)), tf.zeros((2, 6)), tf.zeros((2, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"input h_prev must have shape \[\?, \?\], got \[2,3,1\]"):
        native.gru_gates(tf.zeros((2, 9)), tf.zeros((2, 9)), tf.zeros((2, 3, 1)))


def _native_ops(fn, *args):
    """The kernel ops in ``fn``'s graph, its loops' bodies included."""
    return sorted(op for op in traced_ops(fn, *args) if op.startswith("KerasFancyrnn"))


def _assert_kernels_equal_plain_ops(fn, x, op, monkeypatch, rtol, atol):
    """``fn(x)`` (a list of tensors) traced with the kernels, whose graph holds ``op``, equals
    ``fn(x)`` traced with the plain TensorFlow ops, whose graph holds no kernel."""
    fr.config.set(native_kernels=True)
    assert op in _native_ops(fn, x)
    fused = tf.function(fn)(x)
    fr.config.set(native_kernels=False)
    assert not _native_ops(fn, x)
    plain = tf.function(fn)(x)
    for a, b in zip(fused, plain, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=atol)


def _copied(kind, rng, **kwargs):
    kind, extra = layer_kind(kind)
    kwargs = {"return_sequences": True, **extra, **kwargs}
    keras.utils.set_random_seed(int(rng.integers(2**31)))  # Keras's initializers: one case a seed
    ours = getattr(fr, kind)(6, **kwargs)
    theirs = getattr(keras.layers, kind)(6, **kwargs)
    ours.build((4, 9, 8))
    theirs.build((4, 9, 8))
    weights = [w + 0.3 * rng.normal(size=w.shape) for w in theirs.get_weights()]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    return ours, theirs


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("kernels", [True, False])
def test_layers_on_the_kernels_equal_keras(library, kind, go_backwards, kernels, rng,
                                           monkeypatch):
    """The loop (sequence kernels off), masked, both directions: outputs and all gradients
    equal keras.layers with copied weights, and the graph really runs the gate kernels
    (input_dim 8 > units 6, so not the LSTM's BlockLSTMV2 path either); and the same for the
    plain ops, which the kernels being on by default would otherwise leave to fewer tests."""
    fr.config.set(native_kernels=kernels, sequence_kernels=False)
    ours, theirs = _copied(kind, rng, go_backwards=go_backwards)
    x = tf.constant(rng.normal(size=(4, 9, 8)).astype("float32"))
    mask = tf.constant(np.arange(9)[None, :] < np.array([9, 7, 3, 1])[:, None])
    weights = tf.constant(rng.normal(size=(4, 9, 6)).astype("float32"))

    def call(layer):
        def fn(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, mask=mask)
                loss = tf.reduce_sum(y * weights)
            return y, tape.gradient(loss, [x, *layer.trainable_weights])
        return fn

    op = {"LSTM": "KerasFancyrnnLstmGates", "GRU": "KerasFancyrnnGruGates"}[kind]
    used = _native_ops(call(ours), x)
    assert (op in used and op + "Grad" in used) if kernels else not used
    (y, grads), (y_ref, grads_ref) = tf.function(call(ours))(x), tf.function(call(theirs))(x)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), atol=2e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g.numpy(), g_ref.numpy(), atol=2e-5)


def _gradient_penalty(kind, rng, batch, variant="plain"):
    """``(fn, x)``: ``fn(x)`` is the gradient of a penalty ‖∂ℓ/∂x‖² with respect to the weights
    of a float64 layer with perturbed weights; ``variant`` ``"masked"`` (a mask of every
    pattern) or ``"probed"`` (nonzero probes on every state)."""
    kind, extra = layer_kind(kind)
    layer = getattr(fr, kind)(5, dtype="float64", **extra)
    x = tf.constant(rng.normal(size=(batch, 6, 4)))
    layer.build(x.shape)
    for w in layer.weights:
        w.assign(w + 0.3 * rng.normal(size=w.shape))
    mask = tf.constant(mask_patterns(batch, 6, rng)) if variant == "masked" else None
    requests = {}
    if variant == "probed":
        requests = {layer: {i: tf.constant(0.1 * rng.normal(size=(batch, 6, 5)))
                            for i in range(2 if kind == "LSTM" else 1)}}

    def penalty_gradient(x):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner, fr_probes.scope(requests):
                inner.watch(x)
                loss = tf.reduce_sum(tf.sin(layer(x, mask=mask)))
            penalty = tf.reduce_sum(inner.gradient(loss, x) ** 2)
        return outer.gradient(penalty, layer.trainable_weights)

    return penalty_gradient, x


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_second_derivatives_equal_the_plain_ops(library, kind, rng, monkeypatch):
    """A gradient penalty (the gradient of ‖∂ℓ/∂x‖² with respect to the weights) is the same
    with the kernels as with the cells' plain TensorFlow ops."""
    fr.config.set(fused_on_cpu=False)
    penalty_gradient, x = _gradient_penalty(kind, rng, batch=3)
    op = {"LSTM": "KerasFancyrnnLstmGatesGrad", "GRU": "KerasFancyrnnGruGatesGrad"}[kind]
    _assert_kernels_equal_plain_ops(penalty_gradient, x, op, monkeypatch, 1e-9, 1e-12)


def test_not_used_under_xla_or_in_a_portable_trace(library, rng):
    layer = fr.GRU(5)
    x = tf.constant(rng.normal(size=(2, 4, 3)).astype("float32"))
    eager = layer(x)
    assert _native_ops(layer, x)
    with fr.portable():
        assert not _native_ops(layer, x)
    xla = tf.function(layer, jit_compile=True)
    np.testing.assert_allclose(xla(x).numpy(), eager.numpy(), atol=1e-6)
    assert "KerasFancyrnn" not in str(xla.experimental_get_compiler_ir(x)(stage="hlo"))


def test_without_a_compiler_the_layers_run_their_plain_ops(monkeypatch, tmp_path, rng):
    """A failed build is reported (load_error, a warning) and not retried in this process, and
    the layers compute the same values."""
    x = tf.constant(rng.normal(size=(2, 5, 3)).astype("float32"))
    layer = fr.GRU(4)
    expected = layer(x)
    monkeypatch.setattr(build, "_state", {"tried": False, "library": None, "error": None})
    monkeypatch.setenv("KERAS_FANCYRNN_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert native.library() is None
    assert "no-such-compiler" in native.load_error()
    monkeypatch.setenv("CXX", "g++")  # tried once per process: no second build
    assert native.library() is None
    assert not _native_ops(layer, x)
    np.testing.assert_allclose(layer(x).numpy(), expected.numpy(), atol=1e-6)


def test_probed_lstm_kernel(library, rng):
    """The probe of c_t enters before c_t feeds h_t: values as the numpy equations with c + p,
    gradients (also the probe's) as float64 finite differences."""
    batch, units = 3, 4
    z, c_prev, probe = (rng.normal(size=(batch, 4 * units)), rng.normal(size=(batch, units)),
                        rng.normal(size=(batch, units)))
    h, c = native.lstm_gates(*(tf.constant(a) for a in (z, c_prev, probe)))
    i, f, g, o = np.split(z, 4, axis=-1)
    c_ref = sigmoid(f) * c_prev + sigmoid(i) * np.tanh(g) + probe
    np.testing.assert_allclose(c.numpy(), c_ref, atol=1e-13)
    np.testing.assert_allclose(h.numpy(), sigmoid(o) * np.tanh(c_ref), atol=1e-13)
    weights = rng.normal(size=(2, batch, units))
    z_var, c_var = tf.Variable(z), tf.Variable(c_prev)

    def loss(p):
        h, c = native.lstm_gates(z_var, c_var, probe=p)
        return tf.reduce_sum(h * weights[0] + tf.sin(c) * weights[1])

    assert_gradients_match_finite_differences(loss, probe, [z_var, c_var], rng)


def test_lstm_with_both_probes_fed_equals_the_plain_ops(library, rng, monkeypatch):
    """What GradientNormMonitor does: zero probes for h_t and c_t; their gradients (∂ℓ/∂h_t,
    ∂ℓ/∂c_t) and the weights' are the same with the kernel as with the plain ops."""
    fr.config.set(fused_on_cpu=False)
    layer = fr.LSTM(5, return_sequences=True, dtype="float64")
    x = tf.constant(rng.normal(size=(3, 6, 4)))
    layer.build(x.shape)
    probes = [tf.zeros((3, 6, 5), tf.float64) for _ in range(2)]
    weights = tf.constant(rng.normal(size=(3, 6, 5)))

    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(probes)
            with fr_probes.scope({layer: dict(enumerate(probes))}):
                loss = tf.reduce_sum(tf.tanh(layer(x)) * weights)
        return tape.gradient(loss, [*probes, *layer.trainable_weights])

    _assert_kernels_equal_plain_ops(gradients, x, "KerasFancyrnnLstmGatesProbed", monkeypatch,
                                    1e-10, 1e-13)


# ---------------------------------------------------------------------------------------------
# Whole-sequence kernels.

def _products_in(fn, *args):
    """The ``product`` attrs of the sequence ops in ``fn``'s graph."""
    return {n.attr["product"].s.decode() for n in traced_nodes(fn, *args)
            if n.op.endswith(("Sequence", "SequenceGrad"))}


@pytest.mark.parametrize("kind", SEQUENCE_OPS)
@pytest.mark.parametrize("go_backwards", [False, True])
def test_sequence_kernels_equal_keras(library, kind, go_backwards, product, rng):
    """Outputs, final states and the gradients of all of them with respect to the inputs, the
    initial states and every weight equal keras.layers with copied weights, with each recurrent
    product; batch 9 splits unevenly over the threads."""
    ours, theirs = _copied(kind, rng, go_backwards=go_backwards, return_state=True)
    x = tf.constant(rng.normal(size=(9, 7, 8)).astype("float32"))
    states = [tf.constant(rng.normal(size=(9, 6)).astype("float32"))
              for _ in range(2 if kind == "LSTM" else 1)]

    def call(layer):
        def fn(x):
            with tf.GradientTape() as tape:
                tape.watch([x, *states])
                outs = layer(x, initial_state=states)
                loss = sum(tf.reduce_sum(tf.sin((k + 1) * o)) for k, o in enumerate(outs))
            return outs, tape.gradient(loss, [x, *states, *layer.trainable_weights])
        return fn

    used = _native_ops(call(ours), x)
    assert SEQUENCE_OPS[kind] in used and SEQUENCE_OPS[kind] + "Grad" in used
    assert _products_in(call(ours), x) == {product}
    (outs, grads), (outs_ref, grads_ref) = tf.function(call(ours))(x), call(theirs)(x)
    # Keras's own rounding on this case: its float32 results against float64 (tests/tolerance.py;
    # the ReLU RNN's gradients can grow along the recurrence, and their rounding with them)
    name, extra = layer_kind(kind)
    exact = getattr(keras.layers, name)(6, return_sequences=True, go_backwards=go_backwards,
                                        return_state=True, dtype="float64", **extra)
    exact.build((9, 7, 8))
    exact.set_weights(theirs.get_weights())
    x, states[:] = tf.cast(x, "float64"), [tf.cast(s, "float64") for s in states]
    outs_64, grads_64 = call(exact)(x)
    chain = rounding_chain(steps=7, batch=9, dim=8, units=6, gates=GATES[kind])  # float32
    assert_each_close(outs, outs_ref, outs_64, chain, "output")
    assert_each_close(grads, grads_ref, grads_64, chain, "gradient")


def _sequence_loss(library, kind, weights, mask=None, reverse=False):
    """A float64 loss of the raw sequence op that uses every output (also ``z`` / ``rec`` and the
    final states, so every gradient input of the gradient kernels is exercised), as a function
    of ``x``, ``w``, the rest and the probes; ``mask`` ``[T, B]`` or ``None``; ``reverse``: the
    steps last first."""
    mask = tf.zeros([0], tf.bool) if mask is None else tf.constant(mask)

    def last(*states):
        return sum(tf.reduce_sum(tf.sin((k + 2) * s)) for k, s in enumerate(states))

    def lstm(x, w, h0, c0, u, b, p_h, p_c):
        z, h, c, h_last, c_last = library.keras_fancyrnn_lstm_sequence(
            x, w, h0, c0, u, b, mask, p_h, p_c, reverse=reverse)
        return tf.reduce_sum(h * weights[0] + c * c * weights[1]) + tf.reduce_sum(
            tf.sin(z)[..., :1]) + last(h_last, c_last)

    def gru(x, w, h0, u, b_rec, b_in, p_h):
        h, rec, h_last, xp = library.keras_fancyrnn_gru_sequence(
            x, w, h0, u, b_rec, b_in, mask, p_h, reverse=reverse)
        return tf.reduce_sum(h ** 3 * weights[0]) + tf.reduce_sum(tf.sin(rec)[..., :1]) + last(
            h_last) + tf.reduce_sum(tf.cos(xp)[..., -1:])

    def rnn(x, w, h0, u, b, p_h, activation="tanh"):
        h, h_last, _ = library.keras_fancyrnn_rnn_sequence(x, w, h0, u, b, mask, p_h,
                                                           activation=activation, reverse=reverse)
        return tf.reduce_sum(h ** 3 * weights[0]) + last(h_last)

    def gru_before(x, w, h0, u, b, p_h):
        h, rec, rh, h_last, xp = library.keras_fancyrnn_gru_before_sequence(
            x, w, h0, u, b, mask, p_h, reverse=reverse)
        return (tf.reduce_sum(h ** 3 * weights[0]) + tf.reduce_sum(tf.sin(rec)[..., :1])
                + tf.reduce_sum(rh * weights[1]) + last(h_last)
                + tf.reduce_sum(tf.cos(xp)[..., -1:]))

    return {"LSTM": lstm, "GRU": gru, "SimpleRNN": rnn,
            "SimpleRNN-relu": lambda *a: rnn(*a, activation="relu"), "GRU-before": gru_before}[kind]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", SEQUENCE_OPS)
def test_sequence_kernel_gradients_equal_finite_differences(library, kind, masked, rng):
    """Every input's gradient, the (nonzero) probes' included, against float64 finite
    differences; with a mask of every pattern, the steps then last first."""
    # batch 8: two shards of four rows on two threads; 9 steps: two of the ops' chunks of x W
    steps, batch, units, dim = 9, 8, 3, 2
    gates = GATES[kind]
    weights = rng.normal(size=(2, steps, batch, units))
    mask = mask_patterns(batch, steps, rng).T if masked else None
    loss = _sequence_loss(library, kind, weights, mask, reverse=masked)
    rest = [tf.Variable(0.5 * rng.normal(size=(dim, gates * units))),
            tf.Variable(0.5 * rng.normal(size=(batch, units)))]
    if kind == "LSTM":
        rest.append(tf.Variable(rng.normal(size=(batch, units))))
    rest.append(tf.Variable(0.5 * rng.normal(size=(units, gates * units))))
    # the biases: b (b_rec and b_in for the GRU), whose gradients the kernels sum
    rest.extend(tf.Variable(rng.normal(size=(gates * units,)))
                for _ in range(2 if kind == "GRU" else 1))
    # the probes of h (and c), added after each step
    rest.extend(tf.Variable(0.3 * rng.normal(size=(steps, batch, units)))
                for _ in range(2 if kind == "LSTM" else 1))
    x = rng.normal(size=(batch, steps, dim))
    assert_gradients_match_finite_differences(lambda x: loss(x, *rest), x, rest, rng)


@pytest.mark.parametrize("variant", ["plain", "masked", "probed"])
@pytest.mark.parametrize("kind", SEQUENCE_OPS)
def test_sequence_kernel_second_derivatives_equal_the_loop(library, kind, variant, rng,
                                                           monkeypatch):
    """A gradient penalty through the sequence kernels (whose gradient kernels' own gradients
    are TensorFlow ops) equals the same penalty through the loop (the step kernels, whose
    second derivatives are tested against the plain ops above); with a mask and with probes."""
    penalty_gradient, x = _gradient_penalty(kind, rng, batch=8, variant=variant)
    assert SEQUENCE_OPS[kind] + "Grad" in _native_ops(penalty_gradient, x)
    fused = tf.function(penalty_gradient)(x)
    fr.config.set(sequence_kernels=False)
    assert not any(op.endswith("Sequence") for op in _native_ops(penalty_gradient, x))
    looped = tf.function(penalty_gradient)(x)
    for a, b in zip(fused, looped, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", SEQUENCE_OPS)
def test_masked_second_derivatives_equal_keras(library, kind, rng):
    """The gradient of ‖∂ℓ/∂(x, initial states)‖² with respect to the weights, through masked
    sequence kernels (every mask pattern, nonzero initial states, backwards), equals
    keras.layers with copied weights, float64."""
    name, extra = layer_kind(kind)
    ours, theirs = (getattr(module, name)(5, dtype="float64", go_backwards=True, **extra)
                    for module in (fr, keras.layers))
    x = tf.constant(rng.normal(size=(8, 6, 4)))
    ours.build(x.shape)
    theirs.build(x.shape)
    weights = [w + 0.3 * rng.normal(size=w.shape) for w in theirs.get_weights()]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    mask = tf.constant(mask_patterns(8, 6, rng))
    states = [tf.constant(0.5 * rng.normal(size=(8, 5))) for _ in range(2 if name == "LSTM" else 1)]

    def penalty_gradient(layer):
        def fn(x):
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    inner.watch([x, *states])
                    loss = tf.reduce_sum(tf.sin(layer(x, initial_state=states, mask=mask)))
                penalty = sum(tf.reduce_sum(g ** 2) for g in inner.gradient(loss, [x, *states]))
            return outer.gradient(penalty, layer.trainable_weights)
        return fn

    assert SEQUENCE_OPS[kind] + "Grad" in _native_ops(penalty_gradient(ours), x)
    got, want = tf.function(penalty_gradient(ours))(x), penalty_gradient(theirs)(x)
    chain = rounding_chain(steps=6, batch=8, dim=4, units=5, gates=GATES[kind])
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(g, w, chain, "float64", name=f"second derivative {k}")


def test_sequence_kernels_reject_bad_shapes_naming_the_input(library):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"KerasFancyrnnLstmSequence: input u must have shape \[3, 12\]"):
        native.lstm_sequence(tf.zeros((2, 5, 4)), tf.zeros((4, 12)), tf.zeros((2, 3)),
                             tf.zeros((2, 3)), tf.zeros((3, 9)))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"KerasFancyrnnLstmSequence: input w must have shape \[4, 12\]"):
        native.lstm_sequence(tf.zeros((2, 5, 4)), tf.zeros((5, 12)), tf.zeros((2, 3)),
                             tf.zeros((2, 3)), tf.zeros((3, 12)))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"KerasFancyrnnLstmSequence: input x must have shape \[2, \?, \?\]"):
        native.lstm_sequence(tf.zeros((3, 5, 4)), tf.zeros((4, 12)), tf.zeros((2, 3)),
                             tf.zeros((2, 3)), tf.zeros((3, 12)))
    x = tf.zeros((2, 5, 4))  # batch 2, 5 steps
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"KerasFancyrnnGruSequence: input mask must have shape \[5, 2\]"):
        native.gru_sequence(x, tf.zeros((4, 9)), tf.zeros((2, 3)), tf.zeros((3, 9)),
                            mask=tf.ones((2, 5), tf.bool))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"input probe_h must have shape \[5, 2, 3\]"):
        native.rnn_sequence(x, tf.zeros((4, 3)), tf.zeros((2, 3)), tf.zeros((3, 3)),
                            probes={0: tf.zeros((5, 2, 4))})
    with pytest.raises(ValueError, match=r"probes: state indices \[1\] do not exist"):
        native.rnn_sequence(x, tf.zeros((4, 3)), tf.zeros((2, 3)), tf.zeros((3, 3)),
                            probes={1: tf.zeros((5, 2, 3))})
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"KerasFancyrnnRnnSequence: input b must have shape \[3\]"):
        native.rnn_sequence(x, tf.zeros((4, 3)), tf.zeros((2, 3)), tf.zeros((3, 3)),
                            b=tf.zeros((4,)))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"KerasFancyrnnGruBeforeSequence: input w must have shape \[4, 9\]"):
        native.gru_before_sequence(x, tf.zeros((4, 6)), tf.zeros((2, 3)), tf.zeros((3, 9)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"input h0 must have shape"):
        native.rnn_sequence(x, tf.zeros((4, 3)), tf.zeros((2, 3, 1)), tf.zeros((3, 3)))


def _sin_gradients(layer, weights=True):
    """``x -> [y, ∂ℓ/∂x, ∂ℓ/∂(each weight)]`` of ``layer``, ``ℓ = Σ sin(y)`` (without the weights'
    where not ``weights``)."""
    def fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(tf.sin(y))
        return [y, *tape.gradient(loss, [x, *(layer.trainable_weights if weights else [])])]
    return fn


@pytest.mark.parametrize("kind", SEQUENCE_OPS)
def test_sequence_kernels_equal_keras_at_a_larger_size(library, kind, product, rng):
    """37 units: whole and partial column panels of the float32 product: the AVX-512 block's 48
    columns wide, whose last panel has three vectors (37 columns, backward), two (74, GRU
    before) or one (111, 148: forward, 3·37 or 4·37 columns); the AVX2 block's 24 columns wide
    (shards of up to 7 rows), whose last panel has two vectors (37, 111) or one (74, 148).
    Batch 13: shards of 6 and 7 rows, so row blocks of 3 and 4 (AVX2) and short eight-row blocks
    (AVX-512)."""
    name, extra = layer_kind(kind)
    ours = getattr(fr, name)(37, return_sequences=True, **extra)
    theirs = getattr(keras.layers, name)(37, return_sequences=True, **extra)
    for layer in (ours, theirs):
        layer.build((13, 5, 8))
    weights = [w + 0.1 * rng.normal(size=w.shape) for w in theirs.get_weights()]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    x = tf.constant(rng.normal(size=(13, 5, 8)).astype("float32"))

    call = _sin_gradients
    assert SEQUENCE_OPS[kind] + "Grad" in _native_ops(call(ours), x)
    assert _products_in(call(ours), x) == {product}
    chain = rounding_chain(steps=5, batch=13, dim=8, units=37, gates=GATES[kind])  # float32
    for k, (a, b) in enumerate(zip(tf.function(call(ours))(x), call(theirs)(x), strict=True)):
        assert_close(a, b, chain, name=f"output {k}" if k == 0 else f"gradient {k - 1}")


@pytest.mark.parametrize("kind", SEQUENCE_OPS)
@pytest.mark.parametrize("steps", [1, 17])
def test_sequence_kernels_in_a_graph_without_gradients_equal_keras(library, kind, steps, product,
                                                                   rng):
    """In a graph that differentiates nothing (inference), a sequence op keeps only a few steps
    of x W and of its states, writing just what the graph reads: the outputs and final states,
    forwards and backwards, with and without a mask (every pattern), equal keras.layers' with
    copied weights, with each recurrent product. 17 steps are two of the ops' chunks of
    projected steps and a part; batch 13 splits into shards of 6 and 7 rows."""
    name, extra = layer_kind(kind)
    x = tf.constant(rng.normal(size=(13, steps, 8)).astype("float32"))
    states = [tf.constant(rng.normal(size=(13, 6)).astype("float32"))
              for _ in range(2 if name == "LSTM" else 1)]
    for go_backwards, return_sequences, masked in itertools.product((False, True), repeat=3):
        mask = tf.constant(mask_patterns(13, steps, rng)) if masked else None
        args = dict(go_backwards=go_backwards, return_state=True,
                    return_sequences=return_sequences)
        ours, theirs = _copied(kind, rng, **args)

        def call(layer, mask=mask):
            return lambda x: layer(x, initial_state=states, mask=mask)

        used = _native_ops(call(ours), x)
        assert SEQUENCE_OPS[kind] in used and "KerasFancyrnnProject" not in used, used
        assert _products_in(call(ours), x) == {product}
        exact = getattr(keras.layers, name)(6, dtype="float64", **args, **extra)
        exact.build(x.shape)
        exact.set_weights(theirs.get_weights())
        want_64 = exact(tf.cast(x, "float64"), mask=mask,
                        initial_state=[tf.cast(s, "float64") for s in states])
        chain = rounding_chain(steps=steps, batch=13, dim=8, units=6, gates=GATES[kind])
        assert_each_close(tf.function(call(ours))(x), call(theirs)(x), want_64, chain,
                          f"output ({args}, masked={masked})")


@pytest.mark.parametrize("kind", SEQUENCE_OPS)
def test_sequence_kernels_keep_their_values_whichever_outputs_are_read(library, kind, rng):
    """An op that writes no sequence (a traced call that reads only the final state) gives the
    final state to the bit of the same op writing every output (eagerly, where every output
    counts as read), masked and backwards over three chunks of steps."""
    name, extra = layer_kind(kind)
    gates, batch, steps = GATES[kind], 11, 20
    x = tf.constant(rng.normal(size=(batch, steps, 5)).astype("float32"))
    w = tf.constant(rng.normal(size=(5, gates * 4)).astype("float32") / 2)
    u = tf.constant(rng.normal(size=(4, gates * 4)).astype("float32") / 2)
    h0 = tf.constant(rng.normal(size=(batch, 4)).astype("float32"))
    mask = tf.constant(mask_patterns(batch, steps, rng).T)
    run = {"LSTM": lambda: native.lstm_sequence(x, w, h0, -h0, u, mask=mask, go_backwards=True),
           "GRU": lambda: native.gru_sequence(x, w, h0, u, mask=mask, go_backwards=True),
           "GRU-before": lambda: native.gru_before_sequence(x, w, h0, u, mask=mask,
                                                            go_backwards=True),
           "SimpleRNN": lambda: native.rnn_sequence(x, w, h0, u, mask=mask, go_backwards=True),
           "SimpleRNN-relu": lambda: native.rnn_sequence(x, w, h0, u, "relu", mask=mask,
                                                         go_backwards=True)}[kind]
    written = run()[1]
    kept = tf.function(lambda: run()[1])()
    for a, b in zip(kept, written, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_lstm_input_gradient_alone_equals_keras(library, rng):
    """The gradient of the inputs alone (a frozen layer; saliency): TensorFlow prunes the
    weight gradients nobody fetches, and with them the only reader of the LSTM's h sequence, so
    its op writes z and c but not h; the gradient and the output equal keras.layers' with copied
    weights."""
    ours, theirs = _copied("LSTM", rng, return_sequences=False, go_backwards=True)
    x = tf.constant(rng.normal(size=(9, 19, 8)).astype("float32"))

    def call(layer):
        return _sin_gradients(layer, weights=False)

    exact = keras.layers.LSTM(6, go_backwards=True, dtype="float64")
    exact.build(x.shape)
    exact.set_weights(theirs.get_weights())
    chain = rounding_chain(steps=19, batch=9, dim=8, units=6)
    assert_each_close(tf.function(call(ours))(x), call(theirs)(x),
                      call(exact)(tf.cast(x, "float64")), chain, "output and gradient")


def test_gradients_of_unused_sequence_outputs_are_not_materialised(library, rng):
    """TensorFlow fills zeros for the unused outputs of an op with a gradient (here the h and c
    sequences and z of a layer that returns only its last output); the gradient kernel gets the
    empty marker instead of [T, B, ...] zeros (the memory of training), and the gradients stay
    equal to keras.layers'."""
    ours, theirs = _copied("LSTM", rng)
    for layer in (ours, theirs):
        layer.return_sequences = False
    x = tf.constant(rng.normal(size=(4, 9, 8)).astype("float32"))

    def call(layer):
        def fn(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x) ** 2)
            return tape.gradient(loss, layer.trainable_weights)
        return fn

    graph = tf.function(call(ours)).get_concrete_function(x).graph
    (grad_op,) = [op for op in graph.get_operations()
                  if op.type == "KerasFancyrnnLstmSequenceGrad"]
    assert [t.shape.as_list() for t in grad_op.inputs[:3]] == [[0], [0], [0]]
    for a, b in zip(tf.function(call(ours))(x), call(theirs)(x), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5)

    @tf.function
    def fills():
        big = tf.ones((40, 40))
        markers = [gradients._known_zero(t) for t in (
            None, tf.zeros_like(big), tf.zeros((40, 40)), tf.zeros((2,)), tf.ones((2,)),
            big * 0, tf.fill([3], 0.5))]
        assert markers == [True, True, True, True, False, False, False], markers
        return big

    fills()


@pytest.mark.parametrize("kind", SEQUENCE_OPS)
def test_sequence_kernels_with_no_timesteps(library, kind):
    """T = 0: the final states are the initial ones, and so are their first and second
    derivatives (a loss on the final states straight through to the initial states)."""
    batch, units = 3, 4
    gates = GATES[kind]
    x, w = tf.zeros((batch, 0, 2), tf.float64), tf.ones((2, gates * units), tf.float64)
    u = tf.fill((units, gates * units), tf.constant(0.1, tf.float64))
    h0 = tf.constant(np.linspace(-1, 1, batch * units).reshape(batch, units))
    run = {"LSTM": lambda h0: native.lstm_sequence(x, w, h0, h0 + 1, u),
           "GRU": lambda h0: native.gru_sequence(x, w, h0, u, tf.zeros((3 * units,), tf.float64)),
           "SimpleRNN": lambda h0: native.rnn_sequence(x, w, h0, u),
           "SimpleRNN-relu": lambda h0: native.rnn_sequence(x, w, h0, u, "relu"),
           "GRU-before": lambda h0: native.gru_before_sequence(x, w, h0, u)}[kind]
    with tf.GradientTape() as outer:
        outer.watch(h0)
        with tf.GradientTape() as inner:
            inner.watch(h0)
            sequence, states = run(h0)
            loss = tf.reduce_sum(states[0] ** 3)
        grad = inner.gradient(loss, h0)
        penalty = tf.reduce_sum(grad)
    assert sequence.shape == (0, batch, units)
    np.testing.assert_array_equal(states[0].numpy(), h0.numpy())
    if kind == "LSTM":
        np.testing.assert_array_equal(states[1].numpy(), h0.numpy() + 1)
    np.testing.assert_allclose(grad.numpy(), 3 * h0.numpy() ** 2)
    np.testing.assert_allclose(outer.gradient(penalty, h0).numpy(), 6 * h0.numpy())
