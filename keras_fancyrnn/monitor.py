r"""``GradientNormMonitor``: the per-timestep gradient-norm curve ‖∂ℓ/∂h_t‖, recorded during fit.

Definition. For a monitored recurrent layer and each timestep ``t`` (index in input
order, also for a backward direction), the recorded value is

.. math::  g_t = \frac{1}{B} \sum_{i=1}^{B} \left\lVert \frac{\partial \ell_i}{\partial h_t^{(i)}}
           \right\rVert_2

where :math:`\ell_i` is example ``i``'s loss under the model's compiled loss (the loss of a batch
holding only example ``i``, sample weights and masks included) and :math:`h_t` is the hidden state
the step outputs. It is the *total* derivative through the recurrence (BPTT,
:math:`\partial\ell/\partial h_t = \text{direct}_t + J_{t+1}^\top \partial\ell/\partial h_{t+1}`),
read off a zero probe :math:`p_t` that the engine adds to :math:`h_t` after each step:
:math:`\partial\ell/\partial p_t = \partial\ell/\partial h_t`. Because every :math:`\ell_i` depends
only on example ``i``, one backward pass of :math:`\sum_i \ell_i` gives all of them, and the mean
over examples does not depend on the probe batch size. At masked steps the probe is not added, so
a masked timestep contributes 0.

Series (keys of ``GradientNormMonitor.history``):

* ``name``: ‖∂ℓ/∂h_t‖ of an fr recurrent layer (``keras_fancyrnn.RNN``);
* ``name/cell``: ‖∂ℓ/∂c_t‖ of an LSTM's cell state, also the total derivative (its probe is
  added to ``c_t`` before ``h_t = o ⊙ tanh(c_t)`` is computed, see ``_lstm_cell_hook``); other
  cells' extra states are probed after the step as ``name/state{i}``;
* ``name/forward``, ``name/backward`` (and their ``/cell``) for the two directions of a
  Bidirectional wrapper (any layer with ``forward_layer``/``backward_layer``); the inner layers of
  a ``StackedRNN`` (or any container) by their own names;
* ``name/input``: ‖∂ℓ/∂x_t‖ of the layer's input sequence (norm over all feature axes). It works
  for any layer whose first call argument is a float sequence ``[B, T, ...]``, so Keras's own
  ``keras.layers.LSTM`` gets a curve too. For a Bidirectional wrapper it is the wrapper's input.

The probe pass runs the model with ``training=False`` inside its own ``tf.function`` (no XLA,
whatever the model was compiled with); it does not touch the optimizer or the metrics and restores
every non-trainable model variable (BatchNorm statistics, dropout ``SeedGenerator`` states) and
the states of stateful layers afterwards, so training is bit-identical with and without the
monitor. It is traced once per input signature with the batch size left unknown.

Under ``mixed_float16`` the per-example losses are multiplied by the ``LossScaleOptimizer``'s
current scale before the backward pass (and the norms divided by it), so norms down to about
``6e-8 / scale`` survive float16; ``mixed_bfloat16`` needs no scaling.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import keras
import numpy as np
from keras import ops

from keras_fancyrnn import probes
from keras_fancyrnn._tf import tf
from keras_fancyrnn.base import RNN
from keras_fancyrnn.diagnostics import reporting
from keras_fancyrnn.errors import LayerSelectionError, ProbeDataError

#: Records per ``every_n_batches`` when neither ``every_n_batches`` nor ``every_n_epochs`` is given.
DEFAULT_EVERY_N_BATCHES = 100

# Keras 3 internals this module relies on, in one place: the compiled loss object and its flat
# list of (path, loss, weight, name) and build structures; the mask attribute of tensors.
_COMPILE_LOSS_ATTR = "_compile_loss"


# --------------------------------------------------------------------------------------------
# Which layers, under which keys
# --------------------------------------------------------------------------------------------
@dataclass
class _Target:
    """One monitored layer: which probes its patched call adds and under which keys."""

    layer: keras.layers.Layer
    key: str
    states: bool  # an fr RNN: probe its states (h, and c for an LSTM)
    inputs: bool  # probe its input sequence -> key + "/input"
    path: tuple = field(default=())  # container names from the model down, for unique keys

    def state_keys(self) -> list[str]:
        sizes = self.layer.cell.state_size
        n = len(sizes) if isinstance(sizes, (list, tuple)) else 1
        keys = [self.key]
        for i in range(1, n):
            lstm = i == 1 and _lstm_cell_hook(self.layer.cell) is not None
            keys.append(f"{self.key}/cell" if lstm else f"{self.key}/state{i}")
        return keys

    def series_keys(self) -> list[str]:
        keys = self.state_keys() if self.states else []
        return keys + ([f"{self.key}/input"] if self.inputs else [])


def _lstm_cell_hook(cell):
    """``"engine"`` when the cell adds the probes of its inner states inside ``step`` (fr's
    ``LSTMCell``: ``c_t`` before ``h_t = o ⊙ tanh(c_t)``), so ``∂ℓ/∂probe_t`` is the total
    ``∂ℓ/∂c_t``; ``None`` for any other cell, whose extra states the engine probes after the step
    (the gradient along the carry to ``t + 1``), under the key ``name/state{i}``."""
    return "engine" if getattr(cell, "probes_in_step", False) else None


def _is_fr_rnn(layer) -> bool:
    return isinstance(layer, RNN)


def _is_bidirectional(layer) -> bool:
    return all(
        isinstance(getattr(layer, a, None), keras.layers.Layer)
        for a in ("forward_layer", "backward_layer")
    )


def _is_recurrent(layer) -> bool:
    """Default selection: fr layers, Keras's recurrent layers and bidirectional wrappers."""
    return _is_fr_rnn(layer) or isinstance(layer, keras.layers.RNN) or _is_bidirectional(layer)


