r"""SavedModel export: ``model.export`` for stateless models, explicit state for stateful ones.

A model built from fr layers exports with Keras's own ``model.export(path)`` (format
``"tf_saved_model"``): the engine is plain TensorFlow ops (a ``while`` loop over
``TensorArray``\s, ``MatMul``, ``Select`` for masks), so the SavedModel serves with
``tf.saved_model.load(path).serve(x)`` in a process that has TensorFlow but not keras_fancyrnn,
with any batch size and any number of timesteps, and with masks computed inside the graph (a
``Masking`` or ``Embedding(mask_zero=True)`` layer). Nothing in it depends on the device it was
exported on: the layers keep Keras's weight layout, and ``tf.saved_model.save`` retraces the
serving function in its save context, where fr.LSTM/GRU take the engine's loop even where cuDNN is
eligible (``fr.portable()``), so the export contains no cuDNN-only op.

What ``model.export`` does not handle is a **stateful** recurrent layer. Keras keeps its state in
variables that are not part of the model's weights; the SavedModel captures them, so its
``serve`` silently carries state from one call to the next, shared by every client of the
process, starting again from whatever the state was at export time after each reload, and it only
accepts the batch size the layer was built with. :func:`export_saved_model` exports such a model
with the state made explicit instead: every state of every stateful recurrent layer is an input
and an output of ``serve``, and the SavedModel holds no state at all::

    names = fr.export_saved_model(model, "path")          # e.g. ["lstm_h", "lstm_c"]
    loaded = tf.saved_model.load("path")
    state = {n: tf.zeros((batch, units_of[n])) for n in names}
    for chunk in chunks:                                    # [batch, time, features] each
        out = loaded.serve(chunk, state)                    # {"output_0": ..., "lstm_h": ...}
        state = {n: out[n] for n in names}

``loaded.serve(chunk)`` without the states starts every state from zeros.

The same function exports a non-stateful model's recurrences for chunk-by-chunk (streaming)
serving with ``state_layers="all"``, and otherwise equals ``model.export``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import keras

from keras_fancyrnn import _tf
from keras_fancyrnn._tf import tf
from keras_fancyrnn.engine import dispatch

__all__ = ["export_saved_model", "recurrent_layers", "state_names"]

_STATE_SUFFIXES = {1: ("h",), 2: ("h", "c")}


def recurrent_layers(model: keras.layers.Layer, stateful_only: bool = True) -> list:
    """The recurrent layers inside ``model`` that run a loop (``keras.layers.RNN`` instances: the fr
    layers and Keras's own), also those inside wrappers such as ``Bidirectional`` and
    ``StackedRNN``, in tracking order; only the stateful ones if ``stateful_only``."""
    found = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.RNN) and (layer.stateful or not stateful_only):
            found.append(layer)
    return found


def _state_sizes(layer) -> list[int]:
    size = layer.cell.state_size
    return list(size) if isinstance(size, (list, tuple)) else [size]


def state_names(layers: Sequence) -> list[list[str]]:
    """Signature names of the states of ``layers``: ``<layer name>_h`` (and ``_c`` for an LSTM),
    made unique and restricted to the characters a SavedModel signature accepts."""
    used: set[str] = set()
    names = []
    for layer in layers:
        n = len(_state_sizes(layer))
        suffixes = _STATE_SUFFIXES.get(n, tuple(f"state_{i}" for i in range(n)))
        base = re.sub(r"[^A-Za-z0-9_]", "_", layer.name)
        layer_names = []
        for suffix in suffixes:
            name, k = f"{base}_{suffix}", 1
            while name in used:
                name, k = f"{base}_{suffix}_{k}", k + 1
            used.add(name)
            layer_names.append(name)
        names.append(layer_names)
    return names


class _ExplicitStates:
    """While active, each of ``layers`` starts from the given states and records its final ones.

    The layer's ``call`` is shadowed on the instance (and restored on exit): the layer runs as a
    non-stateful layer with ``initial_state`` = the given tensors and ``return_state=True``, hands
    its usual output on, and leaves its state variables untouched.

    Why shadowing rather than a scope that the layer reads (as probes are requested,
    ``engine/probes.py``): the state layers may be Keras's own RNN layers, which read no scope of
    this package; they take an initial state only as a ``call`` argument and, when stateful, read
    and write their state variables. The model calls its layers itself (functional, Sequential,
    subclassed, or inside a wrapper), so a layer's ``call`` is the one place where the states can
    go in and come out. A scope read by fr's ``RNN.call`` would serve only the fr layers, a second
    mechanism beside this one rather than a replacement.
    """

    def __init__(self, layers, given):
        self.layers, self.given, self.final = list(layers), given, {}

    def _shadow(self, layer, original):
        def call(sequences, initial_state=None, mask=None, training=False):
            if initial_state is not None:
                raise ValueError(
                    f"{layer.name} is called with an explicit initial_state in the model; "
                    "export_saved_model can only make implicit states (stateful layers, or zero "
                    "initial states) explicit. Leave it out of state_layers"
                )
            if id(layer) in self.final:
                raise ValueError(
                    f"{layer.name} is called more than once in the model, so its state is "
                    "ambiguous; give each call its own layer or leave it out of state_layers"
                )
            stateful, return_state = layer.stateful, layer.return_state
            layer.stateful, layer.return_state = False, True
            try:
                out = original(sequences, initial_state=list(self.given[id(layer)]), mask=mask,
                               training=training)
            finally:
                layer.stateful, layer.return_state = stateful, return_state
            self.final[id(layer)] = list(out[1:])
            return out if return_state else out[0]

        return call

    def __enter__(self):
        self._shadowed = []
        try:
            for layer in self.layers:
                object.__setattr__(layer, "call", self._shadow(layer, layer.call))
                self._shadowed.append(layer)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for layer in self._shadowed:  # the class's call shows through again
            object.__delattr__(layer, "call")
        self._shadowed = []
        return False


def _tensor_specs(structure):
    """``tf.TensorSpec`` objects for a structure of ``keras.InputSpec``, ``KerasTensor`` or
    tensors, as ``ExportArchive.add_endpoint`` makes them from its ``input_signature``."""
    from keras.src.export.export_utils import make_tf_tensor_spec

    return keras.tree.map_structure(make_tf_tensor_spec, structure)


def _input_signature(model, input_signature):
    if input_signature is not None:
        return list(input_signature)
    # What model.export uses: the model's inputs with a free batch dimension.
    from keras.src.export.export_utils import get_input_signature

    return list(get_input_signature(model))


def export_saved_model(
    model: keras.Model,
    filepath,
    *,
    state_layers: str | Sequence = "stateful",
    input_signature: Sequence | None = None,
    verbose: bool = False,
) -> list[str]:
    """Exports ``model`` as a TensorFlow SavedModel whose recurrent states are explicit.

    The SavedModel has one endpoint, ``serve`` (also the ``serving_default`` signature):

    * without state layers, exactly ``model.export(filepath)``'s: ``serve(inputs) -> outputs``;
    * with state layers, ``serve(inputs, states) -> {"output_0": ..., <state name>: ...}``:
      ``states`` is a dict with one ``[batch, units]`` tensor per state of each state layer
      (zeros to start a sequence; leave ``states`` out for all zeros), the result holds the
      model's outputs (``output_<i>``, flattened in order) and each state layer's final states
      under the same names. The state variables of stateful layers are neither read nor
      written and are not in the SavedModel; the batch size is free. Names are
      ``<layer name>_h`` and, for an LSTM, ``<layer name>_c`` (see :func:`state_names`); a
      ``Bidirectional`` contributes its ``forward_*`` and ``backward_*`` layers. As the
      signature: ``serving_default(<input name>=x, <state name>=s, ...)``.

    Args:
        model: a built Keras model (functional, Sequential or subclassed).
        filepath: directory to write the SavedModel to.
        state_layers: ``"stateful"`` (default): every stateful recurrent layer; ``"all"``: every
            recurrent layer, for chunk-by-chunk serving of a model trained on whole sequences
            (note that a backward direction then restarts in each chunk); or a list of recurrent
            layers of ``model``.
        input_signature: as for ``model.export``; default: the model's inputs with a free batch
            dimension.
        verbose: print the endpoint, as ``model.export`` does.

    Returns:
        The state names, in the order of ``state_layers`` (empty without state layers).
    """
    _tf.require("keras_fancyrnn.export_saved_model")
    layers = _checked_state_layers(model, state_layers)
    signature = _input_signature(model, input_signature)
    archive = keras.export.ExportArchive()
    archive.track(model)
    if not layers:
        # every trace takes the engine's loop, also where cuDNN is eligible
        with dispatch.portable():
            archive.add_endpoint("serve", model.__call__, signature)
            archive.write_out(filepath, verbose=verbose)
        return []

    return _write_with_states(archive, filepath, model, layers, signature, verbose)


def _write_with_states(archive, filepath, model, layers, signature, verbose) -> list[str]:
    """Write ``serve(inputs[, states])`` (``export_saved_model`` with state layers); returns the
    state names."""
    names = state_names(layers)
    state_specs = {
        name: tf.TensorSpec((None, size), layer.cell.compute_dtype, name=name)
        for layer, layer_names in zip(layers, names)
        for name, size in zip(layer_names, _state_sizes(layer))
    }
    specs = [_tensor_specs(spec) for spec in signature]
    serve = _serve_with_states(model, layers, names, state_specs, len(specs))

    with dispatch.portable():
        # Two traces of one endpoint: with the states (first, so that the archive also makes it
        # the serving signatures) and without them (zero states).
        endpoint = tf.function(serve, autograph=False)
        endpoint.get_concrete_function(*specs, state_specs)
        endpoint.get_concrete_function(*specs)
        archive.add_endpoint("serve", endpoint)
        archive.write_out(filepath, verbose=verbose)
    return [n for layer_names in names for n in layer_names]


def _checked_state_layers(model, state_layers) -> list:
    """The recurrent layers of ``model`` that ``state_layers`` names (``export_saved_model``)."""
    if isinstance(state_layers, str):
        if state_layers not in ("stateful", "all"):
            raise ValueError(
                f"state_layers must be 'stateful', 'all' or a list of recurrent layers of the "
                f"model, got {state_layers!r}"
            )
        return recurrent_layers(model, stateful_only=state_layers == "stateful")
    layers = list(state_layers)
    inside = {id(layer) for layer in recurrent_layers(model, stateful_only=False)}
    for layer in layers:
        if id(layer) not in inside:
            raise ValueError(
                "state_layers must be recurrent layers (keras.layers.RNN, e.g. fr.LSTM) of "
                f"the model, got {getattr(layer, 'name', layer)!r}"
            )
    return layers


def _serve_with_states(model, layers, names, state_specs, n_inputs):
    """``serve(*inputs[, states])``: ``model`` with the states of ``layers`` as inputs (zeros
    where they are left out) and their final states as outputs."""

    def serve(*args):
        if len(args) == n_inputs + 1:
            *inputs, states = args
        else:  # the states left out: every state layer starts from zeros, as model(x) does
            inputs = list(args)
            batch = tf.shape(tf.nest.flatten(inputs)[0])[0]
            states = {name: tf.zeros((batch, spec.shape[1]), spec.dtype)
                      for name, spec in state_specs.items()}
        given = {
            id(layer): [states[n] for n in layer_names] for layer, layer_names in zip(layers, names)
        }
        with _ExplicitStates(layers, given) as scope:
            outputs = model(*inputs, training=False)
        missing = [layer.name for layer in layers if id(layer) not in scope.final]
        if missing:
            raise ValueError(f"the model did not call the state layer(s) {missing}")
        result = {f"output_{i}": y for i, y in enumerate(tf.nest.flatten(outputs))}
        for layer, layer_names in zip(layers, names):
            result.update(zip(layer_names, scope.final[id(layer)]))
        return result

    return serve
