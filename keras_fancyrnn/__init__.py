"""keras_fancyrnn: Keras 3 recurrent layers that show and fix vanishing and exploding gradients."""

__version__ = "0.1.0"

from keras_fancyrnn import config
from keras_fancyrnn.convert import from_keras
from keras_fancyrnn.diagnostics import GradientNormMonitor, gradient_norms
from keras_fancyrnn.engine.dispatch import explain, portable
from keras_fancyrnn.errors import (
    ConfigError,
    ConversionError,
    LayerSelectionError,
    ProbeDataError,
)
from keras_fancyrnn.layers import initializers
from keras_fancyrnn.layers.base import RNN
from keras_fancyrnn.layers.bidirectional import Bidirectional
from keras_fancyrnn.layers.cell import RecurrentCell
from keras_fancyrnn.layers.gru import GRU, GRUCell
from keras_fancyrnn.layers.lstm import LSTM, LSTMCell
from keras_fancyrnn.layers.simple_rnn import SimpleRNN, SimpleRNNCell
from keras_fancyrnn.layers.stacked import StackedRNN
from keras_fancyrnn.optim import ClippingOptimizer, ClippingStats

# TensorFlow-only parts (tf.data tasks, SavedModel export) load on first use, so that the package
# imports on the JAX and PyTorch backends without TensorFlow installed.
_LAZY = {"datasets": ("keras_fancyrnn.datasets", None),
         "export_saved_model": ("keras_fancyrnn.export", "export_saved_model")}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'keras_fancyrnn' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "Bidirectional",
    "ClippingOptimizer",
    "ClippingStats",
    "ConfigError",
    "ConversionError",
    "GRUCell",
    "GradientNormMonitor",
    "LayerSelectionError",
    "LSTMCell",
    "ProbeDataError",
    "RecurrentCell",
    "SimpleRNN",
    "SimpleRNNCell",
    "StackedRNN",
    "config",
    "datasets",
    "explain",
    "export_saved_model",
    "from_keras",
    "gradient_norms",
    "initializers",
    "portable",
]