def _children(layer) -> list:
    """Direct sublayers, in tracking order, plus a ``layers`` list (StackedRNN) if present."""
    kids = list(getattr(layer, "_layers", []) or [])
    extra = getattr(layer, "layers", None)
    if not isinstance(layer, keras.Model) and isinstance(extra, (list, tuple)):
        kids += [k for k in extra if isinstance(k, keras.layers.Layer)]
    seen, out = set(), []
    for k in kids:
        if id(k) not in seen and not isinstance(k, keras.layers.InputLayer):
            seen.add(id(k))
            out.append(k)
    return out


def _walk(model):
    """Yields ``(layer, parent, path)`` for every layer below ``model``, depth first, once each.
    Recursion stops at recurrent layers (their cells are not layers of interest)."""
    seen = set()

    def visit(layer, path):
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            yield child, layer, path
            if _is_bidirectional(child):
                for sub in (child.forward_layer, child.backward_layer):
                    seen.add(id(sub))
                    yield sub, child, (*path, child.name)
            elif not (_is_fr_rnn(child) or isinstance(child, keras.layers.RNN)):
                yield from visit(child, (*path, child.name))

    yield from visit(model, ())


def _side(layer, parent) -> str | None:
    """``"forward"``/``"backward"`` if ``layer`` is a direction of the wrapper ``parent``."""
    if parent is None or not _is_bidirectional(parent):
        return None
    if layer is parent.forward_layer:
        return "forward"
    return "backward" if layer is parent.backward_layer else None


def discover(model, layers=None, input_norms: bool = True) -> list[_Target]:
    """Resolves ``layers`` (``None``, a name, a layer, or a list of them) to probe targets.

    ``None``: every recurrent layer in the model (fr layers, Keras's ``keras.layers.RNN``
    subclasses, Bidirectional wrappers), nested models and containers included. A name may be a
    layer's name anywhere in the model or a series key (``"bidi/forward"``). Selecting a container
    (a nested model, a ``StackedRNN``) selects the recurrent layers inside it; a Bidirectional
    wrapper, both directions and its input; any other layer, its ``/input``.
    """
    entries = list(_walk(model))
    parents = {id(layer): parent for layer, parent, _ in entries}
    out: list[_Target] = []

    def inside(container):
        for entry in entries:
            parent = entry[1]
            while parent is not None and parent is not container:
                parent = parents.get(id(parent))
            if parent is container:
                yield entry

    def add(layer, parent, path, explicit):
        side = _side(layer, parent)
        fr = _is_fr_rnn(layer)
        if side is not None:
            if fr:
                out.append(_Target(layer, f"{parent.name}/{side}", True, False, path[:-1]))
        elif _is_bidirectional(layer):
            out.append(_Target(layer, layer.name, False, input_norms or explicit, path))
            for sub in (layer.forward_layer, layer.backward_layer):
                add(sub, layer, (*path, layer.name), False)
        elif _is_recurrent(layer):
            out.append(_Target(layer, layer.name, fr, input_norms or (explicit and not fr), path))
        elif explicit and any(_is_recurrent(e[0]) for e in inside(layer)):
            for sub, sub_parent, sub_path in inside(layer):
                if _is_recurrent(sub) and _side(sub, sub_parent) is None:
                    add(sub, sub_parent, sub_path, False)
        elif explicit:
            out.append(_Target(layer, layer.name, False, True, path))

    if layers is None:
        for layer, parent, path in entries:
            if _is_recurrent(layer) and _side(layer, parent) is None:
                add(layer, parent, path, False)
    else:
        for item in _as_selection(layers):
            for layer, parent, path in _resolve(item, entries, model):
                add(layer, parent, path, True)
    return _unique_keys([t for t in _dedupe(out) if t.series_keys()])


def _as_selection(layers) -> list:
    items = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    for item in items:
        if not isinstance(item, (str, keras.layers.Layer)):
            raise LayerSelectionError(
                "layers must be None, a layer name, a layer, or a list of them, got an item of "
                f"type {type(item).__name__}: {item!r}"
            )
    return items


def _resolve(item, entries, model) -> list:
    if isinstance(item, keras.layers.Layer):
        found = [e for e in entries if e[0] is item]
        if not found:
            raise LayerSelectionError(
                f"layers: the layer {item.name!r} is not part of the model {model.name!r}"
            )
        return found
    found = [e for e in entries if e[0].name == item]
    if not found:  # a series key such as "bidi/forward"
        for layer, parent, path in entries:
            side = _side(layer, parent)
            if side is not None and f"{parent.name}/{side}" == item:
                found.append((layer, parent, path))
    if not found:
        names = sorted({e[0].name for e in entries if _is_recurrent(e[0])})
        raise LayerSelectionError(
            f"layers: no layer named {item!r} in the model {model.name!r}; its recurrent layers "
            f"are {names}"
        )
    return found


def _dedupe(targets: list[_Target]) -> list[_Target]:
    seen, out = set(), []
    for t in targets:
        if id(t.layer) not in seen:
            seen.add(id(t.layer))
            out.append(t)
    return out


