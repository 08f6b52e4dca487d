"""Gradient clipping, one concept a module:

- ``clipping``: the pure clip functions (the update rule of each in its docstring), imported
  from there: ``from keras_fancyrnn.optim import clipping``;
- ``optimizer``: ``ClippingOptimizer``, the Keras optimizer that applies them;
- ``stats``: ``ClippingStats``, the callback that puts its statistics into ``fit``'s logs;
- ``arguments``: the optimizer's argument checks; ``replicas``: its ``tf.distribute`` parts;
  ``backends``: its other per-backend parts (the skip on JAX, where the step may raise).

``ClippingOptimizer`` and ``ClippingStats`` are also ``keras_fancyrnn``'s public names.
"""

from keras_fancyrnn.optim.arguments import METHODS
from keras_fancyrnn.optim.optimizer import ClippingOptimizer, find_clipping_optimizer
from keras_fancyrnn.optim.stats import ClippingStats

__all__ = [
    "METHODS",
    "ClippingOptimizer",
    "ClippingStats",
    "find_clipping_optimizer",
]
