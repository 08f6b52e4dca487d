"""keras_fancyrnn.engine.dispatch: the one choice of path, and fr.explain. Each explained path is
checked against the ops of the traced graph (what really runs), so an explanation cannot drift
from the choice."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from graphs import traced_ops

import keras_fancyrnn as fr
from keras_fancyrnn.engine import dispatch
from keras_fancyrnn.ops import native

B, T, D = 4, 10, 3
KERNELS = native.library() is not None
needs_kernels = pytest.mark.skipif(not KERNELS, reason="the C++ kernels cannot be had here")


def _ops(model, x, training=False):
    return traced_ops(lambda x: model(x, training=training), tf.constant(x))


def _runs(plan_path, ops):
    """Whether the graph's ops are those of ``plan_path``."""
    sequence = any(op.startswith("KerasFancyrnn") and op.endswith("Sequence") for op in ops)
    block = "BlockLSTMV2" in ops
    return {"sequence_kernel": sequence and not block, "block_lstm": block and not sequence,
            "loop": not sequence and not block}[plan_path]


def _data(masked=False):
    x = np.random.default_rng(0).normal(size=(B, T, D)).astype("float32")
    if masked:
        x[:, 7:] = 0.0
    return x


def _model(*layers, masking=False):
    return keras.Sequential([keras.Input((T, D)),
                             *([keras.layers.Masking(0.0)] if masking else []), *layers])


@needs_kernels
def test_unmasked_layers_run_the_sequence_kernel_and_say_so():
    model = _model(fr.LSTM(8, return_sequences=True, name="lstm"),
                   fr.Bidirectional(fr.GRU(4, name="gru")), keras.layers.Dense(1))
    x = _data()
    plans = fr.explain(model, x)
    assert [(p.layer, p.path) for p in plans] == [
        ("lstm", "sequence_kernel"), ("forward_gru", "sequence_kernel"),
        ("backward_gru", "sequence_kernel")]
    assert str(plans).splitlines()[0] == "lstm: sequence_kernel: the whole sequence in one C++ op"
    assert _runs("sequence_kernel", _ops(model, x))


@needs_kernels
def test_a_mask_runs_the_sequence_kernel():
    model = _model(fr.LSTM(8, name="lstm"), masking=True)
    x = _data(masked=True)
    (plan,) = fr.explain(model, x)
    assert plan.path == "sequence_kernel"
    assert _runs("sequence_kernel", _ops(model, x))


def test_with_sequence_kernels_off_a_masked_layer_loops_and_says_why():
    fr.config.set(sequence_kernels=False)
    model = _model(fr.LSTM(8, name="lstm"), masking=True)
    x = _data(masked=True)
    (plan,) = fr.explain(model, x)
    assert plan.path == "loop"
    assert plan.gate_kernels == KERNELS
    assert str(plan).startswith("lstm: loop (gate kernels): " if KERNELS else "lstm: loop: ")
    assert ("sequence_kernels setting is off" if KERNELS else "no sequence kernel") in plan.reason
    assert _runs("loop", _ops(model, x))


def test_a_mask_or_probes_rule_out_block_lstm():
    """A small LSTM without the C++ kernels runs BlockLSTMV2, which takes no mask."""
    fr.config.set(native_kernels=False)
    lstm = fr.LSTM(8, name="lstm")
    inputs = tf.zeros((B, T, 4))
    lstm.build(inputs.shape)
    assert dispatch.choose(lstm, inputs).path == "block_lstm"
    masked = dispatch.choose(lstm, inputs, mask=tf.ones((B, T), bool))
    probed = dispatch.choose(lstm, inputs, probed=True)
    assert masked.path == probed.path == "loop"
    assert "BlockLSTMV2 takes no mask" in masked.reason
    assert "BlockLSTMV2 takes no probes" in probed.reason


