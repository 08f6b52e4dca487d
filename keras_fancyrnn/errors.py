"""The package's public exception types.

Each is a ``ValueError`` subclass, so code that catches ``ValueError`` keeps working; catch the
specific type to tell which argument was wrong.
"""

from __future__ import annotations


class LayerSelectionError(ValueError):
    """The ``layers`` argument of ``GradientNormMonitor`` / ``gradient_norms`` selects no layer
    that can be monitored: an unknown name, a layer outside the model, a layer that takes no
    sequence, or a model without a recurrent layer."""


__all__ = ["LayerSelectionError"]
