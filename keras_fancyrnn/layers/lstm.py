"""Long short-term memory: ``LSTMCell`` (one step) and ``LSTM`` (the layer)."""

from __future__ import annotations

import keras
from keras import ops

from keras_fancyrnn.layers.base import RNN, build_cell, layer_arguments
from keras_fancyrnn.layers.cell import RecurrentCell, get_activation
from keras_fancyrnn.layers.gpu import CudnnMixin
from keras_fancyrnn.ops import native


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class LSTMCell(RecurrentCell):
    r"""One LSTM step (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000),
    Keras's layout and numerics. Gates in kernel order i, f, c, o; ``z = x_t W + b + h_{t-1} U``:

    .. math::
        i = \sigma(z_i),\; f = \sigma(z_f),\; g = \tanh(z_c),\; o = \sigma(z_o) \\
        c_t = f \odot c_{t-1} + i \odot g, \qquad h_t = o \odot \tanh(c_t)

    Weights: ``kernel`` ``(D, 4·units)``, ``recurrent_kernel`` ``(units, 4·units)``,
    ``bias`` ``(4·units,)``. ``unit_forget_bias=True`` initialises ``b_f`` to 1
    (Jozefowicz et al. 2015), visibly in the weights. States: ``[h, c]``.
    """

    gates = 4

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid",
                 unit_forget_bias=True, **kwargs):
        super().__init__(units, activation=activation, **kwargs)
        self.recurrent_activation = get_activation("recurrent_activation", recurrent_activation)
        self.unit_forget_bias = bool(unit_forget_bias)
        if self.unit_forget_bias and getattr(self.bias_initializer, "sets_forget_bias", False):
            raise ValueError(
                f"{type(self.bias_initializer).__name__} sets the forget-gate bias itself: pass "
                "unit_forget_bias=False with it"
            )

    @property
    def state_size(self):
        return [self.units, self.units]

    def bias_layout(self):
        units, init = self.units, self.bias_initializer
        if not self.unit_forget_bias:
            return (4 * units,), init

        def bias_with_forget_one(shape, dtype=None):
            return ops.concatenate([init((units,), dtype=dtype), ops.ones((units,), dtype=dtype),
                                    init((2 * units,), dtype=dtype)])

        return (4 * units,), bias_with_forget_one

    #: The engine hands ``step`` the probe of ``c_t`` (state 1) to add before ``h_t`` is formed, so
    #: that its gradient is the total ``∂ℓ/∂c_t`` (see ``keras_fancyrnn.engine``).
    probes_in_step = True

    def step(self, xp_t, states, recurrent_mask=None, probes=None):
        h_prev, c_prev = states
        z = xp_t + self.recurrent_matmul(h_prev, recurrent_mask, self.recurrent_kernel)
        if set(probes or ()) <= {1} and self.native_gates(z.dtype):  # the lines below, one op
            h, c = native.lstm_gates(z, c_prev, probe=(probes or {}).get(1))
            return h, [h, c]
        z_i, z_f, z_c, z_o = ops.split(z, 4, axis=-1)
        i = self.recurrent_activation(z_i)
        f = self.recurrent_activation(z_f)
        g = self.activation(z_c)
        o = self.recurrent_activation(z_o)
        c = f * c_prev + i * g
        if probes and 1 in probes:
            c = c + probes[1]
        h = o * self.activation(c)
        return h, [h, c]

    #: Where TensorFlow's fused kernel beat the loop (training and inference,
    #: benchmarks/fused_kernel.py, benchmarks/results/fused_kernel_d128.md): small layers, whose
    #: loop is per-op overhead, with ``units <= 96``, ``input_dim <= units`` and
    #: ``batch · (input_dim + units) · 4 · units`` multiply-adds per step up to this many.
    #: Bigger layers run faster in the loop (the kernel's Eigen products are slower than
    #: oneDNN's). The first limit is against the loop with the fused gate kernels
    #: (``keras_fancyrnn.ops.native``), the second without them.
    fused_max_macs = 450_000
    fused_max_macs_plain_loop = 1_300_000

    def sequence_kernel(self, inputs, kernel, states, bias=None, mask=None, probes=None,
                        go_backwards=False):
        """``step`` over all of batch-major ``inputs`` in one C++ op (tanh/sigmoid), which
        projects them with ``kernel`` and adds ``bias`` itself, with ``mask`` and ``probes``
        (``native.lstm_sequence``)."""
        return native.lstm_sequence(inputs, kernel, states[0], states[1],
                                    ops.convert_to_tensor(self.recurrent_kernel), bias,
                                    mask=mask, probes=probes, go_backwards=go_backwards)

    def block_lstm_batch_limit(self, input_dim, dtype):
        """The largest batch for which ``block_lstm_sequence`` runs instead of the loop (where
        the sequence kernel cannot; keras_fancyrnn.engine.dispatch), 0 where it never does:
        ``BlockLSTMV2``'s size rule, which needs tanh/sigmoid (its hard-coded activations),
        float32 and the TensorFlow backend."""
        if (self.activation is not keras.activations.tanh
                or self.recurrent_activation is not keras.activations.sigmoid
                or dtype != "float32" or keras.config.backend() != "tensorflow"
                or input_dim is None or self.units > 96 or input_dim > self.units):
            return 0
        macs = self.fused_max_macs if self.native_gates(dtype) else self.fused_max_macs_plain_loop
        return macs // ((input_dim + self.units) * 4 * self.units)

    def block_lstm_sequence(self, inputs, states, dropout_mask=None):
        """All timesteps of ``step`` in TensorFlow's ``BlockLSTMV2``, whose equations and weight
        layout are this cell's (``[x_t, h_{t-1}] [W; U] + b``, gates i, f, c, o,
        sigmoid/tanh, no peephole, no clipping), in place of some 40 ops per step in the loop and
        60 in its gradient. ``inputs``: ``[T, B, D]``; ``dropout_mask``: ``None`` or one ``[B, D]``
        mask. Returns ``(outputs [T, B, units], [h_T, c_T])``. The gradient kernel has no gradient:
        second derivatives need the loop (``keras_fancyrnn.config``'s ``fused_on_cpu=False``)."""
        from keras_fancyrnn._tf import tf

        if dropout_mask is not None:
            inputs = inputs * dropout_mask  # broadcasts over time, as in project_inputs
        kernel = tf.concat([self.kernel, self.recurrent_kernel], axis=0)
        bias = tf.zeros([4 * self.units]) if self.bias is None else tf.convert_to_tensor(self.bias)
        h_seq, c_seq = _block_lstm(inputs, states[0], states[1], kernel, bias)
        return h_seq, [h_seq[-1], c_seq[-1]]

    def get_config(self):
        return {
            **super().get_config(),
            "recurrent_activation": keras.activations.serialize(self.recurrent_activation),
            "unit_forget_bias": self.unit_forget_bias,
        }


