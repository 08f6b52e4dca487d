"""The one place that decides how a recurrent layer runs, and says why.

A layer's call asks ``choose`` for a ``Plan``; the engine (``keras_fancyrnn.engine``) runs it.
The paths, each where it computes exactly what the loop computes:

- ``"cudnn"``: NVIDIA's fused LSTM/GRU kernel, on a GPU (``keras_fancyrnn.engine.cudnn``);
- ``"sequence_kernel"``: every timestep in one C++ op and the gradient in another, on a CPU
  (``keras_fancyrnn.ops.native``);
- ``"block_lstm"``: TensorFlow's ``BlockLSTMV2`` for small LSTMs on a CPU where the C++ kernels
  are unavailable;
- ``"loop"``: the engine's step loop, the reference, which runs everything (also truncation,
  recurrent dropout and ``unroll``, which only it runs), with the C++ gate kernels in each step
  where they run;
- ``"scan"``: on the JAX and PyTorch backends, the same loop written with ``keras.ops``
  (``keras_fancyrnn.engine.scan``; ``jax.lax.scan`` on JAX), which runs everything the loop runs;
- ``"torch_rnn"``: on PyTorch, an LSTM or GRU whose equations are PyTorch's as one
  ``torch._VF.lstm`` / ``torch._VF.gru`` call (``keras_fancyrnn.engine.torch_rnn``).

Masks and the gradient monitor's probes run in the sequence kernels and the loop; cuDNN takes
right-padded masks only (checked at run time) and no probes.

Every question about the device, XLA, export traces and ``keras_fancyrnn.config`` that bears on
the choice is asked here. ``fr.explain(model, x)`` reports the plans a model's layers take.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
from collections.abc import Iterator

import keras

from keras_fancyrnn import config

#: A plan's batch limit meaning any batch (no run-time check).
ANY_BATCH = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call of a recurrent layer runs.

    Attributes:
        layer: the layer's name.
        path: ``"cudnn"``, ``"sequence_kernel"``, ``"block_lstm"``, ``"loop"``, ``"scan"`` or
            ``"torch_rnn"``.
        reason: why this path; for the loop, what ruled out the faster paths.
        batch_limit: ``block_lstm``: the largest batch it runs (the loop above it, checked at
            run time where the batch size is unknown when traced); ``ANY_BATCH`` otherwise.
        gate_kernels: the loop's steps compute their gates with the C++ gate kernels.
        hoist_inputs: the loop (or scan) computes ``x W + b`` for all steps before it (on a GPU,
            and in the scan on PyTorch; on a CPU the projection inside each step measured faster
            in TensorFlow's loop and in XLA's, benchmarks/results/).
    """

    layer: str
    path: str
    reason: str
    batch_limit: int = ANY_BATCH
    gate_kernels: bool = False
    hoist_inputs: bool = False

    def __str__(self) -> str:
        path = "loop (gate kernels)" if self.path == "loop" and self.gate_kernels else self.path
        return f"{self.layer}: {path}: {self.reason}"


# -- the context: device, trace, backend ------------------------------------------------------