def _unique_keys(targets: list[_Target]) -> list[_Target]:
    """Layers of nested models may share a name: prefix those keys with the container path."""
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.key] = counts.get(t.key, 0) + 1
    for t in targets:
        if counts[t.key] > 1 and t.path:
            t.key = "/".join((*t.path, t.key))
    keys = [k for t in targets for k in t.series_keys()]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise LayerSelectionError(f"layers: two monitored layers give the same series keys {dup}")
    return targets


# --------------------------------------------------------------------------------------------
# Per-example losses under the compiled loss
# --------------------------------------------------------------------------------------------
def _get_mask(x):
    return getattr(x, "_keras_mask", None)


def _per_example_loss(loss_fn, y_true, y_pred, sample_weight):
    """``[B]`` losses: example ``i``'s value of ``loss_fn`` on a batch holding only example ``i``.

    Follows ``keras.losses.Loss.__call__``: the mask of ``y_pred`` (and of the values) and the
    sample weights weight the element losses; then the loss's reduction, per example.
    """
    from keras.src.losses.loss import squeeze_or_expand_to_same_rank

    in_mask = _get_mask(y_pred)
    dtype = loss_fn.dtype
    y_pred = ops.convert_to_tensor(y_pred, dtype=dtype)
    y_true = ops.convert_to_tensor(y_true, dtype=dtype)
    values = loss_fn.call(y_true, y_pred)
    out_mask = _get_mask(values)
    mask = in_mask if out_mask is None else (out_mask if in_mask is None else in_mask & out_mask)
    values = ops.convert_to_tensor(values, dtype=dtype)
    weights = None if sample_weight is None else ops.convert_to_tensor(sample_weight, dtype=dtype)
    if mask is not None:
        m = ops.cast(mask, dtype)
        if weights is not None:
            m, weights = squeeze_or_expand_to_same_rank(m, weights)
            weights = m * weights
        else:
            weights = m
    if weights is not None:
        values, weights = squeeze_or_expand_to_same_rank(values, weights)
        values = values * weights
    if len(values.shape) == 0:
        raise ValueError(
            f"the loss {loss_fn.name!r} returned a scalar from call(); the monitor needs "
            "per-example values (a Keras loss's call() returns them). Pass "
            "loss=fn(y_true, y_pred) -> [batch]."
        )
    axes = list(range(1, len(values.shape)))
    total = ops.sum(values, axis=axes) if axes else values
    reduction = loss_fn.reduction
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and weights is not None:
        w_axes = list(range(1, len(weights.shape)))
        denom = ops.sum(weights, axis=w_axes) if w_axes else weights
        return ops.divide_no_nan(total, denom)
    if mask is not None:  # Keras weights valid entries by total/valid: the mean over valid ones
        m = ops.cast(mask, dtype)
        m_axes = list(range(1, len(m.shape)))
        count = ops.sum(m, axis=m_axes) if m_axes else m
        return ops.divide_no_nan(total, count)
    count = 1
    for d in values.shape[1:]:
        count *= d
    return total / ops.cast(count, dtype)


def _compiled_per_example_losses(model, y_true, y_pred, sample_weight):
    """``[B]``: the sum over outputs of weighted per-example losses, as the compiled loss does."""
    from keras import tree

    compile_loss = getattr(model, _COMPILE_LOSS_ATTR, None)
    if tree.is_nested(y_pred) or tree.is_nested(y_true):
        try:
            tree.assert_same_structure(y_pred, y_true)
        except (ValueError, TypeError):
            if isinstance(y_pred, (list, tuple)) and isinstance(y_true, dict):
                y_true = [y_true[n] for n in model.output_names]
            y_true = tree.pack_sequence_as(y_pred, tree.flatten(y_true))
        for attr, value in (("_y_pred_build_structure", y_pred), ("_y_true_build_structure",
                                                                   y_true)):
            structure = getattr(compile_loss, attr, None)
            if structure is None:
                continue
            try:
                tree.assert_same_structure(structure, value)
            except (ValueError, TypeError):
                value = tree.pack_sequence_as(structure, tree.flatten(value))
            if attr == "_y_pred_build_structure":
                y_pred = value
            else:
                y_true = value
    total = None
    for path, loss_fn, weight, _ in compile_loss._flat_losses:
        y_t, y_p, sw = y_true, y_pred, sample_weight
        for p in path:
            y_t, y_p = y_t[p], y_p[p]
            if sw is not None and tree.is_nested(sw):
                sw = sw[p]
        value = ops.cast(_per_example_loss(loss_fn, y_t, y_p, sw), "float32")
        if weight is not None:
            value = value * weight
        total = value if total is None else total + value
    if total is None:
        raise ValueError("the model's compiled loss has no loss term for any output")
    return total


# --------------------------------------------------------------------------------------------
# The probe pass
# --------------------------------------------------------------------------------------------
def _as_tensor(a):
    return a if a is None or isinstance(a, tf.Tensor) else tf.convert_to_tensor(a)


def _first_arg_name(fn) -> str | None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[0].name if params else None