@pytest.mark.parametrize("layer, training, why", [
    (lambda: fr.SimpleRNN(8, activation="sigmoid"), False, "runs tanh and relu"),
    (lambda: fr.GRU(8, recurrent_dropout=0.2), True, "recurrent_dropout is active"),
    (lambda: fr.LSTM(8, bptt_truncate=2), False, "bptt_truncate=2 cuts the gradient"),
    (lambda: fr.LSTM(8, dropout=0.2, implementation=1), True, "one mask per gate"),
    (lambda: fr.SimpleRNN(8, unroll=True), False, "unroll=True"),
])
def test_what_only_the_loop_computes_is_named(layer, training, why):
    model = _model(layer())
    x = _data()
    (plan,) = fr.explain(model, x, training=training)
    assert plan.path == "loop" and why in plan.reason, plan
    assert _runs("loop", _ops(model, x, training))


@needs_kernels
def test_dropout_alone_keeps_the_sequence_kernel_in_training():
    model = _model(fr.GRU(8, recurrent_dropout=0.2))
    x = _data()
    assert fr.explain(model, x)[0].path == "sequence_kernel"  # inference: no dropout
    assert fr.explain(model, x, training=True)[0].path == "loop"


def test_settings_are_reasons():
    x = _data()
    with fr.config.scope(fused_on_cpu=False):
        (plan,) = fr.explain(_model(fr.GRU(8)), x)
        assert plan.path == "loop" and plan.reason == "the fused_on_cpu setting is off"
    with fr.config.scope(native_kernels=False):
        lstm, gru = _model(fr.LSTM(8)), _model(fr.GRU(8))
        (plan,) = fr.explain(lstm, x)
        assert plan.path == "block_lstm" and "the native_kernels setting is off" in plan.reason
        assert _runs("block_lstm", _ops(lstm, x))
        (plan,) = fr.explain(gru, x)
        assert plan == dispatch.Plan(gru.layers[0].name, "loop",
                                     "no sequence kernel: the native_kernels setting is off")
        assert _runs("loop", _ops(gru, x))
    if KERNELS:
        with fr.config.scope(sequence_kernels=False):
            (plan,) = fr.explain(_model(fr.GRU(8)), x)
            assert plan.path == "loop" and plan.gate_kernels
            assert plan.reason == "no sequence kernel: the sequence_kernels setting is off"


def test_portable_and_xla_traces_keep_the_loop():
    layer = fr.LSTM(8)
    x = tf.constant(_data())
    with fr.portable(), dispatch.recording() as plans:
        tf.function(layer).get_concrete_function(x)
    assert plans and all(p.path == "loop" and "portable" in p.reason for p in plans)
    with dispatch.recording() as plans:
        tf.function(layer, jit_compile=True).experimental_get_compiler_ir(x)(stage="hlo")
    assert plans and all(p.path == "loop" and "XLA" in p.reason for p in plans)


def test_on_a_gpu_cudnn_or_the_reason_it_cannot(monkeypatch):
    real = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["/device:GPU:0"] if kind == "GPU" else real(kind))
    inputs = tf.zeros((B, T, D))
    for layer, path, why in [
        (fr.LSTM(8), "cudnn", "NVIDIA's fused kernel"),
        (fr.GRU(8, use_cudnn=False), "loop", "cuDNN cannot run it: use_cudnn=False"),
        (fr.GRU(8, reset_after=False), "loop", "cuDNN cannot run it: reset_after=False"),
        (fr.SimpleRNN(8), "loop", "cuDNN cannot run it: cuDNN runs only LSTM and GRU cells"),
    ]:
        layer.build(inputs.shape)
        plan = dispatch.choose(layer, inputs)
        assert (plan.path, plan.reason) == (path, why)
        assert plan.hoist_inputs == (path == "loop")  # the loop hoists x W on a GPU
    mask = tf.ones((B, T), bool)
    lstm = fr.LSTM(8)
    lstm.build(inputs.shape)
    assert "right-padded" in dispatch.choose(lstm, inputs, mask).reason


def test_explain_of_a_model_without_recurrent_layers():
    model = _model(keras.layers.Dense(2))
    assert str(fr.explain(model, _data())) == "(no keras_fancyrnn recurrent layer ran)"
