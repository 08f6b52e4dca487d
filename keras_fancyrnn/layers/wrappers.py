"""Composite recurrent layers: ``Bidirectional`` and ``StackedRNN``. Composition only, no loop code.

Long (over 400 lines): two wrappers, each mirroring Keras's API (merge modes, states, masks,
configs) so that it is a drop-in.

Both wrappers only *call* recurrent layers (fr.SimpleRNN/LSTM/GRU, or any Keras RNN layer) and
combine what they return; every time loop runs inside those layers, on the engine. Each inner layer
stays a separate, tracked sublayer (``Bidirectional.forward_layer`` / ``.backward_layer``,
``StackedRNN.layers``), so the gradient monitor finds and probes every recurrence, and whether a
layer runs a fused kernel is decided by that layer alone: nothing here is device-specific.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import keras
from keras import ops

from keras_fancyrnn.layers.base import SeedStateSaving, SequenceMaskFromInput, check_rate

_serialize = keras.saving.serialize_keras_object
_deserialize = keras.saving.deserialize_keras_object

#: ``merge_mode`` -> how the forward output ``y`` and the (time-aligned) backward output
#: ``y_rev`` are combined; ``None`` returns both.
MERGES = {
    "concat": lambda y, y_rev: ops.concatenate([y, y_rev], axis=-1),
    "sum": lambda y, y_rev: y + y_rev,
    "ave": lambda y, y_rev: (y + y_rev) / 2,
    "mul": lambda y, y_rev: y * y_rev,
    None: lambda y, y_rev: (y, y_rev),
}
_RECURRENT_ATTRS = ("go_backwards", "return_sequences", "return_state", "stateful")


class _Dropout(SeedStateSaving, keras.layers.Dropout):
    """``keras.layers.Dropout`` whose RNG state is saved with the model (see SeedStateSaving)."""


def _check_recurrent(layer, arg: str, attrs: Sequence[str] = _RECURRENT_ATTRS) -> None:
    if not isinstance(layer, keras.layers.Layer):
        raise ValueError(
            f"{arg} must be a recurrent keras.layers.Layer instance (e.g. fr.LSTM(32)), got "
            f"{layer!r}"
        )
    missing = [a for a in attrs if not hasattr(layer, a)]
    if missing:
        raise ValueError(
            f"{arg} must be a recurrent layer with the attributes {list(attrs)} (such as "
            f"fr.LSTM or keras.layers.GRU); {type(layer).__name__} lacks {missing}"
        )


def _clone(layer, **overrides):
    """A fresh layer from ``layer``'s config (fresh weights, no state), with ``overrides``."""
    config = _serialize(layer)
    config["config"].update(overrides)
    return _deserialize(config)