class ProbePass:
    """One forward + backward pass of a model on a batch that returns ``{key: [T] curve}``.

    Built once per model and target list; traced once per input signature (shapes without the
    batch dimension, dtypes). Used by ``GradientNormMonitor`` and ``gradient_norms``.
    """

    def __init__(self, model, targets: list[_Target], loss: Callable | None = None):
        self.model = model
        self.targets = targets
        self.loss = loss
        self._fn = tf.function(self._pass, jit_compile=False)
        self._concrete: dict = {}  # one trace per input signature, batch size left unknown
        self._checked = False
        self._trace_errors: list[str] = []  # found while tracing; raised eagerly, every call

    # -- public ----------------------------------------------------------------------------
    def __call__(self, x, y, sample_weight=None, loss_scale: float = 1.0) -> dict[str, np.ndarray]:
        _check_stateful_batch(self.model, _leading_size(x))  # every call: dataset batches vary
        if not self._checked:
            self._prepare(x, y, sample_weight)
        try:
            args = tf.nest.map_structure(_as_tensor, (x, y, sample_weight))
            out = self._concrete_for(args)(*args, tf.constant(loss_scale, tf.float32))
        except (ValueError, TypeError, KeyError, IndexError, tf.errors.InvalidArgumentError) as e:
            if self._checked:
                raise
            raise ProbeDataError(
                f"data: the probe batch does not fit the model {self.model.name!r} and its "
                f"compiled loss ({type(e).__name__}: {e})"
            ) from e
        if self._trace_errors:
            raise LayerSelectionError(self._trace_errors[0])
        order = [k for t in self.targets for k in t.series_keys()]
        missing = [k for k in order if k not in out]
        if missing:
            raise LayerSelectionError(
                f"layers: {missing} were not computed: the layer is not called in the model's "
                "forward pass"
            )
        self._checked = True
        return {k: out[k].numpy() for k in order}

    # -- internals -------------------------------------------------------------------------
    def _concrete_for(self, args):
        """The traced pass for these argument shapes with the batch dimension unknown: one trace
        serves every probe batch size (and a batch of unknown size is what Keras's own training
        step sees, so the layers run the code path they run in fit)."""
        specs = tf.nest.map_structure(
            lambda t: None if t is None else tf.TensorSpec((None, *t.shape[1:]), t.dtype), args
        )
        key = repr(specs)
        if key not in self._concrete:
            self._concrete[key] = self._fn.get_concrete_function(
                *specs, tf.TensorSpec((), tf.float32)
            )
        return self._concrete[key]

    def _prepare(self, x, y, sample_weight):
        """Eager checks and builds before the first trace (so nothing is built inside it)."""
        _check_batch(self.model, x, y, sample_weight)
        compile_loss = getattr(self.model, _COMPILE_LOSS_ATTR, None)
        need_loss_build = self.loss is None and compile_loss is not None and not getattr(
            compile_loss, "built", True
        )
        if not self.model.built or need_loss_build:
            state = _mutable_state(self.model) if self.model.built else []
            snapshot = [tf.identity(v.value) for v in state]
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

    @contextlib.contextmanager
    def _patched(self, tape, collected: dict):
        """Zero probes for every target: keras_fancyrnn layers through a probe request the
        engine reads (``keras_fancyrnn.probes``); any other layer's input by replacing its
        ``call`` (instance attribute), restored on exit."""
        requests = {t.layer: self._request(t, tape, collected)
                    for t in self.targets if _is_fr_rnn(t.layer)}
        saved = []
        for target in self.targets:
            layer = target.layer
            if _is_fr_rnn(layer):
                continue
            had_own = "call" in layer.__dict__
            original = layer.__dict__.get("call", None) if had_own else None
            call = layer.call
            patched = self._make_patched(target, call, tape, collected)
            saved.append((layer, had_own, original))
            object.__setattr__(layer, "call", patched)
        try:
            with probes.scope(requests):
                yield
        finally:
            for layer, had_own, original in reversed(saved):
                if had_own:
                    object.__setattr__(layer, "call", original)
                else:
                    object.__delattr__(layer, "call")

    @staticmethod
    def _request(target: _Target, tape, collected: dict):
        """The probe request of a keras_fancyrnn layer: zero probes shaped like its input
        (after its cast to the compute dtype), watched on ``tape`` and recorded in
        ``collected``; none for the second call of a shared layer."""

        def request(layer, sequences):
            if target.key in collected or f"{target.key}/input" in collected:
                return {}  # a shared layer: probe its first call only
            made = {}
            if target.inputs:
                made["input"] = collected[f"{target.key}/input"] = tf.zeros_like(sequences)
            if target.states:
                shape = tf.shape(sequences)
                batch = sequences.shape[0] if sequences.shape[0] is not None else shape[0]
                steps = sequences.shape[1] if sequences.shape[1] is not None else shape[1]
                sizes = layer.cell.state_size
                sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
                for i, (key, size) in enumerate(zip(target.state_keys(), sizes)):
                    made[i] = collected[key] = tf.zeros([batch, steps, size],
                                                        dtype=layer.cell.compute_dtype)
            tape.watch(list(made.values()))
            return made

        return request

    def _make_patched(self, target: _Target, call, tape, collected: dict):
        """``call`` of a layer that is not a keras_fancyrnn RNN, adding a zero probe to its
        input sequence (its ``name/input`` series)."""
        layer = target.layer
        errors = self._trace_errors
        first = _first_arg_name(call)

        def patched(*args, **kwargs):
            if target.key in collected or f"{target.key}/input" in collected:
                return call(*args, **kwargs)  # a shared layer: probe its first call only
            args = list(args)
            in_args = bool(args)
            if in_args:
                seq = args[0]
            elif first in kwargs:
                seq = kwargs[first]
            else:
                errors.append(f"layers: cannot find the input sequence of {layer.name!r}")
                return call(*args, **kwargs)
            seq_t = tf.convert_to_tensor(seq)
            if seq_t.shape.rank is not None and seq_t.shape.rank < 3:
                errors.append(
                    f"layers: {layer.name!r} does not take a sequence [batch, time, ...]: its "
                    f"input has shape {tuple(seq_t.shape)}"
                )
                return call(*args, **kwargs)
            if target.inputs and _is_recurrent(layer) and (
                seq_t.dtype.is_integer or seq_t.dtype == tf.bool
            ):  # the layer computes it in its compute dtype: the gradient is w.r.t. that
                seq_t = tf.cast(seq_t, layer.compute_dtype)
            if target.inputs and not seq_t.dtype.is_floating:
                errors.append(
                    f"layers: the input of {layer.name!r} is {seq_t.dtype.name}, not a float "
                    "sequence, so it has no gradient; select a later layer"
                )
                return call(*args, **kwargs)
            if target.inputs:
                p_in = tf.zeros_like(seq_t)
                tape.watch(p_in)
                new_seq = seq_t + p_in
                mask = _get_mask(seq)
                if mask is not None:
                    with contextlib.suppress(AttributeError):
                        new_seq._keras_mask = mask
                collected[f"{target.key}/input"] = p_in
                if in_args:
                    args[0] = new_seq
                else:
                    kwargs[first] = new_seq
            return call(*args, **kwargs)

        return patched

    def _pass(self, x, y, sample_weight, loss_scale):
        model = self.model
        state = _mutable_state(model)
        snapshot = [tf.identity(v.value) for v in state]
        collected: dict = {}
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            with self._patched(tape, collected):
                y_pred = model(x, training=False)
            losses = self._losses(y, y_pred, sample_weight)
            total = tf.reduce_sum(tf.cast(losses, tf.float32)) * loss_scale
        for v, s in zip(state, snapshot):  # BatchNorm stats, RNN states, seed generators
            v.assign(s)
        keys = list(collected)
        grads = tape.gradient(total, [collected[k] for k in keys],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        curves = {}
        for k, g in zip(keys, grads):
            g = tf.cast(g, tf.float32) / loss_scale
            axes = list(range(2, g.shape.rank))
            if axes:  # scaled by the max, so that norms below ~1e-19 do not underflow to 0
                m = tf.reduce_max(tf.abs(g), axis=axes, keepdims=True)
                safe = tf.where(m > 0, m, tf.ones_like(m))
                norms = tf.squeeze(m, axes) * tf.sqrt(
                    tf.reduce_sum(tf.square(g / safe), axis=axes))
            else:
                norms = tf.abs(g)
            curves[k] = tf.reduce_mean(norms, axis=0)
        return curves


def _mutable_state(model) -> list:
    """Every variable a forward pass may write: the non-trainable variables (BatchNorm
    statistics, ``SeedGenerator`` states, frozen weights) and the states of stateful RNN layers
    (Keras does not list those among the layer's variables)."""
    out, seen = [], set()
    layers = model._flatten_layers(include_self=True, recursive=True)
    candidates = list(model.non_trainable_variables)
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
        if isinstance(shape, tf.TensorShape):
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
                   loss: Callable | None = None) -> dict[str, np.ndarray]:
    """One probe pass: ``{series key: [T] curve}`` for a batch ``(x, y)``, without recording.

    Same definition and keys as ``GradientNormMonitor`` (module docstring). ``model`` must be
    compiled with a loss unless ``loss(y_true, y_pred) -> [batch]`` is given. Builds a new
    ``tf.function`` each call; for repeated use keep a ``ProbePass`` or use the monitor.
    """
    _check_loss(model, loss)
    return ProbePass(model, discover(model, layers, input_norms), loss)(x, y, sample_weight)


