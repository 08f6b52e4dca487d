"""The package's public exception types.

Each is a ``ValueError`` subclass, so code that catches ``ValueError`` (as for Keras's own
argument errors) keeps working; catch the specific type to tell which argument was wrong.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting of ``keras_fancyrnn.config`` that does not exist or has a value it cannot take,
    or a setting this machine cannot honour (a register block this CPU lacks)."""


class LayerSelectionError(ValueError):
    """The ``layers`` argument of ``GradientNormMonitor`` / ``gradient_norms`` selects no layer
    that can be monitored: an unknown name, a layer outside the model, a layer that takes no
    sequence, or a model without a recurrent layer."""


class ProbeDataError(ValueError):
    """The ``data`` argument of ``GradientNormMonitor`` / ``gradient_norms`` (the probe batch) does
    not fit the model: e.g. a ``tf.data.Dataset`` of single examples instead of batches, or a batch
    size other than the one a stateful layer was built for."""


class ConversionError(ValueError):
    """``fr.from_keras`` (or the gradient monitor's probe model) cannot convert a layer: a Keras
    recurrent layer with an option or a cell that keras_fancyrnn layers cannot represent, or a
    model that cannot be rebuilt layer by layer (a subclassed model)."""


__all__ = ["ConfigError", "ConversionError", "LayerSelectionError", "ProbeDataError"]