def _removeprefix(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def num_states(layer) -> int:
    """How many state tensors ``layer`` returns after its output when ``return_state=True``."""
    if hasattr(layer, "forward_layer") and hasattr(layer, "backward_layer"):
        return num_states(layer.forward_layer) + num_states(layer.backward_layer)
    if isinstance(getattr(layer, "state_size", None), (list, tuple)):
        return len(layer.state_size)
    if hasattr(layer, "cell"):
        size = layer.cell.state_size
        return len(size) if isinstance(size, (list, tuple)) else 1
    raise ValueError(f"cannot tell how many states {type(layer).__name__} {layer.name} returns")


def _call_kwargs(layer, mask, training, initial_state):
    kwargs = {}
    if getattr(layer, "_call_has_mask_arg", True):
        kwargs["mask"] = mask
    if getattr(layer, "_call_has_training_arg", True):
        kwargs["training"] = training
    if initial_state is not None:
        kwargs["initial_state"] = initial_state
    return kwargs


def _first(mask):
    return mask[0] if isinstance(mask, (list, tuple)) else mask


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class Bidirectional(SequenceMaskFromInput, keras.layers.Layer):
    """Runs a recurrent layer forward and a copy of it backward over time, and merges the two.

    Same arguments and outputs as ``keras.layers.Bidirectional`` (the flax design: two
    recurrences and a merge function). With ``y`` the forward output and ``y_rev`` the backward
    output (re-aligned to input time order when ``return_sequences``)::

        concat: [y, y_rev] (last axis)   sum: y + y_rev   ave: (y + y_rev) / 2   mul: y * y_rev
        None:   the list [y, y_rev]

    Args:
        layer: a recurrent layer (fr.SimpleRNN/LSTM/GRU or any Keras RNN layer). It is not used
            itself: ``forward_layer`` and ``backward_layer`` are fresh copies built from its config
            (named ``forward_<name>`` / ``backward_<name>``), as Keras does.
        merge_mode: one of ``"concat"``, ``"sum"``, ``"ave"``, ``"mul"``, ``None``.
        weights: optional list of arrays, the forward layer's weights then the backward layer's
            (first half / second half), set when the layer is built. (Keras accepts and ignores it.)
        backward_layer: optional layer used as is for the backward direction; it must have
            ``go_backwards`` opposite to ``layer`` and the same ``return_sequences``,
            ``return_state`` and ``stateful``.

    Call arguments: ``sequences`` ``(batch, time, features)``, ``initial_state`` (the forward
    layer's states then the backward layer's: ``[h_f, c_f, h_b, c_b]`` for LSTM), ``mask``
    ``(batch, time)``, ``training``. With ``return_state=True`` the outputs are followed by the
    forward final states, then the backward final states.

    As in Keras, when ``return_sequences`` both directions output zeros at masked steps
    (``zero_output_for_mask`` is forced to ``return_sequences``). Unlike Keras, no fused
    two-direction kernel is used: each direction is its own layer, so the gradient monitor sees
    ``forward_layer`` and ``backward_layer`` as two recurrences.
    """

    def __init__(self, layer, merge_mode="concat", weights=None, backward_layer=None, **kwargs):
        _check_recurrent(layer, "layer")
        if backward_layer is not None:
            _check_recurrent(backward_layer, "backward_layer")
        if merge_mode not in MERGES:
            raise ValueError(
                f"merge_mode must be one of 'concat', 'sum', 'ave', 'mul' or None, got "
                f"{merge_mode!r}"
            )
        super().__init__(**kwargs)
        self.forward_layer = _clone(
            layer, name=f"forward_{_removeprefix(layer.name, 'forward_')}"
        )
        if backward_layer is None:
            backward_layer = _clone(
                layer, name=f"backward_{_removeprefix(layer.name, 'backward_')}",
                go_backwards=True,
            )
        self.backward_layer = backward_layer
        if hasattr(layer, "use_cudnn"):  # a Keras layer does not serialize it
            self.forward_layer.use_cudnn = self.backward_layer.use_cudnn = layer.use_cudnn
        self._check_directions()
        for direction in (self.forward_layer, self.backward_layer):
            if hasattr(direction, "zero_output_for_mask"):
                direction.zero_output_for_mask = direction.return_sequences

        self.merge_mode = merge_mode
        self._initial_weights = list(weights) if weights else None
        self.supports_masking = True
        self.input_spec = layer.input_spec

    def _check_directions(self):
        fwd, bwd = self.forward_layer, self.backward_layer
        if fwd.go_backwards == bwd.go_backwards:
            raise ValueError(
                "the forward and backward layers must have different go_backwards, got "
                f"go_backwards={fwd.go_backwards} for both (pass a layer with go_backwards=False)"
            )
        for attr in ("stateful", "return_sequences", "return_state"):
            if getattr(fwd, attr) != getattr(bwd, attr):
                raise ValueError(
                    f"the forward and backward layers must have the same {attr}, got "
                    f"{getattr(fwd, attr)} (forward) and {getattr(bwd, attr)} (backward)"
                )

    # The wrapped layers own these; reading them here keeps the two in step.
    @property
    def return_sequences(self) -> bool:
        return self.forward_layer.return_sequences

    @property
    def return_state(self) -> bool:
        return self.forward_layer.return_state

    @return_state.setter
    def return_state(self, value: bool):
        self.forward_layer.return_state = self.backward_layer.return_state = bool(value)

    @property
    def stateful(self) -> bool:
        return self.forward_layer.stateful

    @property
    def states(self):
        fwd, bwd = self.forward_layer.states, self.backward_layer.states
        return tuple(fwd) + tuple(bwd) if fwd and bwd else None

    def reset_state(self):
        if not self.stateful:
            raise AttributeError(f"{self.name} is not stateful; reset_state() needs stateful=True")
        self.forward_layer.reset_state()
        self.backward_layer.reset_state()

    def reset_states(self):  # Keras's compatibility alias
        self.reset_state()

    def build(self, sequences_shape, initial_state_shape=None):
        for direction in (self.forward_layer, self.backward_layer):
            if not direction.built:
                direction.build(sequences_shape)
        if self._initial_weights is not None:
            half = len(self._initial_weights) // 2
            self.forward_layer.set_weights(self._initial_weights[:half])
            self.backward_layer.set_weights(self._initial_weights[half:])
            self._initial_weights = None

    def call(self, sequences, initial_state=None, mask=None, training=None):
        mask = _first(mask)
        fwd_state = bwd_state = None
        if initial_state is not None:
            if not isinstance(initial_state, (list, tuple)):
                initial_state = [initial_state]
            n_fwd = num_states(self.forward_layer)
            n_bwd = num_states(self.backward_layer)
            if len(initial_state) != n_fwd + n_bwd:
                raise ValueError(
                    f"{self.name}: initial_state must list the forward layer's {n_fwd} state(s) "
                    f"then the backward layer's {n_bwd}, got {len(initial_state)} tensor(s)"
                )
            fwd_state, bwd_state = list(initial_state[:n_fwd]), list(initial_state[n_fwd:])

        y = self.forward_layer(
            sequences, **_call_kwargs(self.forward_layer, mask, training, fwd_state)
        )
        y_rev = self.backward_layer(
            sequences, **_call_kwargs(self.backward_layer, mask, training, bwd_state)
        )
        states = ()
        if self.return_state:
            states = (*y[1:], *y_rev[1:])
            y, y_rev = y[0], y_rev[0]
        y = ops.cast(y, self.compute_dtype)
        y_rev = ops.cast(y_rev, self.compute_dtype)
        if self.return_sequences:
            y_rev = ops.flip(y_rev, axis=1)  # the backward layer returns processing order
        output = MERGES[self.merge_mode](y, y_rev)
        if not self.return_state:
            return output
        return (*output, *states) if self.merge_mode is None else (output, *states)

    def compute_output_shape(self, sequences_shape, initial_state_shape=None):
        fwd = self.forward_layer.compute_output_shape(sequences_shape)
        bwd = self.backward_layer.compute_output_shape(sequences_shape)
        states = ()
        if self.return_state:
            states = (*fwd[1:], *bwd[1:])
            fwd, bwd = fwd[0], bwd[0]
        fwd, bwd = tuple(fwd), tuple(bwd)
        if self.merge_mode is None:
            outputs = (fwd, bwd)
        elif self.merge_mode == "concat":
            width = None if fwd[-1] is None or bwd[-1] is None else fwd[-1] + bwd[-1]
            outputs = ((*fwd[:-1], width),)
        else:
            outputs = (fwd,)
        if not self.return_state:
            return outputs if self.merge_mode is None else outputs[0]
        return (*outputs, *states)

    def compute_mask(self, inputs, mask=None):
        mask = _first(mask)
        output_mask = mask if self.return_sequences else None
        output_masks = [output_mask] * (2 if self.merge_mode is None else 1)
        if not self.return_state:
            return output_masks if self.merge_mode is None else output_mask
        return [*output_masks, *[None] * num_states(self)]

    def get_config(self):
        return {
            **super().get_config(),
            "merge_mode": self.merge_mode,
            "layer": _serialize(self.forward_layer),
            "backward_layer": _serialize(self.backward_layer),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """From a config of this class or of ``keras.layers.Bidirectional`` (same keys). A Keras
        recurrent layer in it becomes its fr counterpart (``fr.from_keras``'s conversion), so that
        every recurrence runs on the engine; one it cannot convert raises ``ConversionError``."""
        from keras_fancyrnn.convert import convert_layer, needs_conversion

        def inner(layer_config):
            layer = _deserialize(layer_config, custom_objects=custom_objects)
            return convert_layer(layer) if needs_conversion(layer) else layer

        config = copy.deepcopy(config)
        config["layer"] = inner(config["layer"])
        if config.get("backward_layer") is not None:
            config["backward_layer"] = inner(config["backward_layer"])
        return cls(**config)


def _residual_flags(residual, n: int) -> list[bool]:
    if isinstance(residual, bool):
        return [False] + [residual] * (n - 1)
    if isinstance(residual, (list, tuple)) and len(residual) == n and all(
        isinstance(r, bool) for r in residual
    ):
        return list(residual)
    raise ValueError(
        f"residual must be a bool or a list of {n} bools (one per layer), got {residual!r}"
    )


def _set_return_state(layer) -> None:
    """``return_state=True`` on ``layer`` and, for a two-direction wrapper, on both directions."""
    for attr in ("forward_layer", "backward_layer"):
        direction = getattr(layer, attr, None)
        if direction is not None:
            direction.return_state = True
    layer.return_state = True


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a[1:], b[1:], strict=True)
    ) and a[-1] == b[-1]


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class StackedRNN(SequenceMaskFromInput, keras.layers.Layer):
    r"""Several recurrent layers applied in sequence, each to the previous one's output sequence.

    PyTorch's ``num_layers``, composable: ``layers`` is any mix of fr.SimpleRNN/LSTM/GRU,
    fr.Bidirectional and other Keras RNN layers. With :math:`x_0` the block input and
    :math:`f_l` layer ``l``:

    .. math::
        y_l = f_l(x_{l-1}) + [\text{residual}_l]\, x_{l-1}, \qquad
        x_l = \mathrm{Dropout}_{\text{rate}}(y_l)\ (l < L), \qquad \text{output} = y_L

    Args:
        layers: the recurrent layers, bottom first. Every layer but the last must have
            ``return_sequences=True``; a ``ValueError`` names any that does not (the block
            raises rather than silently rewriting a layer's configuration). The last layer's
            ``return_sequences`` decides the block's output. A Bidirectional with
            ``merge_mode=None`` (two outputs) cannot be stacked.
        dropout: rate of (inverted) dropout on each layer's output before the next layer, in
            training only (``keras.layers.Dropout``); none after the last layer.
        residual: ``True`` adds each layer's input to its output for every layer but the first
            (whose input is the block's input features, usually of another width); or a list of
            bools, one per layer. A layer with a residual connection must map its input
            shape to the same output shape (same features, and ``return_sequences=True``): a
            ``ValueError`` at build time says which layer does not.
        return_state: also return every layer's final states, flattened in layer order (for a
            Bidirectional: forward then backward). The block sets ``return_state=True`` on its
            layers for this. ``initial_state`` takes the same flat list.
        seed: seed of the dropout layers (``seed + l`` for the one after layer ``l``).

    Masks are passed to every layer (a timestep masked at the input is masked at every depth);
    the output mask is the input mask when the last layer returns sequences.
    """

    def __init__(self, layers, dropout=0.0, residual=False, return_state=False, seed=None,
                 **kwargs):
        if isinstance(layers, keras.layers.Layer) or not isinstance(layers, (list, tuple)) or (
            not layers
        ):
            raise ValueError(
                f"layers must be a non-empty list of recurrent layers, got {layers!r}"
            )
        for i, layer in enumerate(layers):
            _check_recurrent(layer, f"layers[{i}]", ("return_sequences", "return_state"))
            if i < len(layers) - 1 and not layer.return_sequences:
                raise ValueError(
                    f"layers[{i}] ({layer.name}) has return_sequences=False, but every layer "
                    "of a StackedRNN except the last feeds its output sequence to the next: "
                    "create it with return_sequences=True"
                )
            if getattr(layer, "merge_mode", "concat") is None:
                raise ValueError(
                    f"layers[{i}] ({layer.name}) is a Bidirectional with merge_mode=None (two "
                    "outputs); a StackedRNN layer must return one tensor: use 'concat', 'sum', "
                    "'ave' or 'mul'"
                )
        super().__init__(**kwargs)
        self.dropout = check_rate("dropout", dropout)
        self._residual = _residual_flags(residual, len(layers))
        self.residual = residual if isinstance(residual, bool) else tuple(residual)
        self.return_state = bool(return_state)
        self.seed = seed
        if self.return_state:
            for layer in layers:
                _set_return_state(layer)
        self.layers = list(layers)
        self.dropout_layers = [
            _Dropout(self.dropout, seed=None if seed is None else seed + i, name=f"dropout_{i}")
            for i in range(len(layers) - 1)
        ] if self.dropout > 0 else []
        self.supports_masking = True

    @property
    def return_sequences(self) -> bool:
        return self.layers[-1].return_sequences

    @property
    def stateful(self) -> bool:
        return any(getattr(layer, "stateful", False) for layer in self.layers)

    @property
    def states(self):
        states = [getattr(layer, "states", None) for layer in self.layers]
        if any(s is None for s in states):
            return None
        return tuple(v for s in states for v in s)

    def reset_state(self):
        if not self.stateful:
            raise AttributeError(f"{self.name} has no stateful layer; nothing to reset")
        for layer in self.layers:
            if getattr(layer, "stateful", False):
                layer.reset_state()

    def reset_states(self):
        self.reset_state()

    def _layer_shapes(self, sequences_shape):
        """Per layer: (input shape, output shape, state shapes), checking residual shapes."""
        shapes, shape = [], tuple(sequences_shape)
        for i, layer in enumerate(self.layers):
            out = layer.compute_output_shape(shape)
            states = ()
            if layer.return_state:
                out, states = out[0], tuple(out[1:])
            out = tuple(out)
            if self._residual[i] and not _same_shape(shape, out):
                raise ValueError(
                    f"{self.name}: layers[{i}] ({layer.name}) has a residual connection but maps "
                    f"inputs of shape {shape} to outputs of shape {out}; a residual connection "
                    "needs equal shapes (same number of features and return_sequences=True). "
                    "Change its units, or leave it out with a per-layer list, e.g. residual="
                    f"{[r and j != i for j, r in enumerate(self._residual)]}"
                )
            shapes.append((shape, out, states))
            shape = out
        return shapes

    def build(self, sequences_shape, initial_state_shape=None):
        shapes = self._layer_shapes(sequences_shape)
        for layer, (shape, _, _) in zip(self.layers, shapes, strict=True):
            if not layer.built:
                layer.build(shape)

    def _split_states(self, initial_state):
        counts = [num_states(layer) for layer in self.layers]
        if not isinstance(initial_state, (list, tuple)):
            initial_state = [initial_state]
        if len(initial_state) != sum(counts):
            raise ValueError(
                f"{self.name}: initial_state must be the flat list of every layer's states, "
                f"{counts} per layer ({sum(counts)} in all), got {len(initial_state)} tensor(s)"
            )
        out, start = [], 0
        for n in counts:
            out.append(list(initial_state[start:start + n]))
            start += n
        return out

    def call(self, sequences, initial_state=None, mask=None, training=None):
        mask = _first(mask)
        layer_states = (
            [None] * len(self.layers) if initial_state is None
            else self._split_states(initial_state)
        )
        x, final_states = sequences, []
        for i, (layer, state) in enumerate(zip(self.layers, layer_states, strict=True)):
            y = layer(x, **_call_kwargs(layer, mask, training, state))
            if layer.return_state:
                final_states.extend(y[1:])
                y = y[0]
            if self._residual[i]:
                y = y + ops.cast(x, y.dtype)
            if i < len(self.layers) - 1 and self.dropout_layers:
                y = self.dropout_layers[i](y, training=training)
            x = y
        return (x, *final_states) if self.return_state else x

    def compute_output_shape(self, sequences_shape, initial_state_shape=None):
        shapes = self._layer_shapes(sequences_shape)
        output = shapes[-1][1]
        if not self.return_state:
            return output
        return (output, *[s for _, _, states in shapes for s in states])

    def compute_mask(self, inputs, mask=None):
        mask = _first(mask)
        output_mask = mask if self.return_sequences else None
        if not self.return_state:
            return output_mask
        return [output_mask, *[None] * sum(num_states(layer) for layer in self.layers)]

    def get_config(self):
        return {
            **super().get_config(),
            "layers": [_serialize(layer) for layer in self.layers],
            "dropout": self.dropout,
            "residual": self.residual if isinstance(self.residual, bool) else list(self.residual),
            "return_state": self.return_state,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = copy.deepcopy(config)
        config["layers"] = [
            _deserialize(c, custom_objects=custom_objects) for c in config["layers"]
        ]
        return cls(**config)


__all__ = ["Bidirectional", "StackedRNN", "num_states", "MERGES"]
