"""``StackedRNN``: recurrent layers applied one after the other (PyTorch's ``num_layers``,
composable), with dropout and residual connections between them."""

from __future__ import annotations

import copy

import keras
from keras import ops

from keras_fancyrnn.layers.base import SequenceMaskFromInput
from keras_fancyrnn.layers.cell import SeedStateSaving, check_rate
from keras_fancyrnn.layers.wrappers import (
    call_kwargs,
    check_recurrent,
    first_mask,
    num_states,
)

__all__ = ["StackedRNN"]

_serialize = keras.saving.serialize_keras_object
_deserialize = keras.saving.deserialize_keras_object


class _Dropout(SeedStateSaving, keras.layers.Dropout):
    """``keras.layers.Dropout`` whose RNG state is saved with the model (see SeedStateSaving)."""


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
            check_recurrent(layer, f"layers[{i}]", ("return_sequences", "return_state"))
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
        mask = first_mask(mask)
        layer_states = (
            [None] * len(self.layers) if initial_state is None
            else self._split_states(initial_state)
        )
        x, final_states = sequences, []
        for i, (layer, state) in enumerate(zip(self.layers, layer_states, strict=True)):
            y = layer(x, **call_kwargs(layer, mask, training, state))
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
        mask = first_mask(mask)
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