def on_gpu() -> bool:
    """Whether the backend sees a GPU (on TensorFlow the layers then run cuDNN or the loop)."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    from keras_fancyrnn._tf import tf

    return bool(tf.config.list_logical_devices("GPU"))


_portable = threading.local()


@contextlib.contextmanager
def portable():
    """Within this context, layers trace the engine's loop, never the cuDNN kernel or this
    package's C++ ops, so the traced graph runs on any device and without this package.
    ``tf.saved_model.save`` is covered automatically; wrap ``model.export(...)`` in it when
    exporting on a GPU machine for CPU serving."""
    previous = getattr(_portable, "on", False)
    _portable.on = True
    try:
        yield
    finally:
        _portable.on = previous


def in_portable_trace() -> bool:
    """Inside ``portable()`` or a SavedModel save."""
    from tensorflow.python.saved_model import save_context

    return getattr(_portable, "on", False) or save_context.in_save_context()


def in_xla() -> bool:
    """Inside an XLA cluster (``jit_compile=True``), which cannot compile the C++ ops."""
    from keras_fancyrnn._tf import tf

    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow without the private module
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def native_blocker(dtype) -> str | None:
    """Why the C++ kernels cannot run now for ``dtype``, or ``None`` where they can."""
    from keras_fancyrnn.ops import native

    name = str(getattr(dtype, "name", dtype))
    blockers = [
        (lambda: not config.get("native_kernels"), "the native_kernels setting is off"),
        (lambda: keras.config.backend() != "tensorflow",
         f"the Keras backend is {keras.config.backend()}, not tensorflow"),
        (lambda: name not in ("float32", "float64"), f"the kernels take float32 and float64, "
                                                     f"not {name}"),
        (on_gpu, "a GPU is visible (the kernels are for the CPU)"),
        (in_portable_trace, "the trace is portable (an export, keras_fancyrnn.portable())"),
        (in_xla, "XLA cannot compile the C++ ops (jit_compile)"),
        (lambda: native.library() is None,
         f"the kernels are unavailable: {native.load_error()}"),
    ]
    return next((why for blocked, why in blockers if blocked()), None)


# -- the choice -----------------------------------------------------------------------------


def cudnn_blocker(layer, mask=None, training=False, probed=False) -> str | None:
    """Why cuDNN cannot compute exactly what ``layer`` computes, or ``None`` where it can.

    cuDNN's LSTM/GRU kernels hard-code tanh/sigmoid, a bias, GRU's reset-after form, no recurrent
    dropout and right-padded masks; the monitor's probes and truncated BPTT need the loop."""
    cell = layer.cell
    if not hasattr(cell, "recurrent_activation"):
        return "cuDNN runs only LSTM and GRU cells"
    checks = [
        (cell.activation is keras.activations.tanh, "activation is not tanh"),
        (cell.recurrent_activation is keras.activations.sigmoid,
         "recurrent_activation is not sigmoid"),
        (cell.use_bias, "use_bias=False"),
        (getattr(cell, "reset_after", True), "reset_after=False"),
        (not layer.unroll, "unroll=True"),
        (not (training and cell.recurrent_dropout > 0), "recurrent_dropout is active"),
        (not (training and cell.dropout > 0
              and getattr(cell, "dropout_mask_count", None) is not None),
         "input dropout draws one mask per gate (implementation=1)"),
        (layer.bptt_truncate is None, "bptt_truncate is set"),
        (not probed, "the gradient monitor's probes are set"),
        (keras.config.backend() == "tensorflow", "the backend is not TensorFlow"),
        (on_gpu(), "no GPU is visible"),
    ]
    return next((why for ok, why in checks if not ok), None)


def _loop_only(layer, inputs, mask, training, probed) -> str | None:
    """What in this call only the loop computes, or ``None``."""
    cell = layer.cell
    steps = inputs.shape[1]
    truncates = layer.bptt_truncate is not None and (
        steps is None or layer.bptt_truncate < steps - 1)
    checks = [
        (layer.unroll, "unroll=True"),
        (training and 0.0 < getattr(cell, "recurrent_dropout", 0.0) < 1.0,
         "recurrent_dropout is active"),
        (training and 0.0 < getattr(cell, "dropout", 0.0) < 1.0
         and getattr(cell, "dropout_mask_count", None) is not None,
         "input dropout draws one mask per gate (implementation=1 or recurrent_dropout)"),
        (truncates, f"bptt_truncate={layer.bptt_truncate} cuts the gradient"),
    ]
    return next((why for applies, why in checks if applies), None)