def _check_loss(model, loss):
    if loss is None and getattr(model, _COMPILE_LOSS_ATTR, None) is None:
        raise ValueError(
            f"the model {model.name!r} has no compiled loss: call model.compile(loss=...) or pass "
            "loss=fn(y_true, y_pred) -> per-example losses [batch]"
        )


# --------------------------------------------------------------------------------------------
# Derived scalars
# --------------------------------------------------------------------------------------------
def _positive(curve) -> np.ndarray:
    c = np.asarray(curve, dtype=np.float64)
    return np.flatnonzero(np.isfinite(c) & (c > 0))


def ratio_first_last(curve) -> float:
    r"""``‖∂ℓ/∂h_first‖ / ‖∂ℓ/∂h_last‖`` over the timesteps with a positive norm (masked steps
    report 0 and are skipped); ``nan`` if fewer than one. ``≪ 1``: the signal from the far end
    vanishes; ``≫ 1``: it explodes."""
    idx = _positive(curve)
    if idx.size == 0:
        return math.nan
    c = np.asarray(curve, dtype=np.float64)
    return float(c[idx[0]] / c[idx[-1]])


def decay_rate(curve) -> float:
    r"""Least-squares slope of :math:`\ln g_t` over ``t`` (timesteps with a positive norm): the
    fitted exponential rate per timestep, :math:`g_t \approx A e^{\text{rate}\, t}`. Positive: the
    gradient shrinks by about :math:`e^{-\text{rate}}` per step it travels back in time."""
    idx = _positive(curve)
    if idx.size < 2:
        return math.nan
    logs = np.log(np.asarray(curve, dtype=np.float64)[idx])
    t = idx.astype(np.float64)
    t = t - t.mean()
    return float(np.dot(t, logs - logs.mean()) / np.dot(t, t))


