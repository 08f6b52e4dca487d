"""Gated recurrent unit: ``GRUCell`` (one step) and ``GRU`` (the layer)."""

from __future__ import annotations

import keras
from keras import ops

from keras_fancyrnn.layers.base import RNN, build_cell, layer_arguments
from keras_fancyrnn.layers.cell import RecurrentCell, get_activation
from keras_fancyrnn.layers.gpu import CudnnMixin
from keras_fancyrnn.ops import native


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class GRUCell(RecurrentCell):
    r"""One GRU step (Cho et al. 2014), Keras's layout and numerics. Kernel order z, r, h.

    ``reset_after=True`` (default, cuDNN-compatible; bias ``(2, 3·units)`` = input and recurrent
    bias):

    .. math::
        z = \sigma(x W_z + b_z + h U_z + b'_z),\; r = \sigma(x W_r + b_r + h U_r + b'_r) \\
        \hat h = \tanh(x W_h + b_h + r \odot (h U_h + b'_h)),\;
        h_t = z \odot h_{t-1} + (1 - z) \odot \hat h

    ``reset_after=False``: :math:`\hat h = \tanh(x W_h + b_h + (r \odot h) U_h)`,
    bias ``(3·units,)``.
    Weights: ``kernel`` ``(D, 3·units)``, ``recurrent_kernel`` ``(units, 3·units)``.
    """

    gates = 3

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid",
                 reset_after=True, **kwargs):
        super().__init__(units, activation=activation, **kwargs)
        self.recurrent_activation = get_activation("recurrent_activation", recurrent_activation)
        self.reset_after = bool(reset_after)

    def bias_layout(self):
        shape = (2, 3 * self.units) if self.reset_after else (3 * self.units,)
        return shape, self.bias_initializer

    @property
    def input_bias(self):
        if self.bias is None or not self.reset_after:
            return self.bias
        return self.bias[0]

    def step(self, xp_t, states, recurrent_mask=None):
        h_prev = states[0]
        u = self.units
        if self.reset_after:
            rec = self.recurrent_matmul(h_prev, recurrent_mask, self.recurrent_kernel)
            if self.bias is not None:
                rec = rec + self.bias[1]
            if self.native_gates(rec.dtype):  # the lines below, as one C++ op
                h = native.gru_gates(xp_t, rec, h_prev)
                return h, [h]
        x_z, x_r, x_h = ops.split(xp_t, 3, axis=-1)
        per_gate = isinstance(recurrent_mask, (list, tuple))
        masks = list(recurrent_mask) if per_gate else [recurrent_mask] * 3
        if self.reset_after:
            r_z, r_r, r_h = ops.split(rec, 3, axis=-1)
            z = self.recurrent_activation(x_z + r_z)
            r = self.recurrent_activation(x_r + r_r)
            h_hat = self.activation(x_h + r * r_h)
        else:
            zr_mask = masks[:2] if per_gate else recurrent_mask
            rec = self.recurrent_matmul(h_prev, zr_mask, self.recurrent_kernel[:, : 2 * u])
            r_z, r_r = ops.split(rec, 2, axis=-1)
            z = self.recurrent_activation(x_z + r_z)
            r = self.recurrent_activation(x_r + r_r)
            h_for_h = h_prev if masks[2] is None else h_prev * masks[2]
            h_hat = self.activation(x_h + ops.matmul(r * h_for_h, self.recurrent_kernel[:, 2 * u:]))
        h = z * h_prev + (1.0 - z) * h_hat
        return h, [h]


    def sequence_kernel(self, inputs, kernel, states, bias=None, mask=None, probes=None,
                        go_backwards=False):
        """``step`` over all of batch-major ``inputs`` in one C++ op (tanh/sigmoid; either
        ``reset_after``), which projects them with ``kernel`` and adds the input bias ``bias``
        itself, with ``mask`` and ``probes`` (``native.gru_sequence``)."""
        u = ops.convert_to_tensor(self.recurrent_kernel)
        if not self.reset_after:
            return native.gru_before_sequence(inputs, kernel, states[0], u, bias, mask=mask,
                                              probes=probes, go_backwards=go_backwards)
        b_rec = None if self.bias is None else ops.convert_to_tensor(self.bias)[1]
        return native.gru_sequence(inputs, kernel, states[0], u, b_rec, bias, mask=mask,
                                   probes=probes, go_backwards=go_backwards)

    def get_config(self):
        return {
            **super().get_config(),
            "recurrent_activation": keras.activations.serialize(self.recurrent_activation),
            "reset_after": self.reset_after,
        }


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class GRU(CudnnMixin, RNN):
    """Drop-in ``keras.layers.GRU`` on the keras_fancyrnn engine (see ``GRUCell``).

    Same arguments, defaults, weights and outputs as Keras, plus ``bptt_truncate``.
    """

    cell_class = GRUCell

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
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
        seed=None,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        reset_after=True,
        use_cudnn="auto",
        bptt_truncate=None,
        **kwargs,
    ):
        args = dict(locals())  # the signature above is Keras's; the cell takes its share
        cell = build_cell(GRUCell, args, kwargs, name="gru_cell")
        super().__init__(cell, **layer_arguments(args), **kwargs)
