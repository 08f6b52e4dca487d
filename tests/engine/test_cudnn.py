"""The cuDNN fast path's CPU-checkable parts: the eligibility rule, ``use_cudnn``, the mask rule,
and the Keras <-> cuDNN weight conversion, checked against cuDNN's equations written in numpy and
against the parameter vector Keras's own TensorFlow backend hands to ``CudnnRNNV3``.

Not verified here (no GPU): that ``CudnnRNNV3`` itself computes these equations.
"""

from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fancyrnn as fr
from keras_fancyrnn.engine import cudnn, dispatch, probes

D, U, B, T = 3, 4, 3, 6
# The module (the package re-exports a function of the same name).
keras_tf_rnn = importlib.import_module("keras.src.backend.tensorflow.rnn")


@pytest.fixture
def gpu_visible(monkeypatch):
    """Makes ``dispatch`` see a GPU, so every other rule can be tested on CPU."""
    real = tf.config.list_logical_devices

    def fake(device_type=None):
        return ["/device:GPU:0"] if device_type == "GPU" else real(device_type)

    monkeypatch.setattr(tf.config, "list_logical_devices", fake)


def built(layer, input_dim=D):
    layer.build((None, T, input_dim))
    return layer


# -- eligibility -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [fr.LSTM, fr.GRU])
def test_default_lstm_gru_are_eligible_when_a_gpu_is_visible(cls, gpu_visible):
    assert dispatch.cudnn_blocker(built(cls(U))) is None
    assert dispatch.cudnn_blocker(built(cls(U, dropout=0.3)), training=True) is None


@pytest.mark.parametrize("cls", [fr.LSTM, fr.GRU])
def test_not_eligible_without_a_gpu(cls):
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a GPU is visible")
    assert dispatch.cudnn_blocker(built(cls(U))) == "no GPU is visible"


@pytest.mark.parametrize("cls", [fr.LSTM, fr.GRU])
@pytest.mark.parametrize(
    "kwargs, training, why",
    [
        ({"activation": "relu"}, False, "activation is not tanh"),
        ({"recurrent_activation": "hard_sigmoid"}, False, "recurrent_activation is not sigmoid"),
        ({"use_bias": False}, False, "use_bias=False"),
        ({"unroll": True}, False, "unroll=True"),
        ({"recurrent_dropout": 0.2}, True, "recurrent_dropout is active"),
        ({"bptt_truncate": 3}, False, "bptt_truncate is set"),
    ],
)
def test_each_rule_alone_makes_a_layer_ineligible(cls, kwargs, training, why, gpu_visible):
    assert dispatch.cudnn_blocker(built(cls(U, **kwargs)), training=training) == why


def test_recurrent_dropout_only_matters_in_training(gpu_visible):
    layer = built(fr.LSTM(U, recurrent_dropout=0.2))
    assert dispatch.cudnn_blocker(layer, training=False) is None


def test_gru_reset_before_is_ineligible(gpu_visible):
    layer = built(fr.GRU(U, reset_after=False))
    assert dispatch.cudnn_blocker(layer) == "reset_after=False"


def test_the_monitor_probe_makes_a_layer_ineligible(gpu_visible):
    layer = built(fr.LSTM(U))
    assert dispatch.cudnn_blocker(layer, probed=True) == "the gradient monitor's probes are set"
    with probes.scope({layer: {0: tf.zeros((B, T, U))}}), dispatch.recording() as plans:
        layer(tf.zeros((B, T, D)))  # the loop (cuDNN would fail on this CPU)
    assert [(p.path, p.reason) for p in plans] == [
        ("loop", "cuDNN cannot run it: the gradient monitor's probes are set")]


def test_both_directions_of_a_bidirectional_are_judged_alone(gpu_visible):
    bi = fr.Bidirectional(fr.LSTM(U, return_sequences=True))
    bi.build((None, T, D))
    assert dispatch.cudnn_blocker(bi.forward_layer) is None
    assert dispatch.cudnn_blocker(bi.backward_layer) is None
    x = tf.zeros((B, T, D))
    with probes.scope({bi.backward_layer: {0: tf.zeros((B, T, U))}}):
        assert probes.for_call(bi.forward_layer, x) == {}
        assert set(probes.for_call(bi.backward_layer, x)) == {0}


def test_simple_rnn_is_ineligible_not_an_error(gpu_visible):
    assert dispatch.cudnn_blocker(built(fr.SimpleRNN(U))) is not None