def _whole_sequence(layer, inputs, mask, probed) -> tuple[str, int, str]:
    """``(path, batch limit, reason)`` of the CPU whole-sequence path this cell has, or
    ``("loop", 0, why)`` where it has none."""
    cell = layer.cell
    dtype = inputs.dtype
    if not config.get("fused_on_cpu"):
        return "loop", 0, "the fused_on_cpu setting is off"
    if in_portable_trace():  # the loop's plain ops, for converters (TFLite) that lack fused ops
        return "loop", 0, "the trace is portable (an export, keras_fancyrnn.portable())"
    if in_xla():
        return "loop", 0, "XLA compiles the loop (jit_compile), not the fused kernels"
    blocker = native_blocker(dtype)
    if blocker is None and not config.get("sequence_kernels"):
        blocker = "the sequence_kernels setting is off"
    if blocker is None:
        unsupported = cell.sequence_kernel_blocker()
        if unsupported is None:
            return "sequence_kernel", ANY_BATCH, "the whole sequence in one C++ op"
        blocker = unsupported
    limit_of = getattr(cell, "block_lstm_batch_limit", None)
    limit = limit_of(inputs.shape[-1], dtype) if limit_of else 0
    if limit and (mask is not None or probed):
        what = "mask" if mask is not None else "probes (the gradient monitor's)"
        return "loop", 0, f"no sequence kernel ({blocker}), and BlockLSTMV2 takes no {what}"
    if limit:
        return "block_lstm", limit, (f"TensorFlow's BlockLSTMV2 (batch <= {limit}; the loop "
                                     f"above): no sequence kernel, {blocker}")
    return "loop", 0, f"no sequence kernel: {blocker}"


def torch_rnn_blocker(layer, inputs, mask=None, training=False, probed=False) -> str | None:
    """Why PyTorch's own LSTM/GRU kernel cannot compute exactly what ``layer`` computes in this
    call, or ``None`` where it can (its equations are the cell's: ``engine/torch_rnn.py``)."""
    cell = layer.cell
    if getattr(cell, "gates", None) not in (3, 4) or not hasattr(cell, "recurrent_activation"):
        return "PyTorch's kernels run only LSTM and GRU cells"
    only_loop = _loop_only(layer, inputs, mask, training, probed)
    checks = [
        (config.get("fused_on_cpu"), "the fused_on_cpu setting is off"),
        (cell.activation is keras.activations.tanh, "activation is not tanh"),
        (cell.recurrent_activation is keras.activations.sigmoid,
         "recurrent_activation is not sigmoid"),
        (getattr(cell, "reset_after", True), "reset_after=False (PyTorch's GRU resets after)"),
        (str(inputs.dtype).rpartition(".")[2] in ("float32", "float64"),
         f"the inputs are {inputs.dtype}, not float32 or float64"),
        (mask is None, "a mask is given"),
        (not probed, "the gradient monitor's probes are set"),
        (only_loop is None, only_loop),
        (not (training and 0.0 < cell.dropout < 1.0), "dropout is active"),
    ]
    return next((why for ok, why in checks if not ok), None)


def _off_tensorflow(layer, inputs, mask, training, probed) -> Plan:
    """The plan on JAX or PyTorch: PyTorch's kernel where it computes the layer's equations, else
    the engine's ``keras.ops`` loop (projecting inputs per step on a CPU under XLA, where it
    measured faster; before the loop elsewhere)."""
    backend = keras.config.backend()
    name = layer.name
    if backend == "torch":
        why = torch_rnn_blocker(layer, inputs, mask, training, probed)
        if why is None:
            return Plan(name, "torch_rnn", "PyTorch's own LSTM/GRU kernel (same equations)")
        return Plan(name, "scan", f"the torch backend runs the engine's keras.ops loop: {why}",
                    hoist_inputs=True)
    return Plan(name, "scan", f"the {backend} backend runs the engine's keras.ops loop",
                hoist_inputs=backend != "jax" or on_gpu())


