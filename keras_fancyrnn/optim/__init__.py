"""Gradient clipping, one concept a module:

- ``clipping``: the pure clip functions (the update rule of each in its docstring);
- ``optimizer``: ``ClippingOptimizer``, the Keras optimizer that applies them;
- ``stats``: ``ClippingStats``, the callback that puts its statistics into ``fit``'s logs;
- ``arguments``: the optimizer's argument checks; ``replicas``: its ``tf.distribute`` parts.

``ClippingOptimizer`` and ``ClippingStats`` are also ``keras_fancyrnn``'s public names.
"""

from keras_fancyrnn.optim.arguments import METHODS
from keras_fancyrnn.optim.clipping import (
    adaptive_clip,
    all_finite,
    autoclip_threshold,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    global_norm,
)
from keras_fancyrnn.optim.optimizer import ClippingOptimizer, find_clipping_optimizer
from keras_fancyrnn.optim.stats import ClippingStats

__all__ = [
    "METHODS",
    "ClippingOptimizer",
    "ClippingStats",
    "adaptive_clip",
    "all_finite",
    "autoclip_threshold",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "find_clipping_optimizer",
    "global_norm",
]
