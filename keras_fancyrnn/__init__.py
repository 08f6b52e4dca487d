"""keras_fancyrnn: Keras 3 recurrent layers that show and fix vanishing and exploding gradients."""

__version__ = "0.1.0"
