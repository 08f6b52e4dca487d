"""The layers on every Keras backend (TensorFlow, JAX, PyTorch), against references nobody here
wrote: keras.layers with copied weights (outputs and gradients by the backend's own
differentiation, ``backend_grad``), Keras's cells unrolled by hand for truncated BPTT, and the
structure of variational dropout. Off TensorFlow the layers run ``engine/scan.py``; on
TensorFlow the dispatch's paths. Imports no TensorFlow (the matrix also runs without it).
"""

import keras
import numpy as np
import pytest
from backend_grad import layer_grads, to_numpy, value_and_grad
from keras import ops
from ops.kernel_kinds import mask_patterns
from tolerance import assert_close, rounding_chain

import keras_fancyrnn as fr

pytestmark = pytest.mark.all_backends

#: kind -> (Keras layer, fr layer, Keras cell, extra arguments, gates)
KINDS = {
    "simple_rnn": (keras.layers.SimpleRNN, fr.SimpleRNN, keras.layers.SimpleRNNCell, {}, 1),
    "lstm": (keras.layers.LSTM, fr.LSTM, keras.layers.LSTMCell, {}, 4),
    "gru": (keras.layers.GRU, fr.GRU, keras.layers.GRUCell, {}, 3),
    "gru_before": (keras.layers.GRU, fr.GRU, keras.layers.GRUCell, {"reset_after": False}, 3),
}
B, T, D, H = 6, 7, 4, 5
CHAIN = {kind: rounding_chain(T, B, D, H, gates=spec[4]) for kind, spec in KINDS.items()}


