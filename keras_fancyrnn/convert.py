"""``from_keras``: a model whose Keras recurrent layers are keras_fancyrnn layers, same weights.

Long (over 400 lines): the mapping of each Keras recurrent layer, cell and wrapper to its fr
counterpart and the rebuild of the models around them are one piece; the monitor's probe model
(``diagnostics/probe_model.py``) is this rebuild with shared variables.

Converted: ``keras.layers.SimpleRNN``/``LSTM``/``GRU``; ``keras.layers.RNN`` of Keras's
``SimpleRNNCell``/``LSTMCell``/``GRUCell`` (or of an fr cell); ``keras.layers.RNN`` of
``StackedRNNCells`` (-> ``fr.StackedRNN``, one layer per cell); ``keras.layers.Bidirectional`` of
those (-> ``fr.Bidirectional``), and fr wrappers holding Keras layers. Every option of those
layers carries over (the fr layers take Keras's arguments); where one cannot, a
``ConversionError`` names the layer and the option. Sequential and functional models are rebuilt,
nested models included; a subclassed model cannot be rebuilt (its ``call`` is code).

The gradient monitor builds its probe models here too: ``share_weights=True`` keeps every other
layer and the Keras cells' variables themselves (nothing copied), ``dtype`` clones every layer in
another dtype (the float64 probe pass), and ``input_probe`` inserts an ``InputProbe`` layer before
chosen layers.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import keras
from keras.src.models.functional import Functional  # not exported by keras

from keras_fancyrnn.engine import probes
from keras_fancyrnn.errors import ConversionError
from keras_fancyrnn.layers.base import RNN
from keras_fancyrnn.layers.bidirectional import Bidirectional
from keras_fancyrnn.layers.cell import RecurrentCell
from keras_fancyrnn.layers.gru import GRU
from keras_fancyrnn.layers.lstm import LSTM
from keras_fancyrnn.layers.simple_rnn import SimpleRNN
from keras_fancyrnn.layers.stacked import StackedRNN

_LAYERS = {keras.layers.SimpleRNN: SimpleRNN, keras.layers.LSTM: LSTM, keras.layers.GRU: GRU}
_CELLS = {keras.layers.SimpleRNNCell: SimpleRNN, keras.layers.LSTMCell: LSTM,
          keras.layers.GRUCell: GRU}
_RNN_OPTIONS = ("return_sequences", "return_state", "go_backwards", "stateful", "unroll",
                "zero_output_for_mask")
_WEIGHTS = ("kernel", "recurrent_kernel", "bias")


def _is_bidirectional(layer) -> bool:
    return isinstance(layer, (keras.layers.Bidirectional, Bidirectional))


def needs_conversion(layer) -> bool:
    """Whether ``layer`` runs a recurrence outside the fr engine: a Keras recurrent layer, or a
    wrapper (Keras's or fr's Bidirectional, fr's StackedRNN) holding one."""
    if isinstance(layer, RNN):
        return False
    if _is_bidirectional(layer):
        return needs_conversion(layer.forward_layer) or needs_conversion(layer.backward_layer)
    if isinstance(layer, StackedRNN):
        return any(needs_conversion(sub) for sub in layer.layers)
    return isinstance(layer, keras.layers.RNN)


def _fail(layer, why: str):
    raise ConversionError(f"cannot convert the layer {layer.name!r} "
                          f"({type(layer).__name__}): {why}")


def _make(cls, layer, config: dict):
    """``cls(**config)``, a ``ConversionError`` naming the option ``cls`` does not take."""
    accepted = set(inspect.signature(cls.__init__).parameters) | set(
        inspect.signature(RNN.__init__).parameters) | {"name", "dtype", "trainable",
                                                       "activity_regularizer"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        _fail(layer, f"the option(s) {unknown} have no counterpart in {cls.__name__}")
    try:
        return cls(**config)
    except (TypeError, ValueError) as e:
        _fail(layer, f"{cls.__name__} does not take its options ({e})")


def _layer_options(layer) -> dict:
    return {"name": layer.name, "dtype": layer.dtype_policy, "trainable": layer.trainable,
            **{k: getattr(layer, k) for k in _RNN_OPTIONS}}


def _from_cell(layer, cell, options: dict):
    """An fr layer running ``cell``'s equations with ``options`` (layer arguments)."""
    if isinstance(cell, RecurrentCell):  # an fr cell inside keras.layers.RNN
        clone = type(cell).from_config(cell.get_config())
        return RNN(clone, **{k: v for k, v in options.items() if k in _RNN_OPTIONS},
                   name=options["name"], dtype=options["dtype"], trainable=options["trainable"])
    if type(cell) not in _CELLS:
        _fail(layer, f"its cell {type(cell).__name__} is not one of Keras's SimpleRNNCell, "
                     "LSTMCell, GRUCell or StackedRNNCells, so its equations are unknown")
    config = {k: v for k, v in cell.get_config().items() if k not in ("name", "dtype",
                                                                       "trainable")}
    return _make(_CELLS[type(cell)], layer, {**config, **options})


def _stacked(layer):
    if layer.go_backwards:
        _fail(layer, "go_backwards=True with StackedRNNCells: fr.StackedRNN runs its layers one "
                     "after another, so only a whole-stack reversal would match")
    if layer.return_state:
        _fail(layer, "return_state=True with StackedRNNCells: Keras returns the states nested per "
                     "cell, fr.StackedRNN flat")
    cells = layer.cell.cells
    inner = []
    for i, cell in enumerate(cells):
        options = {**_layer_options(layer), "name": cell.name,
                   "return_sequences": layer.return_sequences or i < len(cells) - 1}
        inner.append(_from_cell(layer, cell, options))
    return StackedRNN(inner, name=layer.name, dtype=layer.dtype_policy, trainable=layer.trainable)


def convert_layer(layer, pairs: list | None = None):
    """The fr counterpart of ``layer`` (unbuilt), for a layer where ``needs_conversion``;
    appends ``(fr cell, original cell)`` to ``pairs`` for every recurrence, whose weights
    (``kernel``, ``recurrent_kernel``, ``bias``) have the same shapes and meaning."""
    pairs = [] if pairs is None else pairs
    if _is_bidirectional(layer):
        forward = _convert_or_clone(layer.forward_layer)
        backward = _convert_or_clone(layer.backward_layer)
        out = Bidirectional(forward, merge_mode=layer.merge_mode, backward_layer=backward,
                            name=layer.name, dtype=layer.dtype_policy, trainable=layer.trainable)
        _pair(out, layer, pairs)
        return out
    if isinstance(layer, StackedRNN):
        out = StackedRNN([_convert_or_clone(sub) for sub in layer.layers],
                         dropout=layer.dropout, residual=layer.residual,
                         return_state=layer.return_state, seed=layer.seed, name=layer.name,
                         dtype=layer.dtype_policy, trainable=layer.trainable)
        _pair(out, layer, pairs)
        return out
    if type(layer) in _LAYERS:
        config = layer.get_config()
        if hasattr(layer, "use_cudnn"):  # an attribute Keras does not serialize
            config["use_cudnn"] = layer.use_cudnn
        out = _make(_LAYERS[type(layer)], layer, config)
    elif type(layer) is keras.layers.RNN:
        if isinstance(layer.cell, keras.layers.StackedRNNCells):
            out = _stacked(layer)
            _pair(out, layer, pairs)
            return out
        out = _from_cell(layer, layer.cell, _layer_options(layer))
    elif isinstance(layer, keras.layers.RNN):
        _fail(layer, "a subclass of keras.layers.RNN whose equations are its own code")
    else:
        _fail(layer, "not a recurrent layer")
    pairs.append((out.cell, layer.cell))
    return out


def _convert_or_clone(layer):
    if needs_conversion(layer):
        return convert_layer(layer)
    return type(layer).from_config(layer.get_config())


def _pair(new, old, pairs: list, layers: dict | None = None) -> None:
    """``(fr cell, original cell)`` pairs of two layers of the same structure; ``layers`` (if
    given) maps ``id`` of each original layer inside to its counterpart."""
    if layers is not None:
        layers[id(old)] = new
    if isinstance(new, StackedRNN) and isinstance(old, StackedRNN):
        for n, o in zip(new.layers, old.layers):
            _pair(n, o, pairs, layers)
    elif _is_bidirectional(new):
        _pair(new.forward_layer, old.forward_layer, pairs, layers)
        _pair(new.backward_layer, old.backward_layer, pairs, layers)
    elif isinstance(getattr(old, "cell", None), keras.layers.StackedRNNCells):
        pairs.extend((n.cell, o) for n, o in zip(new.layers, old.cell.cells))
    else:
        pairs.append((new.cell, old.cell))


def _adopt(pairs) -> None:
    """Makes each fr cell use its original's variables (before the fr cell is built), so the
    converted layer and the original read and train the same weights."""
    for new, old in pairs:
        if not old.built:
            continue
        for name in _WEIGHTS:
            setattr(new, name, getattr(old, name, None))
        new.built = True


def _copy(pairs) -> None:
    """Assigns each original cell's weights to its (built) fr cell, cast to its dtype."""
    for new, old in pairs:
        if not old.built:
            continue
        for name in _WEIGHTS:
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if src is not None:
                dst.assign(keras.ops.cast(src, dst.dtype))


class InputProbe(keras.layers.Layer):
    """Identity, plus the probe requested for it (``keras_fancyrnn.engine.probes``, key
    ``"input"``): how a probe model measures ∂ℓ/∂x of a layer that is not an fr RNN. Its input is
    not cast (the probe is added in the input's own dtype) and its mask passes through."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self._convert_input_args = False

    def call(self, inputs, mask=None):
        requested = probes.for_call(self, inputs, mask)
        if "input" not in requested:
            return inputs
        return inputs + keras.ops.cast(requested["input"], inputs.dtype)


def _retyped(config, dtype: str):
    """A serialized layer's config with every dtype (policy) replaced by ``dtype``."""
    if isinstance(config, dict):
        return {k: (dtype if k == "dtype" and _is_float_dtype(v) else _retyped(v, dtype))
                for k, v in config.items()}
    if isinstance(config, list):
        return [_retyped(v, dtype) for v in config]
    return config


def _is_float_dtype(value) -> bool:
    """A float dtype or dtype policy (``"float32"``, ``"mixed_float16"`` or its config); integer
    inputs (an ``Embedding``'s) keep theirs."""
    if value is None:
        return False
    name = value.get("config", {}).get("name", "") if isinstance(value, dict) else str(value)
    return "float" in name


class Rebuild:
    """A Sequential or functional model rebuilt layer by layer (nested models too).

    ``share_weights``: layers that need no conversion are the original objects and converted
    cells use the original variables; otherwise every layer is new, its weights copied.
    ``dtype``: every layer in that dtype (implies copies; ``sync()`` copies the weights again,
    cast). ``input_probe(layer)``: whether ``layer`` gets an ``InputProbe`` before its first call.
    ``lenient``: a layer that does not convert is kept as it is, the reason in ``failed``.
    After construction: ``model``, ``layers`` (``id`` of original layer -> its counterpart, the
    sides of wrappers included), ``probes`` (``id`` of original layer -> its ``InputProbe``).
    """

    def __init__(self, model, share_weights: bool = False, dtype: str | None = None,
                 input_probe: Callable | None = None, lenient: bool = False):
        self.share = share_weights and dtype is None
        self.dtype = dtype
        self.input_probe = input_probe or (lambda layer: False)
        self.lenient = lenient
        self.failed: dict = {}  # lenient: id(layer) -> why it was not converted
        self.layers: dict = {}
        self.probes: dict = {}
        self._origin: dict = {}
        self._pairs: list = []  # (fr cell, original cell)
        self._copies: list = []  # (new layer, original layer): the same class and weights
        self.model = self._model(model)
        if self.share:
            self._share_states(model)
        self.sync()

    def sync(self) -> None:
        """Copies the original weights into the rebuilt model's own (none when shared)."""
        if self.share:
            return
        _copy(self._pairs)
        for new, old in self._copies:
            for dst, src in zip(new.weights, old.weights):
                dst.assign(keras.ops.cast(src, dst.dtype))

    # -- layers --------------------------------------------------------------------------------
    def _layer(self, layer):
        if id(layer) in self.layers:
            return self.layers[id(layer)]
        if isinstance(layer, keras.Model):
            new = self._model(layer)
        elif needs_conversion(layer) and not self._refused(layer):
            pairs: list = []
            new = convert_layer(layer, pairs)
            if self.dtype is not None:
                new = _deserialize_as(new, self.dtype)
                pairs = []
            _pair(new, layer, pairs, self.layers)
            if self.share:
                _adopt(pairs)
            self._pairs += pairs
        elif self.share or not isinstance(layer, keras.layers.Layer):
            new = layer  # shared; or an op of a functional graph (Masking's NotEqual), no weights
        else:
            new = _deserialize_as(layer, self.dtype)
            self._copies.append((new, layer))
        self.layers[id(layer)] = new
        self._origin[id(new)] = layer
        return new

    def _share_states(self, model) -> None:
        """A converted stateful layer reads and writes its original's state variables."""
        for old in model._flatten_layers(include_self=False, recursive=True):
            new = self.layers.get(id(old))
            if new is not None and new is not old and getattr(old, "stateful", False) and (
                getattr(old, "states", None) is not None and isinstance(new, RNN)
            ):  # object.__setattr__: the built layer's tracker must not adopt them
                object.__setattr__(new, "states", old.states)

    def _refused(self, layer) -> bool:
        """Lenient: records why ``layer`` does not convert (then kept as it is)."""
        if not self.lenient:
            return False
        try:
            convert_layer(layer)
        except ConversionError as e:
            self.failed[id(layer)] = str(e)
            for side in ("forward_layer", "backward_layer"):
                if hasattr(layer, side):
                    self.failed[id(getattr(layer, side))] = str(e)
            return True
        return False

    def _probe_for(self, original, dtype_policy):
        if id(original) in self.probes or not self.input_probe(original):
            return None
        probe = InputProbe(name=f"{original.name}_input_probe", dtype=dtype_policy)
        self.probes[id(original)] = probe
        return probe

    def _call(self, layer, *args, **kwargs):
        original = self._origin.get(id(layer), layer)
        policy = getattr(layer, "dtype_policy", None)  # None: an op of the graph, not a layer
        probe = None if policy is None else self._probe_for(original, policy)
        if probe is not None and args:
            args = (probe(args[0]), *args[1:])
        return layer(*args, **kwargs)

    # -- models --------------------------------------------------------------------------------
    def _model(self, model):
        if isinstance(model, keras.Sequential):
            return self._sequential(model)
        if isinstance(model, Functional):  # as clone_model, which would also compile it
            inputs = keras.tree.map_structure(
                lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name),
                model.input)
            outputs = model._run_through_graph(inputs, operation_fn=self._layer,
                                               call_fn=self._call)
            return self._compiled_like(Functional(inputs, outputs, name=model.name), model)
        raise ConversionError(
            f"cannot rebuild the model {model.name!r} ({type(model).__name__}): only Sequential "
            "and functional models can be rebuilt layer by layer (a subclassed model's call is "
            "code); use fr layers in it instead of Keras's"
        )

    def _sequential(self, model):
        layers = []
        for layer in model.layers:
            new = self._layer(layer)
            probe = self._probe_for(layer, new.dtype_policy)
            layers += [probe, new] if probe is not None else [new]
        try:
            spec = model.inputs[0]
            layers.insert(0, keras.Input(batch_shape=spec.shape, dtype=spec.dtype))
        except (AttributeError, IndexError, TypeError, ValueError):
            pass  # not built: the layers are built on first call
        new = keras.Sequential(layers, name=model.name, trainable=model.trainable)
        return self._compiled_like(new, model)

    def _compiled_like(self, new, model):
        """A copy is compiled as ``model`` was (a fresh optimizer), where its compile config
        deserializes; a shared probe model is never compiled."""
        if model.compiled and not self.share:
            try:
                new.compile_from_config(model.get_compile_config())
            except (TypeError, ValueError) as e:
                warnings.warn(f"from_keras: the converted model {model.name!r} is not compiled, "
                              f"its compile config does not deserialize ({e}); compile it",
                              RuntimeWarning, stacklevel=4)
        return new


def _deserialize_as(layer, dtype: str | None):
    """A fresh layer from ``layer``'s serialized config, in ``dtype`` if given."""
    config = keras.saving.serialize_keras_object(layer)
    if dtype is not None:
        config = _retyped(config, dtype)
    return keras.saving.deserialize_keras_object(config)


def from_keras(model, share_weights: bool = False):
    """An equivalent model whose Keras recurrent layers are keras_fancyrnn layers.

    ``keras.layers.SimpleRNN``/``LSTM``/``GRU`` become ``fr.SimpleRNN``/``LSTM``/``GRU``;
    ``keras.layers.RNN`` of Keras's cells the fr layer of that cell, of ``StackedRNNCells`` an
    ``fr.StackedRNN`` (one layer per cell, named after it); ``keras.layers.Bidirectional`` an
    ``fr.Bidirectional``. Names, options and weights carry over, so the outputs (and gradients)
    equal the original's up to float rounding; fr layers and all other layers stay what they are
    (copies, or the same objects with ``share_weights``).

    Args:
        model: a Sequential or functional Keras model (nested models are converted too).
        share_weights: ``False`` (default): a new model with its own copy of every weight, compiled
            like the original if it was (a fresh optimizer of the same configuration; a warning
            where that configuration holds an unregistered function and does not deserialize).
            ``True``: the new model uses the original's layers and variables (training one
            trains the other); what the gradient monitor uses to probe Keras layers.

    Raises:
        ConversionError: a layer with an option or a cell that fr layers cannot represent
            (named, with the option), or a subclassed model.
    """
    if not isinstance(model, keras.Model):
        raise ConversionError(
            f"model must be a keras.Model (Sequential or functional), got {type(model).__name__}; "
            "wrap a single layer in keras.Sequential([keras.Input(shape), layer])"
        )
    return Rebuild(model, share_weights=share_weights).model
