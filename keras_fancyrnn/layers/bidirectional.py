"""``Bidirectional``: a recurrent layer run forward, a copy of it run backward, and a merge of
the two (the flax design), with ``keras.layers.Bidirectional``'s arguments and outputs."""

from __future__ import annotations

import copy

import keras
from keras import ops

from keras_fancyrnn.layers.base import SequenceMaskFromInput
from keras_fancyrnn.layers.wrappers import (
    call_kwargs,
    check_recurrent,
    clone,
    first_mask,
    num_states,
)

__all__ = ["MERGES", "Bidirectional"]

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


def _removeprefix(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


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
        check_recurrent(layer, "layer")
        if backward_layer is not None:
            check_recurrent(backward_layer, "backward_layer")
        if merge_mode not in MERGES:
            raise ValueError(
                f"merge_mode must be one of 'concat', 'sum', 'ave', 'mul' or None, got "
                f"{merge_mode!r}"
            )
        super().__init__(**kwargs)
        self.forward_layer = clone(
            layer, name=f"forward_{_removeprefix(layer.name, 'forward_')}"
        )
        if backward_layer is None:
            backward_layer = clone(
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
        mask = first_mask(mask)
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
            sequences, **call_kwargs(self.forward_layer, mask, training, fwd_state)
        )
        y_rev = self.backward_layer(
            sequences, **call_kwargs(self.backward_layer, mask, training, bwd_state)
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
        mask = first_mask(mask)
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
