"""The probe pass: one forward + backward pass on a probe batch that returns ``{key: [T]}``.

Long (over 400 lines): the pass, the probe requests it makes, and the checks of the probe data
its error messages rest on belong together.

``ProbePass`` adds zero probes ``p_t`` through ``keras_fancyrnn.engine.probes`` (to the layers of
the model that ``probe_model`` chooses: the user's own, or a probe model running Keras's recurrent
layers as fr layers on the same variables) and reads ``∂ℓ/∂p_t = ∂ℓ/∂h_t`` off one tape;
``gradient_norms`` is one such pass without a monitor. The pass measures each example's norms
and the steps its mask leaves valid; ``aggregate`` turns them into curves and counts. Also
here: the checks of the probe data (batch shapes, stateful layers' batch size, a compiled loss)
and the model state a pass restores.

The probe pass runs the model with ``training=False`` inside its own compiled function (on
TensorFlow a ``tf.function`` without XLA, whatever the model was compiled with; on JAX
``jax.jit``; eager on PyTorch: ``autodiff``); it does not touch the optimizer or the metrics and
restores every non-trainable model variable (BatchNorm statistics, dropout ``SeedGenerator``
states) and the states of stateful layers afterwards (on JAX and PyTorch it reads the variables
inside a ``keras.StatelessScope``, which discards what it writes), so training is bit-identical
with and without the monitor.

Under ``mixed_float16`` each ∂ℓ_i/∂h is scaled, before the backward pass, by the
``LossScaleOptimizer``'s current scale over the batch size (the factor of Keras's own scaled mean
loss), halved again while anything overflows float16, and the norms divided by it; so every record
is finite where a float32 pass's is, and norms down to about ``6e-8 / factor`` survive float16.
``mixed_bfloat16`` needs no scaling. ``dtype="float64"`` (``probe_dtype`` of the monitor) runs a
float64 copy of the model (``probe_model``), whose backward pass follows a vanishing gradient far
below float32's smallest normal number (about 1.2e-38, where float32's stops: TensorFlow flushes
denormals to zero, so float32's backward pass itself yields exact zeros).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from keras_fancyrnn.diagnostics import autodiff, probe_model
from keras_fancyrnn.diagnostics.aggregate import Measurement, check_align
from keras_fancyrnn.diagnostics.losses import (
    _COMPILE_LOSS_ATTR,
    _compiled_per_example_losses,
)
from keras_fancyrnn.diagnostics.targets import _is_fr_rnn, _Target, discover
from keras_fancyrnn.engine import probes
from keras_fancyrnn.errors import LayerSelectionError, ProbeDataError
from keras_fancyrnn.ops import native


def _rank(t) -> int | None:
    shape = t.shape
    return None if getattr(shape, "rank", 0) is None else len(shape)


def _data_errors() -> tuple:
    """The errors that a probe batch which does not fit the model raises, on this backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_fancyrnn._tf import tf

        return (tf.errors.InvalidArgumentError,)
    return (RuntimeError,) if backend == "torch" else ()


def _input_error(name: str, sequences, errors: list) -> bool:
    """Records (in ``errors``) why the input of the layer ``name`` has no input series, if it has
    none."""
    if _rank(sequences) is not None and _rank(sequences) < 3:
        errors.append(f"layers: {name!r} does not take a sequence [batch, time, ...]: its "
                      f"input has shape {tuple(sequences.shape)}")
    elif "float" not in keras.backend.standardize_dtype(sequences.dtype):
        errors.append(f"layers: the input of {name!r} is "
                      f"{keras.backend.standardize_dtype(sequences.dtype)}, not a "
                      "float sequence, so it has no gradient; select a later layer")
    else:
        return False
    return True


#: Under float16, how many times the loss scale may be halved until the pass overflows no more
#: (down to 2**-24 of the first factor; a pass whose forward values are not finite is not finite
#: in float32 either, and costs this many passes at most).
_MAX_HALVINGS = 24