@pytest.fixture(autouse=True, scope="module")
def _full_float32():
    """float32 products in full float32 on GPUs, as the tolerances assume: JAX's default GPU
    precision and cuDNN's TF32 round the factors to 10-bit mantissas (no effect on a CPU)."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        with jax.default_matmul_precision("highest"):
            yield
    elif backend == "torch":
        import torch

        previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous
    else:
        yield


def data(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def pair(kind, **options):
    """A Keras layer and an fr layer of ``kind``, built, with the same random weights (random
    biases too, so that bias handling counts)."""
    keras_cls, fr_cls, _, extra, _ = KINDS[kind]
    ref, ours = keras_cls(H, seed=1, **extra, **options), fr_cls(H, seed=1, **extra, **options)
    copy_weights(ref, ours, (B, T, D))
    return ref, ours


def copy_weights(ref, ours, shape):
    ref.build(shape), ours.build(shape)
    rng = np.random.default_rng(7)  # (the weights include the integer dropout seed's state)
    weights = [w + rng.normal(0, 0.3, w.shape).astype(w.dtype) if w.dtype.kind == "f" else w
               for w in ref.get_weights()]
    ref.set_weights(weights)
    ours.set_weights(weights)


def assert_same_calls(ref, ours, inputs, chain, **call_kw):
    """Outputs and gradients (inputs, then every weight) of the two layers agree."""
    out_r, grad_r = layer_grads(ref, inputs, **call_kw)
    out_o, grad_o = layer_grads(ours, inputs, **call_kw)
    assert len(out_r) == len(out_o) and len(grad_r) == len(grad_o)
    for i, (a, b) in enumerate(zip(out_o, out_r)):
        assert_close(a, b, chain, name=f"output {i}")
    for i, (a, b) in enumerate(zip(grad_o, grad_r)):
        assert_close(a, b, chain, name=f"gradient {i}")


#: Options without a mask (test_masks_equal_keras runs return_sequences, return_state,
#: go_backwards and zero_output_for_mask with masks), each on two kinds.
CASES = [
    ("simple_rnn", {}),
    ("lstm", {"return_sequences": True, "return_state": True, "go_backwards": True}),
    ("lstm", {"return_state": True, "unroll": True}),
    ("gru_before", {"return_sequences": True, "unroll": True}),
    ("gru", {"use_bias": False, "activation": "relu", "return_sequences": True}),
    ("simple_rnn", {"use_bias": False, "activation": "relu", "go_backwards": True}),
]


@pytest.mark.parametrize("kind,options", CASES,
                         ids=[k + "-" + "-".join(o) for k, o in CASES])
def test_equals_keras(kind, options):
    ref, ours = pair(kind, **options)
    assert_same_calls(ref, ours, [data(B, T, D)], CHAIN[kind])


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru_before"])
def test_other_gate_activations_equal_keras(kind):
    ref, ours = pair(kind, activation="softsign", recurrent_activation="hard_sigmoid",
                     return_sequences=True)
    assert_same_calls(ref, ours, [data(B, T, D)], CHAIN[kind])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("go_backwards,zero_output", [(False, False), (True, True)])
def test_masks_equal_keras(kind, go_backwards, zero_output):
    """Unmasked, all-masked, left- and right-padded rows, holes and random rows in one batch."""
    mask = mask_patterns(B, T, np.random.default_rng(3))
    ref, ours = pair(kind, return_sequences=True, return_state=True, go_backwards=go_backwards,
                     zero_output_for_mask=zero_output)
    assert_same_calls(ref, ours, [data(B, T, D)], CHAIN[kind], mask=ops.convert_to_tensor(mask))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_initial_state_and_its_gradient_equal_keras(kind):
    ref, ours = pair(kind, return_sequences=True, return_state=True)
    states = [data(B, H, seed=5 + i) for i in range(2 if kind == "lstm" else 1)]

    def call(layer):
        def loss(out):
            return ops.sum(ops.sin(out[0])) + ops.sum(out[-1]), list(out)
        return layer_grads(_WithState(layer), [data(B, T, D), *states], loss=loss)

    (out_r, grad_r), (out_o, grad_o) = call(ref), call(ours)
    for a, b in zip(out_o + grad_o, out_r + grad_r):
        assert_close(a, b, CHAIN[kind])


class _WithState(keras.layers.Layer):
    """``layer(x, initial_state=[states])`` as a layer of positional inputs (for layer_grads)."""

    def __init__(self, layer):
        super().__init__()
        self.inner = layer

    def call(self, x, *states):
        return self.inner(x, initial_state=list(states))


# -- truncated BPTT ----------------------------------------------------------------------------


def truncated_reference(kind, weights, x, coef, k):
    """Outputs and gradients (``x``, then the weights) of ``Σ_t <coef_t, h_t>`` where ``h_t`` is
    Keras's cell unrolled by hand from ``stop_gradient(state_{t-k-1})``: the gradient of output
    ``t`` reaches back at most ``k`` steps (``k=None``: all the way)."""
    _, _, cell_cls, extra, _ = KINDS[kind]
    cell = cell_cls(H, **extra)
    cell.build((B, D))
    cell.set_weights(weights)
    n_states = 2 if kind == "lstm" else 1
    frozen = [v.value for v in cell.non_trainable_variables]  # its dropout seed

    def fn(x, *w):
        def step(x_t, states):
            (h, new), _ = cell.stateless_call(list(w), frozen, x_t, states)
            return h, list(new)

        zero = [ops.zeros((B, H))] * n_states
        forward, states = [], zero
        for t in range(T):  # the forward values, where the truncated unrolls start
            _, states = step(x[:, t], states)
            forward.append(states)
        loss, outputs = 0.0, []
        for t in range(T):
            start = 0 if k is None else max(0, t - k)
            states = zero if start == 0 else [ops.stop_gradient(s) for s in forward[start - 1]]
            for s in range(start, t + 1):
                h, states = step(x[:, s], states)
            outputs.append(h)
            loss = loss + ops.sum(h * coef[:, t])
        return loss, ops.stack(outputs, axis=1)

    return value_and_grad(fn, [x, *weights])


@pytest.mark.parametrize("kind,k", [("simple_rnn", 2), ("lstm", 1), ("lstm", 3), ("gru", 2),
                                    ("gru_before", 2)])
def test_truncation_equals_hand_unrolled_keras_cell(kind, k):
    ours = KINDS[kind][1](H, return_sequences=True, bptt_truncate=k, **KINDS[kind][3])
    copy_weights(pair(kind)[0], ours, (B, T, D))
    x, coef = data(B, T, D), ops.convert_to_tensor(data(B, T, H, seed=9))
    out, grads = layer_grads(ours, [x], loss=lambda o: (ops.sum(o * coef), [o]))
    want_out, want_grads = truncated_reference(kind, ours.get_weights(), x, coef, k)
    assert_close(out[0], want_out, CHAIN[kind], name="outputs")
    for i, (a, b) in enumerate(zip(grads, want_grads)):
        assert_close(a, b, CHAIN[kind], name=f"gradient {i}")


def test_truncation_cuts_the_gradient():
    """With k=1 the last output's gradient reaches x_{T-2} and x_{T-1} only."""
    ours = fr.LSTM(H, return_sequences=True, bptt_truncate=1)
    _, grads = layer_grads(ours, [data(B, T, D)], loss=lambda o: (ops.sum(o[:, -1]), [o]))
    per_step = np.abs(grads[0]).sum(axis=(0, 2))
    assert np.all(per_step[:-2] == 0) and np.all(per_step[-2:] > 0)


# -- dropout ------------------------------------------------------------------------------------