def derived_scalars(curves: dict[str, np.ndarray]) -> dict[str, float]:
    """``{key + "/grad_ratio": ratio_first_last, key + "/grad_decay": decay_rate}``."""
    out = {}
    for k, c in curves.items():
        out[f"{k}/grad_ratio"] = ratio_first_last(c)
        out[f"{k}/grad_decay"] = decay_rate(c)
    return out


def _clipping_stats(optimizer) -> dict[str, float]:
    """The stats of an ``fr.ClippingOptimizer`` (``clip/<name>``), ``{}`` for other optimizers.
    Imported lazily: the optimizer module is optional here."""
    try:
        from keras_fancyrnn import optimizers as fr_optimizers
    except ImportError:
        return {}
    cls = getattr(fr_optimizers, "ClippingOptimizer", None)
    inner = optimizer
    while inner is not None and cls is not None and not isinstance(inner, cls):
        inner = getattr(inner, "inner_optimizer", None)  # e.g. under a LossScaleOptimizer
    if cls is None or inner is None:
        return {}
    stats = None
    for attr in ("stats", "get_stats", "clipping_stats"):
        if hasattr(inner, attr):
            try:
                stats = getattr(inner, attr)
                stats = stats() if callable(stats) else stats
            except (ValueError, RuntimeError, AttributeError):  # e.g. not built yet
                return {}
            break
    if stats is None:  # fall back to its non-trainable stat variables
        stats = {v.name: v for v in getattr(inner, "variables", [])
                 if getattr(v, "name", "") and "iteration" not in v.name
                 and np.size(np.asarray(v)) == 1}
    out = {}
    for k, v in dict(stats).items():
        try:
            value = np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if value.size == 1:
            out[f"clip/{k}"] = float(value.reshape(()))
    return out


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------
def _unpack(element, where: str):
    if isinstance(element, dict) or not isinstance(element, (tuple, list)) or not 2 <= len(
        element
    ) <= 3:
        raise ProbeDataError(
            f"data: {where} must give (x, y) or (x, y, sample_weight), got "
            f"{type(element).__name__}"
            + (f" of length {len(element)}" if isinstance(element, (tuple, list)) else "")
        )
    x, y = element[0], element[1]
    return x, y, (element[2] if len(element) == 3 else None)


def _model_input_ranks(model) -> list[int] | None:
    try:
        return [len(spec.shape) for spec in model.inputs]
    except (AttributeError, TypeError, ValueError):  # a subclassed model has no declared inputs
        return None


def _check_batched(x, y, sample_weight, model=None) -> None:
    """Raises ``ProbeDataError`` when a dataset element (or its spec) is not a batch: a component
    without a leading axis, components whose leading sizes differ, or an ``x`` with one axis fewer
    than every input of ``model``. A dataset of single examples gives such elements; without this
    check the first record would fail on mismatched shapes, far from the cause."""
    parts = {"x": _shapes(x), "y": _shapes(y), "sample_weight": _shapes(sample_weight)}
    flat = [shape for shapes in parts.values() for shape in shapes]
    leading = {shape[0] for shape in flat if shape and shape[0] is not None}
    single = any(not shape for shape in flat) or len(leading) > 1
    ranks = None if model is None else _model_input_ranks(model)
    if not single and ranks and len(ranks) == len(parts["x"]):
        single = all(len(shape) == rank - 1 for shape, rank in zip(parts["x"], ranks))
    if single:
        got = ", ".join(f"{name} {shapes[0] if len(shapes) == 1 else shapes}"
                        for name, shapes in parts.items() if shapes)
        raise ProbeDataError(
            "data: a tf.data.Dataset must yield batches (x of shape [batch, time, ...] and y, "
            f"sample_weight with the same leading batch axis), but its elements look like single "
            f"examples ({got}); call .batch(n) on it, e.g. data=dataset.batch(32)"
        )