class ProbePass:
    """One forward + backward pass of a model on a batch that returns ``{key: [T] curve}``.

    Built once per model and target list; traced once per input signature (shapes without the
    batch dimension, dtypes). Used by ``GradientNormMonitor`` and ``gradient_norms``.
    """

    def __init__(self, model, targets: list[_Target], loss: Callable | None = None,
                 align: str = "time", dtype: str | None = None):
        self.model = model
        self.targets = targets
        self.loss = loss
        self.align = check_align(align)  # how curves of padded batches line up (aggregate)
        check_probe_dtype(dtype)
        self._dtype = "float64" if dtype == "float64" else "float32"
        self._probe_dtype = dtype if dtype == "float64" else None
        self._plan: probe_model.Plan | None = None  # made once the model is built
        self._kernel_keys = {f"{t.key}/recurrent_kernel" for t in targets if t.kernel and t.states}
        # tanh SimpleRNNs (fr's, or Keras's run as fr layers in the probe model): the hidden
        # states, for the fraction of saturated units (aggregate); known once the plan is made
        self._saturation: set = set()
        self._run = autodiff.compile_pass(self._pass, self._variables)
        self._checked = False
        self._trace_errors: list[str] = []  # found while tracing; raised eagerly, every call

    # -- public ----------------------------------------------------------------------------
    def __call__(self, x, y, sample_weight=None, loss_scale: float = 1.0) -> dict[str, np.ndarray]:
        """``{key: [T] curve}`` (and ``<layer>/count`` for masked layers), ``aggregate``."""
        return self.measure(x, y, sample_weight, loss_scale).curves(self.align)

    def measure(self, x, y, sample_weight=None, loss_scale: float = 1.0) -> Measurement:
        """The per-example norms ``[B, T]`` of every series and the masks of the layers."""
        _check_stateful_batch(self.model, _leading_size(x))  # every call: dataset batches vary
        if not self._checked:
            self._prepare(x, y, sample_weight)
        try:
            self._plan.sync()
            out, masks, kernels, saturated = self._scaled((x, y, sample_weight), loss_scale)
        except (ValueError, TypeError, KeyError, IndexError, *_data_errors()) as e:
            if self._checked:
                raise
            raise ProbeDataError(
                f"data: the probe batch does not fit the model {self.model.name!r} and its "
                f"compiled loss ({type(e).__name__}: {e})"
            ) from e
        if self._trace_errors:
            raise LayerSelectionError(self._trace_errors[0])
        order = self._plan.order
        missing = [k for k in order if k not in out]
        if missing:
            raise LayerSelectionError(
                f"layers: {missing} were not computed: the layer is not called in the model's "
                "forward pass"
            )
        self._checked = True
        numpy = ops.convert_to_numpy
        return Measurement({k: numpy(out[k]) for k in order},
                           {k: numpy(m) for k, m in masks.items()}, self._owners(),
                           {k: numpy(v) for k, v in kernels.items()},
                           {k: numpy(v) for k, v in saturated.items()})

    def _owners(self) -> dict[str, str]:
        """``{series key: layer key}``: whose mask applies to a series (an input series is its
        layer's; a state series is the layer's first state key)."""
        owners = {}
        for _, keys in self._plan.states.values():
            owners.update({k: keys[0] for k in keys})
        for _, keys in self._plan.inputs.values():
            owners.update({k: k[: -len("/input")] for k in keys})
        return owners

    def _scaled(self, args, loss_scale: float) -> tuple:
        """The pass under a float16 loss scale (``loss_scale`` != 1): each ∂ℓ_i/∂h is scaled by
        ``loss_scale / B``, the factor of Keras's scaled *mean* loss in training, and by half as
        much again while any value overflows float16 (the scale of an overflowing training step
        is halved too), so every record is finite where a float32 pass's is."""
        if loss_scale == 1.0 or self._probe_dtype is not None:
            return self._run(args, 1.0)
        factor = float(loss_scale) / max(_leading_size(args[0]) or 1, 1)
        for _ in range(_MAX_HALVINGS):
            out = self._run(args, factor)
            if all(np.all(np.isfinite(ops.convert_to_numpy(v))) for v in out[0].values()):
                break
            factor /= 2.0
        return out

    # -- internals -------------------------------------------------------------------------
    def _variables(self) -> list:
        """Every variable the pass may read (the model's, the probe model's, stateful layers'
        states), in a stable order: what ``autodiff.compile_pass`` passes in on JAX / PyTorch."""
        models = [self.model] + ([self._plan.model] if self._plan is not None else [])
        out, seen = [], set()
        for v in [v for m in models for v in m.variables] + _mutable_state(*models):
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
        return out

    def _prepare(self, x, y, sample_weight):
        """Eager checks and builds before the first trace (so nothing is built inside it)."""
        self._build(x, y, sample_weight)
        if self._plan is None:  # the probe model reads the built model's variables
            self._plan = probe_model.plan(self.model, self.targets, self._probe_dtype)
            self._saturation = {keys[0] for layer, keys in self._plan.states.values()
                                if _is_tanh_rnn(layer)}

    def _build(self, x, y, sample_weight):
        _check_batch(self.model, x, y, sample_weight)
        compile_loss = getattr(self.model, _COMPILE_LOSS_ATTR, None)
        need_loss_build = self.loss is None and compile_loss is not None and not getattr(
            compile_loss, "built", True
        )
        if not self.model.built or need_loss_build:
            state = _mutable_state(self.model) if self.model.built else []
            snapshot = [ops.copy(v.value) for v in state]
            try:
                y_pred = self.model(x, training=False)
                for v, value in zip(state, snapshot):
                    v.assign(value)
            except Exception as e:
                raise ProbeDataError(
                    f"data: the model {self.model.name!r} cannot run on the probe batch "
                    f"({type(e).__name__}: {e})"
                ) from e
            if need_loss_build:
                compile_loss.build(y, y_pred)

    def _losses(self, y, y_pred, sample_weight):
        if self.loss is not None:
            losses = self.loss(y, y_pred)
            if sample_weight is not None:
                losses = losses * ops.cast(ops.reshape(sample_weight, (-1,)), losses.dtype)
            return ops.cast(losses, "float32")
        return _compiled_per_example_losses(self.model, y, y_pred, sample_weight)

    def _requests(self, source, collected: dict, masks: dict, sinks: dict) -> dict:
        """A probe request (``keras_fancyrnn.engine.probes``) for every layer of the plan: zero
        probes shaped like its input (after its cast to the compute dtype), taken from ``source``
        (``autodiff.ProbeSource``) and recorded in ``collected`` (``key -> [probe indices]``),
        the layer's mask in ``masks`` (``layer key -> mask``), a list for its hidden states in
        ``sinks`` (tanh SimpleRNNs, for saturation); none for the second call of a shared
        layer."""
        plan, errors = self._plan, self._trace_errors
        done: set = set()

        def probe(keys, shape, dtype):  # one probe, its gradient added to each key's series
            index = source.zeros(shape, dtype)
            for key in keys:
                collected.setdefault(key, []).append(index)
            return source.made[index]

        def request(layer, sequences, mask):
            if id(layer) in done:
                return {}  # a shared layer: probe its first call only
            done.add(id(layer))
            made = {}
            input_keys = plan.inputs.get(id(layer), (None, []))[1]
            state_keys = plan.states.get(id(layer), (None, []))[1]
            if mask is not None:  # the valid steps, as the layer sees them
                for owner in {*(k[: -len("/input")] for k in input_keys), *state_keys[:1]}:
                    masks[owner] = mask
            if input_keys and _input_error(input_keys[0][: -len("/input")], sequences, errors):
                input_keys = []
            shape = ops.shape(sequences)
            if input_keys:
                made["input"] = probe(input_keys, shape, sequences.dtype)
            if state_keys:
                owner, dtype = state_keys[0], layer.cell.compute_dtype
                if owner in self._saturation:
                    made["states_out"] = sinks[owner] = []
                if f"{owner}/recurrent_kernel" in self._kernel_keys:  # E_t, added at step t only
                    made["recurrent_kernel"] = probe(
                        [f"{owner}/recurrent_kernel"],
                        (shape[1], *layer.cell.recurrent_kernel.shape), dtype)
                sizes = layer.cell.state_size
                sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
                for i, (key, size) in enumerate(zip(state_keys, sizes)):
                    made[i] = probe([key], (shape[0], shape[1], size), dtype)
            return made

        layers = {id(a): a for a, _ in (*plan.inputs.values(), *plan.states.values())}
        return {layer: request for layer in layers.values()}

    def _pass(self, x, y, sample_weight, loss_scale):
        """The pass (``autodiff.compile_pass`` compiles it): the per-example norms ``[B, T]``
        of every series, the layers' masks, the kernel terms and the saturated fractions."""
        tensorflow = keras.backend.backend() == "tensorflow"  # elsewhere a StatelessScope
        state = _mutable_state(self.model, self._plan.model) if tensorflow else []
        snapshot = [ops.copy(v.value) for v in state]
        collected: dict = {}
        scale = ops.cast(loss_scale, self._dtype)

        def forward(source):
            collected.clear()
            masks, sinks = {}, {}
            with probes.scope(self._requests(source, collected, masks, sinks)):
                y_pred = self._plan.model(x, training=False)
            losses = ops.cast(self._losses(y, y_pred, sample_weight), self._dtype)
            # ∂ℓ_i/∂h scaled by `loss_scale` (float16: kept inside its range; see measure)
            total = ops.sum(losses) * scale
            saturated = {k: ops.mean(ops.cast(ops.abs(ops.cast(v[0], "float32")) > SATURATED,
                                              "float32"), axis=-1)
                         for k, v in sinks.items() if v}  # [B, T]: the fraction of units
            return total, ({k: ops.cast(m, "bool") for k, m in masks.items()}, saturated)

        grads, (masks, saturated) = autodiff.gradients(forward)
        for v, s in zip(state, snapshot):  # BatchNorm stats, RNN states, seed generators
            v.assign(s)
        curves, kernels = {}, {}
        for k, indices in collected.items():
            g = ops.cast(grads[indices[0]], self._dtype)
            for i in indices[1:]:  # a wrapper's two directions
                g = g + ops.cast(grads[i], self._dtype)
            if k in self._kernel_keys:  # [T, H, P]: step t's term of the kernel's gradient
                kernels[k] = g / scale
            else:  # [B, T]: aggregate averages over the valid steps; a norm scales as g does
                curves[k] = _step_norms(g) / scale
        return curves, masks, kernels, saturated