def _linear_rnn(**options):
    """A SimpleRNN ``h_t = x_t + h_{t-1}`` (identity kernels, no bias, linear), whose outputs
    show the dropout masks: Keras's masks are not drawn in the same order as the engine's, so
    the test checks their structure (variational: one mask per sequence) instead."""
    layer = fr.SimpleRNN(D, activation="linear", use_bias=False, return_sequences=True, seed=4,
                         **options)
    layer.build((B, T, D))
    layer.set_weights([np.eye(D, dtype="float32")] * 2)
    return layer


def test_input_dropout_mask_is_constant_over_time():
    rate = 0.5
    layer = _linear_rnn(dropout=rate)
    x = np.zeros((B, T, D), "float32")
    x[:, 1:] = 1.0  # h_t - h_{t-1} = x_t * m = m for t >= 1
    h = to_numpy(layer(x, training=True))
    masks = np.diff(h, axis=1)
    np.testing.assert_allclose(masks, np.broadcast_to(masks[:, :1], masks.shape), atol=1e-6)
    assert set(np.round(masks[:, 0].ravel(), 5)) == {0.0, 1 / (1 - rate)}
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), np.cumsum(x, axis=1))


def test_recurrent_dropout_mask_is_constant_over_time():
    rate = 0.5
    layer = _linear_rnn(recurrent_dropout=rate)
    x = np.zeros((B, T, D), "float32")
    x[:, 0] = 1.0  # h_t = m^t: each step multiplies by the same mask
    h = to_numpy(layer(x, training=True))
    m = h[:, 1]
    for t in range(T):
        np.testing.assert_allclose(h[:, t], m ** t, rtol=1e-6)
    assert set(np.round(m.ravel(), 5)) == {0.0, 1 / (1 - rate)}


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_trains_reproducibly_and_infers_like_keras(kind):
    """With both dropouts: training calls are seeded (same seed, same outputs and gradients),
    finite and not the inference output; inference equals Keras (dropout off)."""
    x = data(B, T, D)
    options = dict(dropout=0.3, recurrent_dropout=0.3, return_sequences=True)
    ref, ours = pair(kind, **options)
    twin = KINDS[kind][1](H, seed=1, **KINDS[kind][3], **options)
    twin.build(x.shape)
    twin.set_weights(ours.get_weights())
    (out_a, grad_a), (out_b, grad_b) = (layer_grads(o, [x], training=True) for o in (ours, twin))
    for a, b in zip(out_a + grad_a, out_b + grad_b):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.isfinite(a))
    inference = to_numpy(ours(x))
    assert np.max(np.abs(out_a[0] - inference)) > 1e-3
    assert_close(inference, to_numpy(ref(x)), CHAIN[kind])


# -- stateful layers, wrappers -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_stateful_carries_state_and_resets_like_keras(kind):
    ref, ours = pair(kind, stateful=True, return_sequences=True)
    chunks = [data(B, T, D, seed=s) for s in (1, 2)]
    outputs = []
    for step, chunk in enumerate(chunks + chunks[:1]):
        if step == 2:  # after a reset the first chunk gives its first output again
            ref.reset_state(), ours.reset_state()
        outputs.append(to_numpy(ours(chunk)))
        assert_close(outputs[-1], to_numpy(ref(chunk)), CHAIN[kind] * 2, name=f"call {step}")
        for a, b in zip(ours.states, ref.states):
            assert_close(to_numpy(a), to_numpy(b), CHAIN[kind] * 2, name=f"state {step}")
    np.testing.assert_array_equal(outputs[2], outputs[0])
    assert np.max(np.abs(outputs[1] - to_numpy(pair(kind, return_sequences=True)[1](chunks[1])))) \
        > 1e-3  # the second call started from the carried state, not zeros


def test_bidirectional_equals_keras(merge_mode="concat"):
    ref = keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True, seed=1),
                                     merge_mode=merge_mode)
    ours = fr.Bidirectional(fr.LSTM(H, return_sequences=True, seed=1), merge_mode=merge_mode)
    copy_weights(ref, ours, (B, T, D))
    mask = ops.convert_to_tensor(mask_patterns(B, T, np.random.default_rng(3)))
    assert_same_calls(ref, ours, [data(B, T, D)], CHAIN["lstm"], mask=mask)


def test_stacked_equals_keras_layers_applied_in_turn():
    ref = keras.Sequential([keras.layers.GRU(H, return_sequences=True, seed=1),
                            keras.layers.LSTM(H, return_sequences=True, seed=2),
                            keras.layers.SimpleRNN(H, seed=3)])
    ours = fr.StackedRNN([fr.GRU(H, return_sequences=True), fr.LSTM(H, return_sequences=True),
                          fr.SimpleRNN(H)])
    copy_weights(ref, ours, (B, T, D))
    assert_same_calls(ref, ours, [data(B, T, D)], 3 * CHAIN["lstm"])


# -- models: save and load, training -----------------------------------------------------------


