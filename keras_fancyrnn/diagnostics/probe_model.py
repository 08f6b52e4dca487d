"""The model a probe pass runs, and which of its layers give which series.

Every probe goes through ``keras_fancyrnn.engine.probes``: an fr recurrent layer adds the probes
of its states (and of its input) inside the engine; nothing replaces a layer's ``call``. Where the
user's model needs no more (its monitored recurrences are fr layers, and the only other input
series are those of Bidirectional wrappers of fr layers, the sum of the two directions' input
gradients) the probe pass runs the model itself. Otherwise it runs a *probe model*
(``keras_fancyrnn.convert.Rebuild``): the same layers and variables, with each Keras recurrent
layer replaced by its fr counterpart reading the Keras layer's own variables (nothing is copied,
training sees no difference), and an ``InputProbe`` before each other layer whose input series is
asked for. With ``dtype="float64"`` every layer is cloned in float64 and the weights are copied,
cast, before each pass (the training model is untouched).

A layer the probe model cannot reach (a Keras layer inside a subclassed model, a Keras RNN subclass
or cell it cannot convert) is left out with one warning that names it and says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from keras_fancyrnn.convert import Rebuild, needs_conversion
from keras_fancyrnn.diagnostics.targets import _is_bidirectional, _is_fr_rnn, _Target
from keras_fancyrnn.errors import ConversionError
from keras_fancyrnn.layers.stacked import StackedRNN


@dataclass
class Plan:
    """What one probe pass runs and asks for.

    ``states``: ``id(fr layer) -> (layer, [key per state])``; ``inputs``: ``id(layer) -> (layer,
    [keys])``, the layers (fr RNNs, ``InputProbe`` s) whose input probe's gradient adds to each
    key's input series (two for a Bidirectional wrapper); ``order``: the series keys.
    """

    model: Any
    order: list[str] = field(default_factory=list)
    states: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    rebuild: Rebuild | None = None

    def sync(self) -> None:
        """Copies the weights into a probe model that has its own (the float64 one)."""
        if self.rebuild is not None:
            self.rebuild.sync()

    def add_states(self, layer, keys: list[str]) -> None:
        self.states[id(layer)] = (layer, keys)
        self.order += keys

    def add_input(self, layers: list, key: str) -> None:
        for layer in layers:
            self.inputs.setdefault(id(layer), (layer, []))[1].append(key)
        self.order.append(key)


def _wrapper_sides(layer) -> list | None:
    """The two fr directions of a Bidirectional wrapper, whose input probes sum to the wrapper's
    input gradient; ``None`` where a direction is not an fr layer."""
    sides = [layer.forward_layer, layer.backward_layer]
    return sides if all(_is_fr_rnn(s) for s in sides) else None


def _input_probe_needed(target: _Target) -> bool:
    """An input series that neither an fr layer's engine nor a wrapper's fr directions give."""
    layer = target.layer
    return target.inputs and not _is_fr_rnn(layer) and not (
        _is_bidirectional(layer) and _wrapper_sides(layer) is not None)


def _needs_rebuild(target: _Target) -> bool:
    return (target.states and needs_conversion(target.layer)) or _input_probe_needed(target)


def plan(model, targets: list[_Target], dtype: str | None = None) -> Plan:
    """The probe model and its probes for ``targets`` (found on ``model``), warning once for each
    target it cannot reach."""
    rebuild, why = None, None
    if dtype is not None or any(_needs_rebuild(t) for t in targets):
        input_ids = {id(t.layer) for t in targets if _input_probe_needed(t)}
        try:
            rebuild = Rebuild(model, share_weights=True, dtype=dtype, lenient=True,
                              input_probe=lambda layer: id(layer) in input_ids)
        except ConversionError as e:
            if dtype is not None:
                raise
            why = str(e)
    out = Plan(rebuild.model if rebuild is not None else model, rebuild=rebuild)
    for t in targets:
        problem = _add(out, t, rebuild)
        if problem:
            warnings.warn(f"GradientNormMonitor: the layer {t.layer.name!r} is not monitored "
                          f"({', '.join(problem)}): {why or _why(t.layer, rebuild)}",
                          RuntimeWarning, stacklevel=4)
    return out


def _why(layer, rebuild: Rebuild | None) -> str:
    if rebuild is not None and id(layer) in rebuild.failed:
        return rebuild.failed[id(layer)]
    return ("it is inside a subclassed layer or model, which cannot be rebuilt layer by layer to "
            "run its recurrences as fr layers; use fr layers there (fr.LSTM …)")


def _add(out: Plan, target: _Target, rebuild: Rebuild | None) -> list[str]:
    """Adds the probes of one target on the probe model; returns the series it cannot give."""
    layer = target.layer
    new = layer if rebuild is None else rebuild.layers.get(id(layer), layer)
    problem = []
    if target.states:
        if isinstance(new, StackedRNN):  # a Keras RNN of StackedRNNCells: one layer per cell
            for sub in new.layers:
                out.add_states(sub, _Target(sub, sub.name, True, False).state_keys())
        elif _is_fr_rnn(new):
            out.add_states(new, _Target(new, target.key, True, False).state_keys())
        else:
            problem.append("its states")
    if not target.inputs:
        return problem
    key = f"{target.key}/input"
    if _is_fr_rnn(new):
        out.add_input([new], key)
    elif isinstance(new, StackedRNN):
        out.add_input([new.layers[0]], key)
    elif _is_bidirectional(new) and _wrapper_sides(new) is not None:
        out.add_input(_wrapper_sides(new), key)
    elif rebuild is not None and id(layer) in rebuild.probes:
        out.add_input([rebuild.probes[id(layer)]], key)
    else:
        problem.append("its input")
    return problem


__all__ = ["Plan", "plan"]