def _step_norms(g):
    """``‖g[b, t]‖₂`` ``[B, T]``, without underflow for norms below ~1e-19 (whose squares a
    float32 sum loses): on the C++ kernels one op (``native.row_norms``, a pass over ``g``), else
    scaled by the max."""
    axes = tuple(range(2, len(g.shape)))
    if not axes:
        return ops.abs(g)
    width = [g.shape[a] for a in axes]
    if None not in width and np.prod(width) > 0 and native.usable(g.dtype):
        rows = ops.reshape(g, (-1, int(np.prod(width))))
        return ops.reshape(native.row_norms(rows), ops.shape(g)[:2])
    m = ops.max(ops.abs(g), axis=axes, keepdims=True)
    safe = ops.where(m > 0, m, ops.ones_like(m))
    return ops.max(ops.abs(g), axis=axes) * ops.sqrt(ops.sum(ops.square(g / safe), axis=axes))


#: A tanh unit with ``|h| > SATURATED`` passes less than ``1 - SATURATED² ≈ 2 %`` of the
#: gradient back through its step (``tanh' = 1 - h²``).
SATURATED = 0.99


def _is_tanh_rnn(layer) -> bool:
    """A keras_fancyrnn SimpleRNN-like layer: one gate and a tanh activation."""
    cell = getattr(layer, "cell", None)
    return (_is_fr_rnn(layer) and getattr(cell, "gates", None) == 1
            and getattr(getattr(cell, "activation", None), "__name__", "") == "tanh")


