"""keras_fancyrnn: Keras 3 recurrent layers that show and fix vanishing and exploding gradients."""

__version__ = "0.1.0"

from keras_fancyrnn import config, datasets
from keras_fancyrnn.convert import from_keras
from keras_fancyrnn.diagnostics import GradientNormMonitor, gradient_norms
from keras_fancyrnn.engine.dispatch import explain, portable
from keras_fancyrnn.errors import (
    ConfigError,
    ConversionError,
    LayerSelectionError,
    ProbeDataError,
)
from keras_fancyrnn.export import export_saved_model
from keras_fancyrnn.layers import initializers
from keras_fancyrnn.layers.base import RNN
from keras_fancyrnn.layers.bidirectional import Bidirectional
from keras_fancyrnn.layers.cell import RecurrentCell
from keras_fancyrnn.layers.gru import GRU, GRUCell
from keras_fancyrnn.layers.lstm import LSTM, LSTMCell
from keras_fancyrnn.layers.simple_rnn import SimpleRNN, SimpleRNNCell
from keras_fancyrnn.layers.stacked import StackedRNN
from keras_fancyrnn.optim import ClippingOptimizer, ClippingStats

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
