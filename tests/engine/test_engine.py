"""The engine against independent references: the WildML numpy BPTT, hand-unrolled Keras cells
under a GradientTape, float64 finite differences, and reversal/unroll identities."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from gradcheck import assert_gradients_match_finite_differences
from tolerance import assert_close, rounding_chain

import keras_fancyrnn as fr
from keras_fancyrnn import engine
from keras_fancyrnn.engine import dispatch
from keras_fancyrnn.engine import probes as fr_probes
from keras_fancyrnn.ops import native

B, T, D, H = 2, 8, 3, 4

CELLS = {
    "simple_rnn": (fr.SimpleRNN, keras.layers.SimpleRNNCell, {}),
    "lstm": (fr.LSTM, keras.layers.LSTMCell, {}),
    "gru": (fr.GRU, keras.layers.GRUCell, {}),
    "gru_reset_before": (fr.GRU, keras.layers.GRUCell, {"reset_after": False}),
}


def build(kind, dtype="float32", **kw):
    fr_cls, keras_cell_cls, extra = CELLS[kind]
    layer = fr_cls(H, return_sequences=True, dtype=dtype, **extra, **kw)
    layer.build((None, T, D))
    rng = np.random.default_rng(3)
    layer.set_weights([rng.normal(0, 0.6, w.shape).astype(dtype) for w in layer.get_weights()])
    ref_cell = keras_cell_cls(H, dtype=dtype, **extra)
    ref_cell.build((None, D))
    ref_cell.set_weights(layer.get_weights())
    return layer, ref_cell


def data(dtype="float32"):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(B, T, D)).astype(dtype)
    coef = rng.normal(size=(B, T, H)).astype(dtype)
    return x, coef


def wildml_truncated_bptt(x, coef, W, U, b, k):
    """Denny Britz's WildML `bptt` for h_t = tanh(x_t W + h_{t-1} U + b) and the loss
    sum_t <coef_t, h_t>: for every output t walk back to max(0, t - k). Returns the gradients of
    W, U, b, x and the (truncated) total derivative dl/dh_t."""
    n, steps, _ = x.shape
    h = np.zeros((n, steps + 1, U.shape[0]))  # h[:, s + 1] is h_s; h[:, 0] is h_{-1} = 0
    for s in range(steps):
        h[:, s + 1] = np.tanh(x[:, s] @ W + h[:, s] @ U + b)
    dW, dU, db = np.zeros_like(W), np.zeros_like(U), np.zeros_like(b)
    dx, dh = np.zeros_like(x), np.zeros((n, steps, U.shape[0]))
    for t in range(steps):
        g = coef[:, t]
        lowest = 0 if k is None else max(0, t - k)
        for s in range(t, lowest - 1, -1):
            dh[:, s] += g
            delta = g * (1.0 - h[:, s + 1] ** 2)
            dW += x[:, s].T @ delta
            dU += h[:, s].T @ delta
            db += delta.sum(0)
            dx[:, s] += delta @ W.T
            g = delta @ U.T
    return dW, dU, db, dx, dh


def probed_gradients(layer, x, coef):
    """Weight, input and probe gradients of sum_t <coef_t, h_t> through the fr layer."""
    x = tf.convert_to_tensor(x)
    probe = tf.zeros((B, T, H), x.dtype)
    with tf.GradientTape() as tape:
        tape.watch([x, probe])
        with fr_probes.scope({layer: {0: probe}}):
            out = layer(x)
        loss = tf.reduce_sum(out * coef)
    grads = tape.gradient(loss, layer.trainable_weights + [x, probe])
    return out.numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize("k", [None, 1, 3, T - 1, T + 5])
def test_truncation_matches_wildml_numpy(k):
    layer, _ = build("simple_rnn", dtype="float64", bptt_truncate=k)
    x, coef = data("float64")
    W, U, b = layer.get_weights()
    out, (gW, gU, gb, gx, gh) = probed_gradients(layer, x, coef)
    dW, dU, db, dx, dh = wildml_truncated_bptt(x, coef, W, U, b, k)
    for got, want in [(gW, dW), (gU, dU), (gb, db), (gx, dx), (gh, dh)]:
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # forward values unchanged (the untruncated layer may run the sequence kernel: float64
    # rounding apart)
    full, _ = probed_gradients(build("simple_rnn", dtype="float64")[0], x, coef)
    assert_close(out, full, rounding_chain(T, B, D, H, gates=1), dtype="float64")


def hand_unrolled(ref_cell, x, coef, k=None):
    """Reference through Keras's own cell: the loss of output t is computed by unrolling from
    stop_gradient(state_{t-k-1}), which is what "gradients flow back at most k steps" means.
    Returns weight grads, input grads and dl/dh_t (total, through the unrolled graph)."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        n_states = 2 if isinstance(ref_cell, keras.layers.LSTMCell) else 1
        zero = [tf.zeros((B, H), x.dtype)] * n_states
        # forward values (every path), kept for the stopped starting points
        states, values = zero, []
        for t in range(T):
            _, states = ref_cell(x[:, t], states)
            states = list(states) if isinstance(states, (list, tuple)) else [states]
            values.append(states)
        hs_per_level, loss = [], 0.0
        for t in range(T):
            start = 0 if k is None else max(0, t - k)
            s_state = zero if start == 0 else [tf.stop_gradient(v) for v in values[start - 1]]
            hs = {}
            for s in range(start, t + 1):
                h, s_state = ref_cell(x[:, s], s_state)
                s_state = list(s_state) if isinstance(s_state, (list, tuple)) else [s_state]
                hs[s] = h
            loss += tf.reduce_sum(hs[t] * coef[:, t])
            hs_per_level.append(hs)
    gw = tape.gradient(loss, ref_cell.trainable_weights)
    gx = tape.gradient(loss, x)
    dh = np.zeros((B, T, H))
    for hs in hs_per_level:
        for s, h in hs.items():
            g = tape.gradient(loss, h)
            # each unrolled copy of h_s is a separate path; their sum is dl/dh_s
            dh[:, s] += 0.0 if g is None else g.numpy()
    return [g.numpy() for g in gw], gx.numpy(), dh


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("k", [None, 2])
def test_probe_and_truncation_match_hand_unrolled_keras_cell(kind, k):
    layer, ref_cell = build(kind, dtype="float64", bptt_truncate=k)
    x, coef = data("float64")
    _, grads = probed_gradients(layer, x, coef)
    want_w, want_x, want_dh = hand_unrolled(ref_cell, x, coef, k)
    n_w = len(want_w)
    for got, want in zip(grads[:n_w], want_w):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(grads[n_w], want_x, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(grads[n_w + 1], want_dh, rtol=1e-8, atol=1e-10)


def test_probe_is_total_not_direct_derivative():
    layer, _ = build("lstm")
    x, coef = data()
    coef[:, :-1] = 0.0  # only the last output enters the loss
    _, grads = probed_gradients(layer, x, coef)
    dh = grads[-1]
    assert np.all(np.linalg.norm(dh[:, :-1], axis=-1) > 0)  # the direct term would be 0 there


def test_probe_at_masked_steps_is_zero_and_probe_free_when_unset():
    layer, _ = build("gru")
    x, coef = data()
    mask = np.ones((B, T), bool)
    mask[0, 5:] = False
    probe = tf.zeros((B, T, H))
    with tf.GradientTape() as tape:
        tape.watch(probe)
        with fr_probes.scope({layer: {0: probe}}):
            out = layer(x, mask=mask)
        loss = tf.reduce_sum(out * coef)
    dh = tape.gradient(loss, probe).numpy()
    np.testing.assert_array_equal(dh[0, 5:], 0.0)
    assert np.all(dh[0, :5] != 0.0)
    np.testing.assert_array_equal(layer(x, mask=mask), out)  # the zero probe changes nothing


@pytest.mark.parametrize("kind", CELLS)
def test_finite_differences_float64(kind):
    layer, _ = build(kind, dtype="float64", return_state=True)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(B, T, D))
    mask = np.ones((B, T), bool)
    mask[1, 6:] = False

    def loss_of(x_):
        out, *states = layer(x_, mask=mask)
        return tf.reduce_sum(tf.sin(out)) + sum(tf.reduce_sum(s ** 2) for s in states)

    # inputs in full; weights along random directions (central differences)
    assert_gradients_match_finite_differences(loss_of, x, layer.trainable_weights, rng)