def choose(layer, inputs, mask=None, training=False, probed=False) -> Plan:
    """The plan for ``layer`` (a ``keras_fancyrnn.RNN``) on ``inputs`` ``[B, T, D]`` now, with
    states probed (``keras_fancyrnn.engine.probes``) or not. ``use_cudnn=True`` where cuDNN cannot
    compute what the layer computes is a ``ValueError`` (probes aside: they take the loop)."""
    name, cell = layer.name, layer.cell
    backend = keras.config.backend()
    if backend != "tensorflow":
        if getattr(layer, "use_cudnn", "auto") is True:
            raise ValueError(f"{name}: use_cudnn=True was given but the {backend} backend has "
                             f"no cuDNN path here; pass use_cudnn='auto'")
        return _record(_off_tensorflow(layer, inputs, mask, training, probed))
    gpu = on_gpu()
    gates = bool(getattr(cell, "native_gates", lambda dtype: False)(inputs.dtype))
    loop = dict(layer=name, path="loop", gate_kernels=gates,
                hoist_inputs=gpu)  # on a CPU the per-step projection measured faster
    use_cudnn = getattr(layer, "use_cudnn", "auto")  # SimpleRNN: cudnn_blocker says why
    if use_cudnn is True:
        why = cudnn_blocker(layer, mask, training)
        if why is not None:
            raise ValueError(
                f"{name}: use_cudnn=True was given but cuDNN cannot run this layer here "
                f"({why}); pass use_cudnn='auto' to fall back to the engine's loop")
    if gpu:
        why = ("use_cudnn=False" if use_cudnn is False else
               "the trace is portable" if in_portable_trace() else
               cudnn_blocker(layer, mask, training, probed))
        if why is None:
            extra = "; a mask runs the loop unless it is right-padded" if mask is not None else ""
            return _record(Plan(name, "cudnn", "NVIDIA's fused kernel" + extra))
        return _record(Plan(reason=f"cuDNN cannot run it: {why}", **loop))
    only_loop = _loop_only(layer, inputs, mask, training, probed)
    if only_loop is not None:
        return _record(Plan(reason=only_loop, **loop))
    path, limit, why = _whole_sequence(layer, inputs, mask, probed)
    if path == "loop":
        return _record(Plan(reason=why, **loop))
    return _record(Plan(name, path, why, batch_limit=limit))


# -- recording, for fr.explain ---------------------------------------------------------------

_recorded: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "keras_fancyrnn_plans", default=None)


def _record(plan: Plan) -> Plan:
    plans = _recorded.get()
    if plans is not None:
        plans.append(plan)
    return plan


@contextlib.contextmanager
def recording() -> Iterator[list[Plan]]:
    """Collects every plan chosen inside the ``with`` block (in call order)."""
    plans: list[Plan] = []
    token = _recorded.set(plans)
    try:
        yield plans
    finally:
        _recorded.reset(token)


class Explanation(list):
    """The plans of ``explain``: a list of ``Plan``, printed one line per layer call."""

    def __str__(self) -> str:
        return "\n".join(map(str, self)) or "(no keras_fancyrnn recurrent layer ran)"


def explain(model, x, *, training: bool = False) -> Explanation:
    """The path each keras_fancyrnn recurrent layer of ``model`` takes on the input ``x``, and
    why: where it is not the fastest path, what rules the faster one out. Runs ``model(x)`` once.

        print(fr.explain(model, x))
        # lstm: sequence_kernel: the whole sequence in one C++ op

    Args:
        model: a Keras model or layer.
        x: an input ``model`` takes (arrays, tensors, or a structure of them).
        training: explain the training call (dropout changes the path) rather than inference.

    Returns:
        An ``Explanation``: one ``Plan`` per recurrent layer call, in call order (the two
        directions of a ``Bidirectional`` are two). Plans are chosen when a call is traced; a
        ``tf.function`` traced under other settings keeps its own.
    """
    with recording() as plans:
        model(x, training=training)
    return Explanation(plans)