def _mutable_state(*models) -> list:
    """Every variable a forward pass of ``models`` may write: the non-trainable variables
    (BatchNorm statistics, ``SeedGenerator`` states, frozen weights) and the states of stateful RNN
    layers (Keras does not list those among the layer's variables)."""
    out, seen = [], set()
    layers = [la for m in models for la in m._flatten_layers(include_self=True, recursive=True)]
    candidates = [v for m in models for v in m.non_trainable_variables]
    for layer in layers:
        if getattr(layer, "stateful", False):
            candidates += [v for v in (getattr(layer, "states", None) or [])
                           if isinstance(v, keras.Variable)]
    for v in candidates:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _check_batch(model, x, y, sample_weight):
    """Shape checks against the model's declared inputs, with messages naming ``data``."""
    from keras import tree

    if y is None:
        raise ProbeDataError(
            "data: the probe batch needs targets y (data=(x, y)) to compute the loss"
        )
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    flat_x = tree.flatten(x)
    batches = {int(np.shape(a)[0]) for a in flat_x + tree.flatten(y) if np.ndim(a) > 0}
    if len(batches) > 1:
        raise ProbeDataError(f"data: x and y have different batch sizes {sorted(batches)}")
    if not inputs or len(inputs) != len(flat_x):
        return
    for a, spec in zip(flat_x, inputs):
        want, got = tuple(spec.shape), tuple(np.shape(a))
        if len(want) != len(got) or any(
            w is not None and w != g for w, g in zip(want[1:], got[1:])
        ):
            raise ProbeDataError(
                f"data: x has shape {got} but the model {model.name!r} expects {want}"
            )