def every_layer_model():
    """A model with each fr recurrent layer (its weights as built, from fixed seeds)."""
    keras.utils.set_random_seed(11)
    inputs = keras.Input((T, D), batch_size=B)
    x = fr.Bidirectional(fr.LSTM(H, return_sequences=True))(inputs)
    x = fr.StackedRNN([fr.GRU(H, return_sequences=True),
                       fr.GRU(H, return_sequences=True, reset_after=False)])(x)
    x = fr.RNN(fr.SimpleRNNCell(H), return_sequences=True)(x)
    x = fr.SimpleRNN(H, return_sequences=True, bptt_truncate=2)(x)
    return keras.Model(inputs, fr.LSTM(H)(x))


def test_keras_file_round_trip(tmp_path):
    model = every_layer_model()
    x = data(B, T, D)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


def sgd_pair(kind):
    """The Keras layer and the fr layer of ``kind``, each in a compiled model with a Dense head,
    the same weights and plain SGD (any difference in a step is a difference in gradients)."""
    ref_layer, our_layer = pair(kind, return_sequences=True)
    models = []
    for layer in (ref_layer, our_layer):
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((T, D)), layer, keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        models.append(model)
    models[1].layers[-1].set_weights(models[0].layers[-1].get_weights())
    return models


@pytest.mark.parametrize("kind", ["gru"])
def test_fit_steps_equal_keras(kind):
    """Two epochs of two batches each (compiled train steps: jit on JAX), weights compared."""
    ref, ours = sgd_pair(kind)
    x, y = data(2 * B, T, D), data(2 * B, T, 1, seed=2)
    history = [m.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0).history["loss"]
               for m in (ref, ours)]
    assert history[1][1] < history[1][0]
    np.testing.assert_allclose(history[1], history[0], rtol=tolerance_of(kind))
    for a, b in zip(ours.get_weights(), ref.get_weights()):
        assert_close(a, b, 4 * CHAIN[kind], name="weights after fit")


def tolerance_of(kind):
    from tolerance import tolerance

    return tolerance(4 * CHAIN[kind], "float32")


def test_train_on_batch_equals_keras():
    ref, ours = sgd_pair("lstm")
    x, y = data(B, T, D), data(B, T, 1, seed=2)
    before = ours.get_weights()
    for model in (ref, ours):
        model.train_on_batch(x, y)
    for i, (a, b, w) in enumerate(zip(ours.get_weights(), ref.get_weights(), before)):
        assert_close(a - w, b - w, CHAIN["lstm"], name=f"update of weight {i}")


#: The path each layer of every_layer_model takes off TensorFlow (PyTorch runs LSTM and GRU with
#: its equations, no mask and no truncation in its own kernel; JAX runs the keras.ops loop).
TORCH_PATHS = ["torch_rnn", "torch_rnn", "torch_rnn", "scan", "scan", "scan", "torch_rnn"]


def test_explain_names_the_paths():
    model = every_layer_model()
    plans = fr.explain(model, data(B, T, D))
    backend = keras.config.backend()
    expected = {"torch": TORCH_PATHS, "jax": ["scan"] * 7}.get(backend)
    assert len(plans) == 7  # two directions, two stacked, three more
    for plan, path in zip(plans, expected or [None] * 7):
        assert plan.path == path if expected else plan.path not in ("scan", "torch_rnn"), plan
    if backend == "torch":
        assert "reset_after=False" in plans[3].reason


@pytest.mark.parametrize("kind,use_bias", [("lstm", True), ("gru", True), ("gru", False)])
def test_fused_path_equals_keras_and_the_loop(kind, use_bias):
    """The fastest path of each backend for LSTM/GRU (PyTorch's kernel on torch; the
    sequence kernel on TensorFlow's CPU) against Keras and against the engine's loop
    (fused_on_cpu=False), with initial states, go_backwards and return_state."""
    ref, ours = pair(kind, return_sequences=True, return_state=True, go_backwards=True,
                     use_bias=use_bias)
    states = [data(B, H, seed=5 + i) for i in range(2 if kind == "lstm" else 1)]
    inputs = [data(B, T, D), *states]
    with fr.config.scope(fused_on_cpu=False):
        loop_out, loop_grads = layer_grads(_WithState(ours), inputs)
        loop_path = fr.explain(ours, inputs[0])[0].path
    fast = fr.explain(ours, inputs[0])[0].path
    if keras.config.backend() == "torch":
        assert (fast, loop_path) == ("torch_rnn", "scan")
    out, grads = layer_grads(_WithState(ours), inputs)
    want_out, want_grads = layer_grads(_WithState(ref), inputs)
    for got, loop, want in zip(out + grads, loop_out + loop_grads, want_out + want_grads):
        assert_close(got, want, CHAIN[kind])
        assert_close(got, loop, CHAIN[kind])