def test_per_gate_input_dropout_is_ineligible_in_training(gpu_visible):
    # implementation=1 draws one input mask per gate (as Keras's loop does); cuDNN can only take
    # inputs multiplied by one mask, so the two paths would differ.
    layer = built(fr.LSTM(U, dropout=0.3, implementation=1))
    assert dispatch.cudnn_blocker(layer, training=True) is not None


# -- use_cudnn ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [fr.LSTM, fr.GRU])
def test_use_cudnn_argument(cls):
    with pytest.raises(ValueError, match="use_cudnn must be 'auto', True or False"):
        cls(U, use_cudnn="yes")
    for value in ("auto", True, False):
        layer = cls(U, use_cudnn=value)
        assert cls.from_config(layer.get_config()).use_cudnn == value
    x = np.ones((B, T, D), "float32")
    np.testing.assert_allclose(cls(U, use_cudnn=False)(x).shape, (B, U))
    if not tf.config.list_logical_devices("GPU"):
        with pytest.raises(ValueError, match="no GPU is visible"):
            cls(U, use_cudnn=True)(x)


def test_bidirectional_keeps_use_cudnn_on_both_directions():
    bi = fr.Bidirectional(fr.GRU(U, use_cudnn=False))
    assert bi.forward_layer.use_cudnn is False and bi.backward_layer.use_cudnn is False
    again = fr.Bidirectional.from_config(bi.get_config())
    assert again.forward_layer.use_cudnn is False and again.backward_layer.use_cudnn is False


# -- mask rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rows, ok",
    [
        ([[1, 1, 1, 1]], True),
        ([[1, 1, 0, 0], [1, 0, 0, 0]], True),
        ([[0, 1, 1, 1]], False),  # left-padded
        ([[1, 0, 1, 0]], False),  # a hole
        ([[1, 1, 0, 0], [0, 0, 0, 0]], False),  # a fully masked sequence
    ],
)
def test_cudnn_mask_ok(rows, ok):
    mask = np.array(rows, bool)
    assert bool(cudnn.cudnn_mask_ok(mask)) is ok
    np.testing.assert_array_equal(cudnn.sequence_lengths(mask), mask.sum(1))


# -- weight conversion -------------------------------------------------------------------------
def random_weights(layer, seed=0):
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    return [w.numpy() for w in (layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias)]


@pytest.mark.parametrize(
    "cls, to_cudnn, to_keras, mode",
    [
        (fr.LSTM, cudnn.lstm_to_cudnn, cudnn.cudnn_to_lstm, "lstm"),
        (fr.GRU, cudnn.gru_to_cudnn, cudnn.cudnn_to_gru, "gru"),
    ],
)
def test_conversion_round_trips(cls, to_cudnn, to_keras, mode):
    weights = random_weights(built(cls(U)))
    params = np.asarray(to_cudnn(*weights))
    assert params.shape == (cudnn.params_size(mode, D, U),)
    for got, want in zip(to_keras(params, D, U), weights, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="must have"):
        to_keras(params[:-1], D, U)


def test_gru_conversion_rejects_reset_before():
    weights = random_weights(built(fr.GRU(U, reset_after=False)))
    with pytest.raises(ValueError, match="reset_after=True"):
        cudnn.gru_to_cudnn(*weights)


def test_gru_canonical_layout_by_hand():
    """Marks each Keras block with its gate's name and checks where cuDNN's layout puts it."""
    code = {"z": 1.0, "r": 2.0, "h": 3.0}
    kernel = np.concatenate([np.full((D, U), code[g]) for g in "zrh"], axis=1)
    recurrent = np.concatenate([np.full((U, U), -code[g]) for g in "zrh"], axis=1)
    bias = np.stack([np.concatenate([np.full(U, 10 * code[g]) for g in "zrh"]),
                     np.concatenate([np.full(U, 100 * code[g]) for g in "zrh"])])
    weights, biases = cudnn.gru_to_canonical(kernel, recurrent, bias)
    assert [np.asarray(w).shape for w in weights] == [(U, D)] * 3 + [(U, U)] * 3
    assert [float(np.asarray(w)[0, 0]) for w in weights] == [2, 1, 3, -2, -1, -3]  # r, z, h
    assert [float(np.asarray(b)[0]) for b in biases] == [20, 10, 30, 200, 100, 300]