def _shapes(structure) -> list[tuple]:
    """The shapes (``None``: unknown size) of the arrays, tensors or specs in ``structure``; those
    of unknown rank are left out."""
    from keras import tree

    out = []
    for a in tree.flatten(structure):
        if a is None:
            continue
        shape = a.shape if hasattr(a, "shape") else np.shape(a)
        if hasattr(shape, "as_list"):  # a tf.TensorShape
            if shape.rank is None:
                continue
            shape = shape.as_list()
        out.append(tuple(shape))
    return out


def _leading_size(x) -> int | None:
    """The static size of the first axis of ``x``'s first array, tensor or spec (``None``:
    unknown)."""
    shapes = _shapes(x)
    return shapes[0][0] if shapes and shapes[0] else None


def _stateful_batch_size(layer) -> int | None:
    """The batch size a built stateful recurrent layer keeps its states for; ``None`` for any other
    layer."""
    from keras import tree

    if not (isinstance(layer, keras.layers.RNN) and layer.stateful):
        return None
    states = [v for v in tree.flatten(getattr(layer, "states", None) or [])
              if isinstance(v, keras.Variable)]
    return int(states[0].shape[0]) if states and states[0].shape[0] is not None else None


def _check_stateful_batch(model, batch: int | None) -> None:
    """Raises ``ProbeDataError`` when the probe batch size differs from the one a stateful layer of
    ``model`` keeps its states for (the pass adds those states to the batch's, shape by shape)."""
    if batch is None:
        return
    for layer in model._flatten_layers(include_self=True, recursive=True):
        expected = _stateful_batch_size(layer)
        if expected is not None and expected != batch:
            raise ProbeDataError(
                f"data: the stateful layer {layer.name!r} keeps its states for batch size "
                f"{expected}, but the probe batch has {batch} examples; pass a probe batch of "
                f"exactly {expected} examples (e.g. data=(x[:{expected}], y[:{expected}]))"
            )


