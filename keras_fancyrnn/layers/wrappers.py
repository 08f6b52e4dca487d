"""What the composite recurrent layers (``Bidirectional`` in ``layers/bidirectional.py``,
``StackedRNN`` in ``layers/stacked.py``) share: checking, cloning and calling a recurrent layer,
and counting its states. Composition only, no loop code.

Both wrappers only *call* recurrent layers (fr.SimpleRNN/LSTM/GRU, or any Keras RNN layer) and
combine what they return; every time loop runs inside those layers, on the engine. Each inner layer
stays a separate, tracked sublayer (``Bidirectional.forward_layer`` / ``.backward_layer``,
``StackedRNN.layers``), so the gradient monitor finds and probes every recurrence, and whether a
layer runs a fused kernel is decided by that layer alone: nothing here is device-specific.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

__all__ = ["call_kwargs", "check_recurrent", "clone", "first_mask", "num_states"]

_serialize = keras.saving.serialize_keras_object
_deserialize = keras.saving.deserialize_keras_object

_RECURRENT_ATTRS = ("go_backwards", "return_sequences", "return_state", "stateful")


def check_recurrent(layer, arg: str, attrs: Sequence[str] = _RECURRENT_ATTRS) -> None:
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


def clone(layer, **overrides):
    """A fresh layer from ``layer``'s config (fresh weights, no state), with ``overrides``."""
    config = _serialize(layer)
    config["config"].update(overrides)
    return _deserialize(config)


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


def call_kwargs(layer, mask, training, initial_state):
    """The keyword arguments of a call of ``layer``: only those its ``call`` takes."""
    kwargs = {}
    if getattr(layer, "_call_has_mask_arg", True):
        kwargs["mask"] = mask
    if getattr(layer, "_call_has_training_arg", True):
        kwargs["training"] = training
    if initial_state is not None:
        kwargs["initial_state"] = initial_state
    return kwargs


def first_mask(mask):
    """The sequence mask among the masks Keras hands a layer (one per input)."""
    return mask[0] if isinstance(mask, (list, tuple)) else mask
