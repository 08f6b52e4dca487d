"""Elman's recurrent network: ``SimpleRNNCell`` (one step) and ``SimpleRNN`` (the layer)."""

from __future__ import annotations

import keras
from keras import ops

from keras_fancyrnn.layers.base import RNN, build_cell, layer_arguments
from keras_fancyrnn.layers.cell import RecurrentCell
from keras_fancyrnn.ops import native


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class SimpleRNNCell(RecurrentCell):
    r"""One step of a fully-connected RNN (Elman 1990), Keras's layout and numerics.

    .. math::  h_t = \sigma(x_t W + b + h_{t-1} U)

    Weights: ``kernel`` W ``(D, units)``, ``recurrent_kernel`` U ``(units, units)``,
    ``bias`` b ``(units,)``. ``x_t W + b`` is hoisted out of the time loop by the engine.
    For an IRNN (Le, Jaitly & Hinton 2015) use ``activation="relu"``,
    ``recurrent_initializer=keras.initializers.Identity()`` and a zero bias.
    Dropout is variational (one mask per sequence) on ``x`` and on ``h_{t-1}``, as in Keras.
    """

    gates = 1

    def step(self, xp_t, states, recurrent_mask=None):
        h_prev = states[0]
        h = self.activation(xp_t + self.recurrent_matmul(h_prev, recurrent_mask,
                                                         self.recurrent_kernel))
        return h, [h]

    def sequence_kernel_blocker(self) -> str | None:
        if self._kernel_activation() is None:
            return "the SimpleRNN sequence kernel runs tanh and relu, not this activation"
        return None

    def _kernel_activation(self):
        """The sequence kernel's name for this cell's activation: tanh, or ReLU (Keras's own
        function with its defaults, as ``activation="relu"`` gives: the IRNN); else ``None``."""
        if self.activation is keras.activations.tanh:
            return "tanh"
        return "relu" if self.activation is keras.activations.relu else None

    def sequence_kernel(self, inputs, kernel, states, bias=None, mask=None, probes=None,
                        go_backwards=False):
        """``step`` over all of batch-major ``inputs`` in one C++ op (tanh or ReLU), which
        projects them with ``kernel`` and adds ``bias`` itself, with ``mask`` and ``probes``
        (``native.rnn_sequence``)."""
        return native.rnn_sequence(inputs, kernel, states[0],
                                   ops.convert_to_tensor(self.recurrent_kernel),
                                   self._kernel_activation(), bias, mask=mask, probes=probes,
                                   go_backwards=go_backwards)


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class SimpleRNN(RNN):
    """Drop-in ``keras.layers.SimpleRNN`` on the keras_fancyrnn engine (see ``SimpleRNNCell``).

    Same arguments, defaults, weights and outputs as Keras, plus ``bptt_truncate``.
    """

    cell_class = SimpleRNNCell

    def __init__(
        self,
        units,
        activation="tanh",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        seed=None,
        bptt_truncate=None,
        **kwargs,
    ):
        args = dict(locals())  # the signature above is Keras's; the cell takes its share
        cell = build_cell(SimpleRNNCell, args, kwargs, name="simple_rnn_cell")
        super().__init__(cell, **layer_arguments(args), **kwargs)