def test_lstm_canonical_layout_by_hand():
    kernel = np.concatenate([np.full((D, U), k + 1.0) for k in range(4)], axis=1)
    recurrent = -np.concatenate([np.full((U, U), k + 1.0) for k in range(4)], axis=1)
    bias = np.repeat(np.arange(1.0, 5.0), U)
    weights, biases = cudnn.lstm_to_canonical(kernel, recurrent, bias)
    assert [float(np.asarray(w)[0, 0]) for w in weights] == [1, 2, 3, 4, -1, -2, -3, -4]
    assert [float(np.asarray(b)[0]) for b in biases] == [0, 0, 0, 0, 1, 2, 3, 4]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def cudnn_reference(mode, params, x, lengths, h0, c0=None):
    """cuDNN's equations (module docstring of keras_fancyrnn.engine.cudnn) in float64 numpy,
    reading the flat ``params`` vector directly; right-padded sequences of ``lengths`` (outputs
    past a sequence's end are 0, its final state is the state at its end)."""
    gates = {"lstm": 4, "gru": 3}[mode]
    d, u = x.shape[-1], h0.shape[-1]
    sizes = [u * d] * gates + [u * u] * gates + [u] * (2 * gates)
    pieces = np.split(np.asarray(params, np.float64), np.cumsum(sizes)[:-1])
    w = [p.reshape(u, d) for p in pieces[:gates]]
    r = [p.reshape(u, u) for p in pieces[gates: 2 * gates]]
    bw, br = pieces[2 * gates: 3 * gates], pieces[3 * gates:]
    h, c = h0.astype(np.float64), None if c0 is None else c0.astype(np.float64)
    outputs = np.zeros(x.shape[:2] + (u,))
    for t in range(x.shape[1]):
        xt = x[:, t].astype(np.float64)
        if mode == "lstm":
            i, f, g, o = (xt @ w[k].T + bw[k] + h @ r[k].T + br[k] for k in range(4))
            c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h_new = _sigmoid(o) * np.tanh(c_new)
        else:  # GRU, cuDNN order r, z, h; the reset gate multiplies R_h h + bR_h
            rg = _sigmoid(xt @ w[0].T + bw[0] + h @ r[0].T + br[0])
            z = _sigmoid(xt @ w[1].T + bw[1] + h @ r[1].T + br[1])
            h_hat = np.tanh(xt @ w[2].T + bw[2] + rg * (h @ r[2].T + br[2]))
            h_new, c_new = (1 - z) * h_hat + z * h, None
        live = (t < lengths)[:, None]
        h = np.where(live, h_new, h)
        c = None if c is None else np.where(live, c_new, c)
        outputs[:, t] = np.where(live, h_new, 0.0)
    return outputs, [h] if c is None else [h, c]


def reverse_valid(x, lengths):
    """``tf.reverse_sequence``: reverses each row's first ``lengths[b]`` steps."""
    out = x.copy()
    for b, n in enumerate(lengths):
        out[b, :n] = x[b, :n][::-1]
    return out


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_cudnn_equations_with_converted_params_equal_our_layer(mode, go_backwards):
    rng = np.random.default_rng(1)
    cls, n_states = (fr.LSTM, 2) if mode == "lstm" else (fr.GRU, 1)
    layer = built(cls(U, return_sequences=True, return_state=True, zero_output_for_mask=True,
                      go_backwards=go_backwards))
    # cuDNN parameters with nonzero input *and* recurrent biases, converted into our layer.
    params = rng.normal(0, 0.5, cudnn.params_size(mode, D, U)).astype("float32")
    to_keras = cudnn.cudnn_to_lstm if mode == "lstm" else cudnn.cudnn_to_gru
    layer.set_weights([np.asarray(w) for w in to_keras(params, D, U)])

    x = rng.normal(size=(B, T, D)).astype("float32")
    lengths = np.array([T, T - 2, 1])
    mask = np.arange(T)[None, :] < lengths[:, None]
    init = [rng.normal(size=(B, U)).astype("float32") for _ in range(n_states)]
    out, *states = layer(x, initial_state=init, mask=mask)

    # Keras's cuDNN recipe for go_backwards: reverse each valid part, run, reverse back.
    x_in = reverse_valid(x, lengths) if go_backwards else x
    ref_out, ref_states = cudnn_reference(mode, params, x_in, lengths, *init)
    for got, want in zip(states, ref_states, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    if go_backwards:  # our layer returns processing order: pad steps first (zeros), then steps
        ref_out = np.stack([np.concatenate([np.zeros((T - n, U)), ref_out[b, :n]])
                            for b, n in enumerate(lengths)])
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-5)


