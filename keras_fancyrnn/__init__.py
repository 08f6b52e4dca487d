"""keras_fancyrnn: Keras 3 recurrent layers that show and fix vanishing and exploding gradients."""

__version__ = "0.1.0"

from keras_fancyrnn import initializers
from keras_fancyrnn.base import RNN, RecurrentCell
from keras_fancyrnn.gru import GRU, GRUCell
from keras_fancyrnn.lstm import LSTM, LSTMCell
from keras_fancyrnn.simple_rnn import SimpleRNN, SimpleRNNCell

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "GRUCell",
    "LSTMCell",
    "RecurrentCell",
    "SimpleRNN",
    "SimpleRNNCell",
    "initializers",
]