def _positive_int_or_none(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
    return value


class GradientNormMonitor(keras.callbacks.Callback):
    r"""Records the per-timestep gradient-norm curve ‖∂ℓ/∂h_t‖ of recurrent layers during fit.

    .. math::  g_t = \tfrac{1}{B}\textstyle\sum_i \lVert \partial\ell_i/\partial h_t^{(i)}\rVert_2

    the total derivative through the recurrence (the engine's zero probe), mean over the examples
    of the probe batch, so independent of its size; masked timesteps report 0 (see the module
    docstring for the keys: ``name``, ``name/cell``, ``name/forward``, ``name/input`` …).

    Args:
        data: the probe batch: ``(x, y)`` or ``(x, y, sample_weight)`` arrays (used whole, every
            record), a ``tf.data.Dataset`` of such batches (one batch per record, cycled), or a
            callable returning one.
        layers: ``None`` (every recurrent layer, nested models and wrappers included), or layer
            names / layer objects; a non-recurrent layer taking a sequence gets its ``/input``.
        every_n_batches: record every ``n`` training steps (counted across epochs and fits).
        every_n_epochs: record at the end of every ``n``-th epoch. With neither given,
            ``every_n_batches=100`` (``DEFAULT_EVERY_N_BATCHES``).
        record_at_train_begin: also record at the start of ``fit`` (the curve at initialisation).
        input_norms: also record ``name/input`` for every monitored layer.
        log_dir: write TensorBoard summaries under ``log_dir/gradient_norms``.
        csv_path / npz_path: write every record to disk as it is taken.
        log_scalars: add ``key/grad_ratio`` and ``key/grad_decay`` (and an fr
            ``ClippingOptimizer``'s ``clip/…`` stats) to the batch logs of a recording step and to
            every epoch's logs (so they reach ``History`` and the progress bar).
        loss: optional ``fn(y_true, y_pred) -> [batch]`` per-example losses, instead of the
            model's compiled loss.

    Attributes: ``history`` (``{key: [n_records, T]}``), ``steps``, ``epochs``, ``scalars``
    (``{name: [n_records]}``); ``plot()`` draws them; ``record()`` takes one now (also outside
    ``fit``, after ``set_model(model)``); ``compute(x, y)`` returns curves without recording.

    Put the monitor before callbacks that should see its logs (``CSVLogger``, ``TensorBoard``,
    ``EarlyStopping``); Keras's ``History`` and progress bar come after user callbacks anyway.
    Cost: one forward + backward pass on the probe batch per record (about two training steps
    for a probe batch twice the training batch) every ``every_n_batches``
    (benchmarks/monitor_overhead.py measures it).
    """

    def __init__(
        self,
        data,
        layers=None,
        every_n_batches: int | None = None,
        every_n_epochs: int | None = None,
        record_at_train_begin: bool = True,
        input_norms: bool = True,
        log_dir: str | None = None,
        csv_path: str | None = None,
        npz_path: str | None = None,
        log_scalars: bool = True,
        loss: Callable | None = None,
    ):
        super().__init__()
        self.every_n_batches = _positive_int_or_none("every_n_batches", every_n_batches)
        self.every_n_epochs = _positive_int_or_none("every_n_epochs", every_n_epochs)
        if self.every_n_batches is None and self.every_n_epochs is None:
            self.every_n_batches = DEFAULT_EVERY_N_BATCHES
        if layers is not None:
            _as_selection(layers)
        self.layers = layers
        self.record_at_train_begin = bool(record_at_train_begin)
        self.input_norms = bool(input_norms)
        self.log_scalars = bool(log_scalars)
        self.loss = loss
        self._dataset_spec = None  # (x, y, sample_weight) element specs of a dataset
        self._static_batch = None  # the probe batch size, where known before drawing a batch
        self._data_source = self._make_source(data)
        self._csv = reporting.CSVWriter(csv_path) if csv_path else None
        self._npz = reporting.NPZWriter(npz_path) if npz_path else None
        self._tb = reporting.TensorBoardWriter(log_dir) if log_dir else None
        self._probe: ProbePass | None = None
        self._probe_model = None
        self._curves: dict[str, list[np.ndarray]] = {}
        self._scalars: dict[str, list[float]] = {}
        self._steps: list[int] = []
        self._epochs: list[int] = []
        self._latest_scalars: dict[str, float] = {}
        self._global_step = 0
        self._batches_in_epoch = 0
        self._epoch = 0
        self._last_record_step: int | None = None

    # -- data ------------------------------------------------------------------------------
    def _make_source(self, data):
        if isinstance(data, tf.data.Dataset):
            self._dataset_spec = _unpack(data.element_spec, "the dataset")
            _check_batched(*self._dataset_spec)
            self._static_batch = _leading_size(self._dataset_spec[0])
            state = {"it": None}

            def from_dataset():
                for _ in range(2):
                    if state["it"] is None:
                        state["it"] = iter(data)
                    try:
                        element = _unpack(next(state["it"]), "the dataset")
                    except StopIteration:
                        state["it"] = None
                        continue
                    _check_batched(*element)  # sizes the spec left unknown
                    return element
                raise ProbeDataError("data: the dataset is empty; it must yield at least one batch")

            return from_dataset
        if callable(data) and not isinstance(data, (tuple, list)):
            return lambda: _unpack(data(), "the callable")
        if isinstance(data, (tuple, list)):
            x, y, sw = _unpack(data, "data")
            from keras import tree

            def to_tensor(a):
                return a if a is None else tf.convert_to_tensor(a)

            fixed = (tree.map_structure(to_tensor, x), tree.map_structure(to_tensor, y),
                     None if sw is None else tree.map_structure(to_tensor, sw))
            self._static_batch = _leading_size(fixed[0])
            return lambda: fixed
        raise ProbeDataError(
            "data must be a tuple (x, y) or (x, y, sample_weight), a tf.data.Dataset of such "
            f"batches, or a callable returning one, got {type(data).__name__}"
        )

    # -- recording -------------------------------------------------------------------------
    def _ensure_probe(self):
        model = self.model
        if model is None:
            raise ValueError("GradientNormMonitor has no model: pass it to fit() or set_model()")
        if self._probe is None or self._probe_model is not model:
            _check_loss(model, self.loss)
            targets = discover(model, self.layers, self.input_norms)
            if not targets:
                raise LayerSelectionError(
                    f"layers: the model {model.name!r} has no recurrent layer to monitor; pass "
                    "layers=[...] to name layers that take a sequence"
                )
            if self._dataset_spec is not None:  # now the model's input ranks can tell
                _check_batched(*self._dataset_spec, model=model)
            # before the first record, which may be many steps into fit
            _check_stateful_batch(model, self._static_batch)
            self._probe = ProbePass(model, targets, self.loss)
            self._probe_model = model
        return self._probe

    def _loss_scale(self) -> float:
        optimizer = getattr(self.model, "optimizer", None)
        scale = getattr(optimizer, "dynamic_scale", None)
        if scale is None or not any(
            getattr(t.layer, "compute_dtype", "float32") == "float16" for t in self._probe.targets
        ):
            return 1.0
        return float(np.asarray(scale))

    def compute(self, x, y, sample_weight=None) -> dict[str, np.ndarray]:
        """The curves for one batch, without recording them."""
        probe = self._ensure_probe()
        return probe(x, y, sample_weight, self._loss_scale())

    def record(self, step: int | None = None) -> dict[str, np.ndarray]:
        """Takes one record now (next probe batch) and writes it; returns ``{key: [T]}``."""
        probe = self._ensure_probe()
        x, y, sw = self._data_source()
        curves = probe(x, y, sw, self._loss_scale())
        step = self._global_step if step is None else int(step)
        scalars = derived_scalars(curves)
        scalars.update(_clipping_stats(getattr(self.model, "optimizer", None)))
        n = len(self._steps)
        for k, c in curves.items():
            self._curves.setdefault(k, [None] * n).append(c)
        for k in self._curves:
            if len(self._curves[k]) == n:  # a series missing from this record
                self._curves[k].append(None)
        for k, v in scalars.items():
            self._scalars.setdefault(k, [math.nan] * n).append(v)
        for k in self._scalars:
            if len(self._scalars[k]) == n:
                self._scalars[k].append(math.nan)
        self._steps.append(step)
        self._epochs.append(self._epoch)
        self._latest_scalars = scalars
        self._last_record_step = step
        if self._csv is not None:
            self._csv.write(step, self._epoch, curves)
        if self._npz is not None:
            self._npz.write(self.steps, self.epochs, self.history)
        if self._tb is not None:
            self._tb.write(step, curves, scalars)
        return curves

    # -- results ---------------------------------------------------------------------------
    @property
    def history(self) -> dict[str, np.ndarray]:
        """``{key: float32 [n_records, T]}``; NaN where a record lacks a timestep or series."""
        out = {}
        for k, rows in self._curves.items():
            width = max((len(r) for r in rows if r is not None), default=0)
            arr = np.full((len(rows), width), np.nan, dtype=np.float32)
            for i, r in enumerate(rows):
                if r is not None:
                    arr[i, : len(r)] = r
            out[k] = arr
        return out

    @property
    def steps(self) -> np.ndarray:
        """The training step (optimizer updates so far) of each record."""
        return np.asarray(self._steps, dtype=np.int64)

    @property
    def epochs(self) -> np.ndarray:
        """The (0-based) epoch during which each record was taken."""
        return np.asarray(self._epochs, dtype=np.int64)

    @property
    def scalars(self) -> dict[str, np.ndarray]:
        """Derived scalars per record: ``{key/grad_ratio, key/grad_decay, clip/…: [n_records]}``."""
        return {k: np.asarray(v, dtype=np.float64) for k, v in self._scalars.items()}

    def plot(self, path: str | None = None, keys: Iterable[str] | None = None):
        """Heatmap (record × timestep, log colour scale) and the first and latest curves, one row
        per series. Saves to ``path`` if given; returns the matplotlib ``Figure``."""
        history = self.history
        if not history:
            raise ValueError("plot: nothing recorded yet")
        if keys is not None:
            keys = list(keys)
            unknown = [k for k in keys if k not in history]
            if unknown:
                raise ValueError(f"keys: {unknown} not recorded; recorded: {sorted(history)}")
            history = {k: history[k] for k in keys}
        return reporting.plot_history(self.steps, history, path)

    # -- callback hooks --------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._ensure_probe()
        optimizer = getattr(self.model, "optimizer", None)
        iterations = getattr(optimizer, "iterations", None)
        if iterations is not None:
            with contextlib.suppress(TypeError, ValueError):
                self._global_step = int(np.asarray(iterations))
        self._batches_in_epoch = 0
        if self.record_at_train_begin:
            self.record()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        self._batches_in_epoch = 0

    def on_train_batch_end(self, batch, logs=None):
        done = int(batch) + 1
        before = self._global_step
        self._global_step += max(done - self._batches_in_epoch, 0)
        self._batches_in_epoch = done
        n = self.every_n_batches
        if n and self._global_step // n > before // n and self._last_record_step != (
            self._global_step
        ):
            self.record()
            if self.log_scalars and logs is not None:
                logs.update(self._latest_scalars)

    def on_epoch_end(self, epoch, logs=None):
        n = self.every_n_epochs
        if n and (int(epoch) + 1) % n == 0 and self._last_record_step != self._global_step:
            self.record()
        if self.log_scalars and logs is not None:
            logs.update(self._latest_scalars)
            logs.update(_clipping_stats(getattr(self.model, "optimizer", None)))

    def on_train_end(self, logs=None):
        if self._tb is not None:
            self._tb.flush()



__all__ = [
    "DEFAULT_EVERY_N_BATCHES",
    "GradientNormMonitor",
    "ProbePass",
    "decay_rate",
    "derived_scalars",
    "discover",
    "gradient_norms",
    "ratio_first_last",
]