@pytest.mark.parametrize("kind", CELLS)
def test_step_by_step_unroll_of_cell_equals_layer(kind):
    layer, _ = build(kind)
    x, _ = data()
    states = layer.cell.get_initial_state(B)
    outs = []
    for t in range(T):  # the Keras cell contract, one call per step
        out, states = layer.cell(x[:, t], states)
        outs.append(out)
    np.testing.assert_allclose(layer(x), np.stack(outs, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", CELLS)
def test_go_backwards_equals_forward_on_reversed_input(kind):
    layer, _ = build(kind)
    fr_cls, _, extra = CELLS[kind]
    backwards = fr_cls(H, return_sequences=True, go_backwards=True, **extra)
    backwards.build((None, T, D))
    backwards.set_weights(layer.get_weights())
    x = np.arange(1, B * T * D + 1, dtype="float32").reshape(B, T, D) / (B * T * D)
    np.testing.assert_allclose(backwards(x), layer(x[:, ::-1]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", CELLS)
def test_unrolled_equals_while_loop_with_truncation_and_mask(kind):
    layer, _ = build(kind, bptt_truncate=2)
    fr_cls, _, extra = CELLS[kind]
    unrolled = fr_cls(H, return_sequences=True, unroll=True, bptt_truncate=2, **extra)
    unrolled.build((None, T, D))
    unrolled.set_weights(layer.get_weights())
    x, coef = data()
    mask = np.ones((B, T), bool)
    mask[0, 3] = False
    outs = []
    for lyr in (layer, unrolled):
        with tf.GradientTape() as tape:
            out = lyr(x, mask=mask)
            loss = tf.reduce_sum(out * coef)
        outs.append([out] + tape.gradient(loss, lyr.trainable_weights))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_truncation_with_a_static_batch_size():
    # a fixed batch (predict, exports with a batch in the signature) keeps static loop shapes
    model = keras.Sequential([keras.Input((T, D), batch_size=B), fr.LSTM(H, bptt_truncate=2)])
    x, _ = data()
    np.testing.assert_allclose(model.predict(x, verbose=0), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", CELLS)
def test_hoisted_and_per_step_projection_agree(kind):
    """The loop with ``x W + b`` hoisted before it (what runs on a GPU) equals the loop that
    projects inside each step (what runs on a CPU)."""
    layer, _ = build(kind)
    x, coef = data()
    mask = tf.constant(np.arange(T)[None, :] < np.array([T, 5, T])[:B, None])
    results = []
    for hoist in (True, False):
        plan = dispatch.Plan(layer.name, "loop", "the test's", hoist_inputs=hoist)
        with tf.GradientTape() as tape:
            _, out, _ = engine.run(layer.cell, x, layer.cell.get_initial_state(B), mask=mask,
                                   training=True, bptt_truncate=3, plan=plan)
            loss = tf.reduce_sum(out * coef)
        results.append([out] + tape.gradient(loss, layer.trainable_weights))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _loop_body_sizes(fn, *args):
    """Node counts of every while-loop body in ``fn``'s traced graph (forward and gradient)."""
    graph_def = tf.function(fn).get_concrete_function(*args).graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    nodes = [n for f in library.values() for n in f.node_def] + list(graph_def.node)
    return sorted(len(library[n.attr["body"].func.name].node_def) for n in nodes
                  if n.op in ("While", "StatelessWhile"))


@pytest.mark.parametrize("kind", ["simple_rnn", "lstm", "gru"])
def test_unused_probe_and_truncation_add_no_ops(kind, monkeypatch):
    """With no probe and no truncation the engine's loop has exactly the ops of a bare
    ``tf.while_loop`` over the cell's own projection and step (written here), forward and
    gradient: the features cost nothing when unused (benchmarks/unused_features.py times it)."""
    fr.config.set(fused_on_cpu=False)  # this is about the loop
    layer, _ = build(kind)
    layer.return_sequences = False
    cell = layer.cell
    x = tf.constant(np.random.default_rng(0).normal(size=(B, T, D)).astype("float32"))

    def bare(x):
        xs = tf.transpose(x, [1, 0, 2])
        xs_ta = tf.TensorArray(tf.float32, size=T, element_shape=xs.shape[1:]).unstack(xs)
        states = cell.get_initial_state(B)
        states = states if isinstance(states, list) else [states]

        def body(t, *states):
            _, new = cell.step(cell.project_inputs(xs_ta.read(t)), list(states))
            return (t + 1, *(new if isinstance(new, (list, tuple)) else [new]))

        with cell.weights_read_once():
            return tf.while_loop(lambda t, *_: t < T, body, (tf.constant(0), *states),
                                 maximum_iterations=T, parallel_iterations=32,
                                 swap_memory=True)[1]

    def trained(call):
        def fn(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(call(x) ** 2)
            return tape.gradient(loss, cell.trainable_weights)
        return fn

    ours = _loop_body_sizes(trained(layer), x)
    assert len(ours) == 2  # the forward loop and its gradient loop
    assert ours == _loop_body_sizes(trained(bare), x)
    # and the probe does add ops where it is used
    with fr_probes.scope({layer: {0: tf.zeros((B, T, H))}}):
        assert _loop_body_sizes(trained(layer), x)[0] > ours[0]


def _ops(fn, *args):
    return {op.type for op in tf.function(fn).get_concrete_function(*args).graph.get_operations()}


#: The engine's whole-sequence paths: layer, the op that marks the path in the graph, and whether
#: it is keras_fancyrnn.ops.native's sequence kernel (else TensorFlow's BlockLSTMV2, which runs
#: where the native kernels are switched off or cannot be built).
FUSED_PATHS = {
    "lstm_block": ("LSTM", "BlockLSTMV2", False),
    "lstm_sequence": ("LSTM", "KerasFancyrnnLstmSequence", True),
    "gru_sequence": ("GRU", "KerasFancyrnnGruSequence", True),
    "simple_rnn_sequence": ("SimpleRNN", "KerasFancyrnnRnnSequence", True),
    # the IRNN's activation (Le et al. 2015) on the same kernel
    "simple_rnn_relu_sequence": ("SimpleRNN-relu", "KerasFancyrnnRnnSequence", True),
    "gru_before_sequence": ("GRU-before", "KerasFancyrnnGruBeforeSequence", True),
}
#: Layer arguments of the FUSED_PATHS kinds that are not plain layer names.
VARIANTS = {"SimpleRNN-relu": {"activation": "relu"}, "GRU-before": {"reset_after": False}}


def _on_path(path, monkeypatch):
    """Sets up ``FUSED_PATHS[path]``; returns (layer class, op, number of states)."""
    kind, op, native_sequence = FUSED_PATHS[path]
    if native_sequence and native.library() is None:
        pytest.skip(f"no native kernels here: {native.load_error()}")
    fr.config.set(sequence_kernels=native_sequence)
    layer_class = functools.partial(getattr(fr, kind.partition("-")[0]), **VARIANTS.get(kind, {}))
    return layer_class, op, 2 if kind == "LSTM" else 1


@pytest.mark.parametrize("path", FUSED_PATHS)
@pytest.mark.parametrize("options", [
    {}, {"go_backwards": True}, {"return_sequences": False, "return_state": True},
    {"use_bias": False}, {"unit_forget_bias": False}, {"dropout": 0.3, "seed": 7},
    {"bptt_truncate": T - 1},  # cuts nothing, so the fused kernel may run
])
def test_fused_kernel_equals_loop(path, options, monkeypatch):
    """Each whole-sequence kernel (BlockLSTMV2 with the V2 gradient kernel; the native sequence
    kernels) computes what the loop over the cell's step computes: outputs, final states, and
    gradients with respect to the inputs, the initial states and every weight."""
    layer_class, op, n_states = _on_path(path, monkeypatch)
    if "unit_forget_bias" in options and layer_class.func is not fr.LSTM:
        pytest.skip("an LSTM argument")
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(B, T, D)).astype("float32"))
    states = [tf.constant(rng.normal(size=(B, H)).astype("float32")) for _ in range(n_states)]
    kwargs = {"return_sequences": True, **options}
    training = "dropout" in options

    def run(fused):
        fr.config.set(fused_on_cpu=fused)
        layer = layer_class(H, **kwargs)
        layer.build((None, T, D))
        layer.set_weights([np.random.default_rng(9).normal(0, 0.6, w.shape).astype("float32")
                           for w in layer.get_weights()])
        with tf.GradientTape() as tape:
            tape.watch([x, *states])
            out = layer(x, initial_state=states, training=training)
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            loss = sum(tf.reduce_sum(o ** 2 + o) for o in outs)
        grads = tape.gradient(loss, [x, *states] + layer.trainable_weights)
        used = op in _ops(lambda x: layer(x, initial_state=states, training=training), x)
        return outs, grads, used

    loop_outs, loop_grads, loop_used = run(False)
    fused_outs, fused_grads, fused_used = run(True)
    assert fused_used and not loop_used
    for a, b in zip(fused_outs, loop_outs, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-6)
    assert len(fused_grads) == len(loop_grads)
    for a, b in zip(fused_grads, loop_grads):
        if options.get("use_bias") is False and a is None:
            continue
        # float32 rounding: gradients reach ~10 here (weights of std 0.6), summed in another
        # order than the loop's (one product over all timesteps, Eigen's or oneDNN's blocking)
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", [p for p in FUSED_PATHS if p != "lstm_block"])
def test_sequence_kernels_only_where_they_apply(path, monkeypatch):
    """The native sequence kernels replace the loop for every batch, size and float dtype, with
    masks and probes, and not where they would compute something else (truncation, recurrent
    dropout, other activations), in portable traces or under XLA."""
    layer_class, op, _ = _on_path(path, monkeypatch)
    x = tf.zeros((B, T, D))

    def uses(layer, x=x, **call):
        return op in _ops(lambda x: layer(x, **call), x)

    assert uses(layer_class(H))
    assert uses(layer_class(200))
    assert uses(layer_class(H, dtype="float64"), x=tf.zeros((B, T, D), tf.float64))
    assert uses(layer_class(H), mask=tf.ones((B, T), bool))
    assert not uses(layer_class(H, bptt_truncate=2))
    assert not uses(layer_class(H, recurrent_dropout=0.2), training=True)
    assert not uses(layer_class(H, activation="sigmoid"))
    assert not uses(layer_class(H, unroll=True))
    probed = layer_class(H)
    with fr_probes.scope({probed: {0: tf.zeros((B, T, H))}}):
        assert uses(probed)
    with fr.portable():
        assert not uses(layer_class(H))
    fr.config.set(native_kernels=False)
    assert not uses(layer_class(H))


@pytest.mark.parametrize("path", [p for p in FUSED_PATHS if p != "lstm_block"])
def test_sequence_kernels_with_unknown_batch_and_length(path, monkeypatch):
    """Traced with an unknown batch size and sequence length (no tf.cond: every batch runs the
    kernel), outputs and gradients equal the loop's at several shapes, including batch sizes
    that split unevenly over the threads and a single row."""
    layer_class, op, _ = _on_path(path, monkeypatch)
    layer = layer_class(H, return_sequences=True)
    layer.build((None, None, D))

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y ** 2)
        return [y, *tape.gradient(loss, [x] + layer.trainable_weights)]

    dynamic = tf.function(grads, input_signature=[tf.TensorSpec((None, None, D))])
    assert op in {n.op for n in dynamic.get_concrete_function().graph.as_graph_def().node}
    for batch, steps in [(1, 3), (9, T), (13, 1)]:
        x = tf.constant(np.random.default_rng(batch).normal(size=(batch, steps, D)),
                        tf.float32)
        got = dynamic(x)
        fr.config.set(fused_on_cpu=False)
        want = grads(x)
        fr.config.set(fused_on_cpu=True)
        # float32 rounding, relative too: ReLU's values reach ~400, and the kernel adds the
        # bias in another order than the loop (dW differed by 6e-7 relative in 1 of 30 seeds)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-5)


def test_fused_lstm_kernel_only_where_it_applies(monkeypatch):
    """BlockLSTMV2 (where the native sequence kernels are off): the loop stays where the kernel
    would compute something else (mask, probe, truncation, recurrent dropout, other activations,
    float64), where it measured slower (big layers), in portable traces and under XLA; a
    dynamic batch size decides at run time."""
    fr.config.set(sequence_kernels=False)
    x = tf.zeros((B, T, D))

    def uses(layer, x=x, **call):
        return "BlockLSTMV2" in _ops(lambda x: layer(x, **call), x)

    assert uses(fr.LSTM(H))
    assert not uses(fr.LSTM(H), mask=tf.ones((B, T), bool))
    assert not uses(fr.LSTM(H, bptt_truncate=2))
    assert not uses(fr.LSTM(H, recurrent_dropout=0.2), training=True)
    assert not uses(fr.LSTM(H, activation="relu"))
    assert not uses(fr.LSTM(H, dtype="float64"), x=tf.zeros((B, T, D), tf.float64))
    assert not uses(fr.LSTM(128))  # measured slower than the loop at this size
    probed = fr.LSTM(H)
    with fr_probes.scope({probed: {0: tf.zeros((B, T, H))}}):
        assert not uses(probed)
    with fr.portable():
        assert not uses(fr.LSTM(H))
    layer = fr.LSTM(H)
    xla = tf.function(lambda x: layer(x), jit_compile=True)
    np.testing.assert_allclose(xla(x).numpy(), layer(x).numpy(), atol=1e-6)
    # unknown batch size: both paths in the graph, a tf.cond picks one per call
    dynamic = tf.function(lambda x: layer(x), input_signature=[tf.TensorSpec((None, T, D))])
    graph_def = dynamic.get_concrete_function().graph.as_graph_def()
    assert {"If", "StatelessIf"} & {n.op for n in graph_def.node}
    assert "BlockLSTMV2" in {n.op for f in graph_def.library.function for n in f.node_def}
    limit = layer.cell.block_lstm_batch_limit(D, "float32")
    big = tf.constant(np.random.default_rng(0).normal(size=(limit + 1, T, D)).astype("float32"))
    np.testing.assert_allclose(dynamic(big).numpy(), layer(big).numpy(), atol=1e-6)


def test_fused_lstm_dynamic_batch_gradients_equal_loop(monkeypatch):
    """With an unknown batch size BlockLSTMV2 runs under a tf.cond; gradients through it equal
    the loop's, below and above the batch limit."""
    fr.config.set(sequence_kernels=False)
    layer = fr.LSTM(H)
    layer.build((None, T, D))
    limit = layer.cell.block_lstm_batch_limit(D, "float32")

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    dynamic = tf.function(grads, input_signature=[tf.TensorSpec((None, T, D))])
    for batch in (B, limit + 1):
        x = tf.constant(np.random.default_rng(batch).normal(size=(batch, T, D)).astype("float32"))
        got = dynamic(x)
        fr.config.set(fused_on_cpu=False)
        want = grads(x)
        fr.config.set(fused_on_cpu=True)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["simple_rnn", "lstm", "gru"])
def test_weights_read_once_before_the_loop_and_restored(kind, monkeypatch):
    """The loop reads no variable (its body is free of ReadVariableOp), the cell holds its
    variables again afterwards (also after a failure inside), and training still updates them."""
    fr.config.set(fused_on_cpu=False)
    layer, _ = build(kind)
    x = tf.constant(np.random.default_rng(0).normal(size=(B, T, D)).astype("float32"))
    graph_def = tf.function(layer).get_concrete_function(x).graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    bodies = [library[n.attr["body"].func.name] for n in graph_def.node
              if n.op in ("While", "StatelessWhile")]
    assert len(bodies) == 1
    assert not [n for n in bodies[0].node_def if n.op == "ReadVariableOp"]
    cell = layer.cell
    assert all(isinstance(getattr(cell, n), keras.Variable)
               for n in ("kernel", "recurrent_kernel", "bias"))
    with pytest.raises(RuntimeError, match="inside"):
        with cell.weights_read_once():
            assert not isinstance(cell.kernel, keras.Variable)
            raise RuntimeError("inside")
    assert isinstance(cell.kernel, keras.Variable)
    assert len(layer.trainable_weights) == 3
    before = [w.numpy() for w in layer.trainable_weights]
    optimizer = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    optimizer.apply(tape.gradient(loss, layer.trainable_weights), layer.trainable_weights)
    assert all(not np.allclose(a, w.numpy()) for a, w in zip(before, layer.trainable_weights))


def test_weights_read_once_is_held_against_other_threads():
    """While one thread has the cell's weights swapped for tensors, another thread's call of the
    layer waits (it would otherwise read the first thread's tensors), then sees the variables."""
    import threading

    layer, _ = build("gru")
    x = tf.constant(np.random.default_rng(0).normal(size=(B, T, D)).astype("float32"))
    expected = layer(x).numpy()
    inside, release, done = threading.Event(), threading.Event(), threading.Event()
    results = {}

    def hold():
        with layer.cell.weights_read_once():
            results["swapped"] = not isinstance(layer.cell.kernel, keras.Variable)
            inside.set()
            release.wait(10)

    def call():
        results["output"] = layer(x).numpy()
        done.set()

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    caller = threading.Thread(target=call)
    caller.start()
    assert not done.wait(0.5), "the other thread's call ran while the weights were swapped"
    release.set()
    holder.join(10)
    caller.join(30)
    assert results["swapped"] and done.is_set()
    np.testing.assert_allclose(results["output"], expected, atol=1e-6)


def test_weights_read_once_keeps_variables_under_mixed_precision():
    """A float32 variable read once in bfloat16 would have its gradient summed over time in
    bfloat16: under a mixed policy the weights stay variables (read and cast per step)."""
    layer = fr.LSTM(4, dtype="mixed_bfloat16")
    layer.build((2, 3, 5))
    with layer.cell.weights_read_once():
        assert isinstance(layer.cell.kernel, keras.Variable)
    full = fr.LSTM(4)
    full.build((2, 3, 5))
    with full.cell.weights_read_once():
        assert not isinstance(full.cell.kernel, keras.Variable)