def _block_lstm(x, h_prev, c_prev, kernel, bias):
    """``BlockLSTMV2`` forward, ``BlockLSTMGradV2`` backward: ``(h [T,B,H], c [T,B,H])``.

    TensorFlow (2.21) registers ``BlockLSTMGrad`` as the gradient of ``BlockLSTMV2``: the kernel
    of the V1 op, whose gate layout is i, c, f, o, so with V2's i, f, c, o it is wrong
    (benchmarks/fused_kernel.py prints the error). Hence this custom gradient.
    """
    from keras_fancyrnn._tf import tf

    no_peephole = tf.zeros([kernel.shape[1] // 4], kernel.dtype)

    @tf.custom_gradient
    def block(x, h_prev, c_prev, kernel, bias):
        args = dict(seq_len_max=tf.cast(tf.shape(x)[0], tf.int64), x=x, cs_prev=c_prev,
                    h_prev=h_prev, w=kernel, wci=no_peephole, wcf=no_peephole, wco=no_peephole,
                    b=bias)
        out = tf.raw_ops.BlockLSTMV2(**args, cell_clip=-1.0, use_peephole=False)

        def grad(dh, dc):
            dh = tf.zeros_like(out.h) if dh is None else dh
            dc = tf.zeros_like(out.cs) if dc is None else dc
            g = tf.raw_ops.BlockLSTMGradV2(**args, i=out.i, cs=out.cs, f=out.f, o=out.o,
                                           ci=out.ci, co=out.co, h=out.h, cs_grad=dc, h_grad=dh,
                                           use_peephole=False)
            return g.x_grad, g.h_prev_grad, g.cs_prev_grad, g.w_grad, g.b_grad

        return (out.h, out.cs), grad

    return block(x, h_prev, c_prev, kernel, bias)


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class LSTM(CudnnMixin, RNN):
    """Drop-in ``keras.layers.LSTM`` on the keras_fancyrnn engine (see ``LSTMCell``).

    Same arguments, defaults, weights and outputs as Keras, plus ``bptt_truncate``.
    """

    cell_class = LSTMCell

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        unit_forget_bias=True,
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
        use_cudnn="auto",
        bptt_truncate=None,
        **kwargs,
    ):
        args = dict(locals())  # the signature above is Keras's; the cell takes its share
        cell = build_cell(LSTMCell, args, kwargs, name="lstm_cell")
        super().__init__(cell, **layer_arguments(args), **kwargs)