def gradient_norms(model, x, y, sample_weight=None, layers=None, input_norms: bool = True,
                   loss: Callable | None = None, align: str = "time",
                   kernel_norms: bool = False,
                   probe_dtype: str | None = None) -> dict[str, np.ndarray]:
    """One probe pass: ``{series key: [T] curve}`` for a batch ``(x, y)``, without recording.

    Same definition as ``GradientNormMonitor`` (the ``monitor`` module's docstring) and keys
    (the ``targets`` module's); a layer that receives a mask also gives ``<layer>/count``, and
    ``align`` (``"time"`` or ``"end"``) says how padded examples line up (``aggregate``);
    ``kernel_norms=True`` adds ``<layer>/recurrent_kernel`` for fr layers (``targets``).
    ``probe_dtype="float64"``: the pass runs a float64 copy of the model
    (``GradientNormMonitor``'s argument of that name). ``model`` must be compiled with a loss
    unless ``loss(y_true, y_pred) -> [batch]`` is given. Compiles a new pass each call;
    for repeated use keep a ``ProbePass`` or use the monitor.
    """
    _check_loss(model, loss)
    targets = discover(model, layers, input_norms)
    for t in targets:
        t.kernel = bool(kernel_norms)
    return ProbePass(model, targets, loss, align, dtype=probe_dtype)(x, y, sample_weight)


def check_probe_dtype(dtype):
    """``dtype`` for the probe pass (``None``, ``"float32"`` or ``"float64"``), else a
    ValueError that says so; also where the backend cannot compute in float64 (JAX without
    ``jax_enable_x64``; Keras ops that return float32 for float64 operands: PyTorch's matmul,
    JAX's tanh), which would silently compute in float32."""
    if dtype not in (None, "float32", "float64"):
        raise ValueError(f"probe_dtype must be None, 'float32' or 'float64', got {dtype!r}")
    if dtype == "float64" and keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            raise ValueError(
                "probe_dtype='float64' is not available on the JAX backend without "
                "jax_enable_x64: JAX computes float64 arrays in float32 unless "
                "jax.config.update('jax_enable_x64', True) ran before any array was made"
            )
    downcast = _float64_downcast() if dtype == "float64" else None
    if downcast is not None:
        raise ValueError(
            f"probe_dtype='float64' is not available on the {keras.backend.backend()!r} "
            f"backend: its keras.ops.{downcast} computes float64 operands in float32 (Keras "
            "maps 64-bit result types to 32-bit off TensorFlow), so the pass would not follow "
            "a gradient below float32's range; use probe_dtype=None, or the TensorFlow backend"
        )
    return dtype


def _float64_downcast() -> str | None:
    """The first of the operations the cells use whose result ``keras.ops`` computes in float32
    for float64 operands on this backend; ``None`` where all keep float64."""
    one = ops.ones((1, 1), "float64")
    for name in ("matmul", "tanh", "sigmoid", "add", "multiply"):
        fn = getattr(ops, name)
        out = fn(one, one) if name in ("matmul", "add", "multiply") else fn(one)
        if keras.backend.standardize_dtype(out.dtype) != "float64":
            return name
    return None


def _check_loss(model, loss):
    if loss is None and getattr(model, _COMPILE_LOSS_ATTR, None) is None:
        raise ValueError(
            f"the model {model.name!r} has no compiled loss: call model.compile(loss=...) or pass "
            "loss=fn(y_true, y_pred) -> per-example losses [batch]"
        )


__all__ = ["ProbePass", "gradient_norms"]
