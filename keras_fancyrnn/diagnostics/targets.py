"""Which layers a monitor probes, and under which series keys.

``discover`` resolves a selection (``None``, names, layers) to ``_Target`` s, walking nested
models, containers and Bidirectional wrappers.

Series (keys of ``GradientNormMonitor.history``):

* ``name``: ‖∂ℓ/∂h_t‖ of a recurrent layer: an fr layer (``keras_fancyrnn.RNN``), or a Keras one
  (``keras.layers.LSTM`` …), which the probe pass runs as its fr counterpart on the same
  variables (``diagnostics.probe_model``); a Keras ``RNN`` of ``StackedRNNCells`` gives one series
  per cell, named by the cell;
* ``name/cell``: ‖∂ℓ/∂c_t‖ of an LSTM's cell state, also the total derivative (its probe is
  added to ``c_t`` before ``h_t = o ⊙ tanh(c_t)`` is computed, see ``_lstm_cell_hook``); other
  cells' extra states are probed after the step as ``name/state{i}``;
* ``name/forward``, ``name/backward`` (and their ``/cell``) for the two directions of a
  Bidirectional wrapper (any layer with ``forward_layer``/``backward_layer``); the inner layers of
  a ``StackedRNN`` (or any container) by their own names;
* ``name/count``, for a layer that receives a mask: per ``t`` the number of probe examples whose
  step ``t`` is valid, over which the layer's curves are averaged (``aggregate``);
* ``name/recurrent_kernel`` (opt-in, ``kernel_norms=True``; fr layers): per ``t`` the Frobenius
  norm of step ``t``'s term of the BPTT sum for the recurrent kernel,
  ``Σ_i h_{t-1}^(i) ⊗ δ_t^(i)`` with ``δ_t = ∂ℓ/∂z_t`` the gradient of the pre-activations of
  ``z_t = x_t W + h_{t-1} U + b`` (for a GRU's candidate, of ``r ⊙ (h_{t-1} U_h)``'s product).
  The terms sum over ``t`` to the gradient of ``Σ_i ℓ_i`` for ``U``: which timesteps the update
  of ``U`` learns from. A sum over the probe batch, not a mean over it;
* ``name/input``: ‖∂ℓ/∂x_t‖ of the layer's input sequence (norm over all feature axes). It works
  for any layer whose first call argument is a float sequence ``[B, T, ...]`` in a Sequential or
  functional model (the probe model puts a probe before it). For a Bidirectional wrapper it is
  the wrapper's input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras

from keras_fancyrnn.errors import LayerSelectionError
from keras_fancyrnn.layers.base import RNN


@dataclass
class _Target:
    """One monitored layer: which of its series are probed and under which keys."""

    layer: keras.layers.Layer
    key: str
    states: bool  # an fr RNN: probe its states (h, and c for an LSTM)
    inputs: bool  # probe its input sequence -> key + "/input"
    path: tuple = field(default=())  # container names from the model down, for unique keys
    kernel: bool = False  # an fr RNN: the per-step recurrent-kernel gradient (opt-in)

    def state_keys(self) -> list[str]:
        cell = self.layer.cell
        if isinstance(cell, keras.layers.StackedRNNCells):  # probed as fr layers named by cell
            return [k for c in cell.cells for k in _cell_state_keys(c.name, c)]
        return _cell_state_keys(self.key, cell)

    def series_keys(self) -> list[str]:
        keys = self.state_keys() if self.states else []
        keys += [f"{self.key}/recurrent_kernel"] if self.kernel and self.states else []
        return keys + ([f"{self.key}/input"] if self.inputs else [])


def _cell_state_keys(key: str, cell) -> list[str]:
    sizes = cell.state_size
    n = len(sizes) if isinstance(sizes, (list, tuple)) else 1
    keys = [key]
    for i in range(1, n):
        lstm = i == 1 and _lstm_cell_hook(cell) is not None
        keys.append(f"{key}/cell" if lstm else f"{key}/state{i}")
    return keys


def _lstm_cell_hook(cell):
    """``"engine"`` when the cell adds the probes of its inner states inside ``step`` (fr's
    ``LSTMCell``: ``c_t`` before ``h_t = o ⊙ tanh(c_t)``), so ``∂ℓ/∂probe_t`` is the total
    ``∂ℓ/∂c_t``; ``None`` for any other cell, whose extra states the engine probes after the step
    (the gradient along the carry to ``t + 1``), under the key ``name/state{i}``."""
    in_step = getattr(cell, "probes_in_step", False) or type(cell) is keras.layers.LSTMCell
    return "engine" if in_step else None  # Keras's LSTMCell is probed as fr's (converted)


def _is_fr_rnn(layer) -> bool:
    return isinstance(layer, RNN)


def _has_states(layer) -> bool:
    """A recurrence whose states are probed: an fr layer, or a Keras one (the probe pass runs it
    as an fr layer, ``keras_fancyrnn.convert``; one that does not convert is reported then)."""
    return _is_fr_rnn(layer) or isinstance(layer, keras.layers.RNN)


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
    layer's name anywhere in the model or any series key the monitor reports (``"bidi/forward"``,
    ``"branch_a/top"`` for one of two nested layers named ``top``, ``"lstm/cell"``); a selected
    layer keeps the key it has when every layer is monitored. Selecting a container
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
        if side is not None:
            if _has_states(layer):
                out.append(_Target(layer, f"{parent.name}/{side}", True, False, path[:-1]))
        elif _is_bidirectional(layer):
            out.append(_Target(layer, layer.name, False, input_norms or explicit, path))
            for sub in (layer.forward_layer, layer.backward_layer):
                add(sub, layer, (*path, layer.name), False)
        elif _is_recurrent(layer):
            states = _has_states(layer)
            out.append(_Target(layer, layer.name, states, input_norms or (explicit and not states),
                               path))
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
        return _unique_keys([t for t in _dedupe(out) if t.series_keys()])
    for item in _as_selection(layers):
        for layer, parent, path in _resolve(item, entries, model):
            add(layer, parent, path, True)
    # keys as when every layer is monitored: a selected layer keeps the key it is reported under
    everything = discover(model, None, True)
    known = {id(t.layer): t.key for t in everything}
    targets = [t for t in _dedupe(out) if t.series_keys()]
    return _unique_keys(targets, known)


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
    if not found:  # any key the monitor reports: "bidi/forward", "branch_a/top", "lstm/cell" …
        for target in discover(model, None, True):
            if item == target.key or item in target.series_keys():
                found = [e for e in entries if e[0] is target.layer]
                break
    if not found and item.endswith("/input"):  # a layer's input series, selected explicitly
        found = [e for e in entries if e[0].name == item[: -len("/input")]]
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


def _unique_keys(targets: list[_Target], known: dict | None = None) -> list[_Target]:
    """Layers of nested models may share a name: prefix those keys with the container path.
    ``known``: ``id(layer) -> key`` of layers whose key is already decided."""
    known = known or {}
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.key] = counts.get(t.key, 0) + 1
    for t in targets:
        if id(t.layer) in known:
            t.key = known[id(t.layer)]
        elif counts[t.key] > 1 and t.path:
            t.key = "/".join((*t.path, t.key))
    keys = [k for t in targets for k in t.series_keys()]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise LayerSelectionError(f"layers: two monitored layers give the same series keys {dup}")
    return targets


__all__ = ["discover"]
