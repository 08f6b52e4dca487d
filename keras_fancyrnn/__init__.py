"""keras_fancyrnn: Keras 3 recurrent layers that show and fix vanishing and exploding gradients."""

__version__ = "0.1.0"

from keras_fancyrnn import config, datasets
from keras_fancyrnn.diagnostics import GradientNormMonitor, gradient_norms
from keras_fancyrnn.engine.dispatch import explain, portable
from keras_fancyrnn.errors import ConfigError, LayerSelectionError, ProbeDataError
from keras_fancyrnn.export import export_saved_model
from keras_fancyrnn.layers import initializers
from keras_fancyrnn.layers.base import RNN, RecurrentCell
from keras_fancyrnn.layers.gru import GRU, GRUCell
from keras_fancyrnn.layers.lstm import LSTM, LSTMCell
from keras_fancyrnn.layers.simple_rnn import SimpleRNN, SimpleRNNCell
from keras_fancyrnn.layers.wrappers import Bidirectional, StackedRNN
from keras_fancyrnn.optim.clipping import ClippingOptimizer, ClippingStats

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "Bidirectional",
    "ClippingOptimizer",
    "ClippingStats",
    "ConfigError",
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
    "gradient_norms",
    "initializers",
    "portable",
]