class _Captured(Exception):
    pass


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_params_equal_what_keras_hands_cudnn(mode, monkeypatch):
    """Runs Keras's own ``_cudnn_lstm`` / ``_cudnn_gru`` up to the kernel call (as on a CUDA
    build) and compares the ``params`` it would give ``CudnnRNNV3`` with ours."""
    captured = {}

    def fake_kernel(**kwargs):
        captured.update(kwargs)
        raise _Captured

    monkeypatch.setattr(tf.raw_ops, "CudnnRNNV3", fake_kernel)
    monkeypatch.setattr(tf.sysconfig, "get_build_info",
                        lambda: {"is_cuda_build": True, "is_rocm_build": False})
    cls = fr.LSTM if mode == "lstm" else fr.GRU
    kernel, recurrent_kernel, bias = random_weights(built(cls(U)), seed=2)
    x = tf.ones((B, T, D))
    h0 = tf.zeros((B, U))
    with pytest.raises(_Captured):
        if mode == "lstm":
            keras_tf_rnn._cudnn_lstm(x, h0, h0, kernel, recurrent_kernel, bias, None,
                                     False, False, True)
        else:
            keras_tf_rnn._cudnn_gru(x, h0, kernel, recurrent_kernel, bias, None,
                                    False, False, True)
    ours = (cudnn.lstm_to_cudnn if mode == "lstm" else cudnn.gru_to_cudnn)(
        kernel, recurrent_kernel, bias
    )
    np.testing.assert_array_equal(np.asarray(ours), captured["params"].numpy())
    assert captured["rnn_mode"] == mode


def test_conversion_runs_on_keras_variables():
    layer = built(fr.LSTM(U))
    params = cudnn.lstm_to_cudnn(layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias)
    assert tuple(params.shape) == (cudnn.params_size("lstm", D, U),)
    assert keras.ops.is_tensor(params)


# -- the dispatch: the engine's cuDNN branch, run on CPU with cuDNN's equations in numpy --------
@pytest.fixture
def fake_cudnn(monkeypatch, gpu_visible):
    """Replaces the GPU-only ``CudnnRNNV3`` with ``cudnn_reference`` (time-major, as called)."""
    calls = []

    def fake(input, input_h, input_c, params, is_training, rnn_mode, sequence_lengths,
             time_major):
        assert time_major and is_training
        calls.append(rnn_mode)

        def compute(x, h0, c0, p, lengths):
            outs, states = cudnn_reference(rnn_mode, p, np.transpose(x, (1, 0, 2)), lengths,
                                           h0[0], c0[0] if rnn_mode == "lstm" else None)
            c = states[1] if rnn_mode == "lstm" else c0[0]
            return (np.transpose(outs, (1, 0, 2)).astype("float32"),
                    states[0][None].astype("float32"), np.asarray(c)[None].astype("float32"))

        outputs, h, c = tf.numpy_function(
            compute, [input, input_h, input_c, params, sequence_lengths],
            [tf.float32, tf.float32, tf.float32])
        return outputs, h, c, tf.zeros([0]), tf.zeros([0])

    monkeypatch.setattr(cudnn, "cudnn_rnn_v3", fake)
    return calls


@pytest.mark.parametrize("cls", [fr.LSTM, fr.GRU])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("zero_output_for_mask", [False, True])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_cudnn_branch_equals_the_loop(cls, go_backwards, zero_output_for_mask, padding,
                                      fake_cudnn):
    rng = np.random.default_rng(2)
    kw = dict(return_sequences=True, return_state=True, go_backwards=go_backwards,
              zero_output_for_mask=zero_output_for_mask)
    fused, loop = built(cls(U, **kw)), built(cls(U, use_cudnn=False, **kw))
    weights = [rng.normal(0, 0.5, w.shape).astype("float32") for w in fused.get_weights()]
    fused.set_weights(weights)
    loop.set_weights(weights)
    x = rng.normal(size=(B, T, D)).astype("float32")
    mask = {"none": None,
            "right": np.arange(T)[None, :] < np.array([T, T - 2, 1])[:, None],
            "left": np.arange(T)[None, :] >= np.array([0, 2, 1])[:, None]}[padding]
    run = tf.function(lambda layer: layer(x, mask=mask))
    got, want = run(fused), run(loop)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert fake_cudnn  # the fused branch was traced (run when the mask is right-padded)


def test_portable_traces_never_use_cudnn(fake_cudnn):
    layer = built(fr.LSTM(U))
    x = np.zeros((B, T, D), "float32")
    with fr.portable():
        tf.function(lambda: layer(x))()
    assert fake_cudnn == []
    tf.function(lambda: layer(x))()
    assert fake_cudnn == ["lstm"]
