r"""Keras's fused LSTM/GRU weights <-> cuDNN's canonical parameters, and cuDNN's mask rule.

The variables always stay in Keras's layout (so checkpoints and SavedModels do not depend on the
device); a fused-kernel path converts them inside the traced step, where the conversion is a few
slices and one concat. Pure ``keras.ops`` reshaping: it runs on every backend and on CPU.

**cuDNN's canonical layout** (``CUDNN_LSTM`` / ``CUDNN_GRU``, one layer, one direction; the
layout ``tf.raw_ops.CudnnRNNV3``'s ``params`` and PyTorch's ``weight_ih_l0``/``weight_hh_l0``/
``bias_ih_l0``/``bias_hh_l0`` use): per gate an input matrix ``W_g`` ``(units, D)`` and a recurrent
matrix ``R_g`` ``(units, units)`` (both ``out x in``, i.e. the transposed Keras block), an input
bias ``bW_g`` and a recurrent bias ``bR_g``. The flat ``params`` vector is every ``W_g`` then every
``R_g`` (row-major), then every ``bW_g``, then every ``bR_g``.

LSTM, gates ``i, f, c, o`` in both layouts (cuDNN's linear-layer ids 0-3 and 4-7):

.. math::  i = \sigma(W_i x + bW_i + R_i h + bR_i), \ldots,\quad
           c_t = f \odot c_{t-1} + i \odot \tanh(\cdot_c),\quad h_t = o \odot \tanh(c_t)

Keras has one bias: converting to cuDNN puts it in ``bR`` and zeros in ``bW`` (as Keras's TF
backend does); converting back folds ``b = bW + bR``.

GRU, Keras kernel order ``z, r, h``; cuDNN order ``r, z, h``. cuDNN's GRU is Keras's
``reset_after=True`` form, with Keras's bias row 0 = ``bW`` and row 1 = ``bR``:

.. math::  r = \sigma(W_r x + bW_r + R_r h + bR_r),\quad z = \sigma(W_z x + bW_z + R_z h + bR_z) \\
           \hat h = \tanh(W_h x + bW_h + r \odot (R_h h + bR_h)),\quad
           h_t = (1 - z) \odot \hat h + z \odot h_{t-1}

(AMD's MIOpen orders LSTM gates ``i, f, o, c``; it is not covered here.)
"""

from __future__ import annotations

from keras import ops

#: Gates per cell type: Keras's kernel order, and where each cuDNN gate sits in it.
LSTM_GATES = ("i", "f", "c", "o")
GRU_KERAS_GATES = ("z", "r", "h")
GRU_CUDNN_GATES = ("r", "z", "h")
# cuDNN gate k is Keras block _GRU_TO_CUDNN[k] (r <- 1, z <- 0, h <- 2); the map is its own inverse
_GRU_TO_CUDNN = (1, 0, 2)


def params_size(mode: str, input_dim: int, units: int) -> int:
    """Length of the flat cuDNN ``params`` vector for one layer, one direction."""
    gates = {"lstm": 4, "gru": 3}[mode]
    return gates * (units * input_dim + units * units + 2 * units)


def _blocks(matrix, gates: int):
    """Keras ``(in, gates·units)`` -> ``gates`` cuDNN ``(units, in)`` blocks."""
    return [ops.transpose(b) for b in ops.split(matrix, gates, axis=1)]


def _flatten(weights, biases):
    return ops.concatenate([ops.reshape(t, (-1,)) for t in [*weights, *biases]], axis=0)


def lstm_to_canonical(kernel, recurrent_kernel, bias):
    """Keras LSTM weights -> cuDNN ``(weights, biases)``: 8 matrices ``W_i..W_o, R_i..R_o`` and 8
    vectors ``bW_i..bW_o`` (zeros), ``bR_i..bR_o`` (Keras's bias)."""
    weights = _blocks(kernel, 4) + _blocks(recurrent_kernel, 4)
    b_r = ops.split(bias, 4)
    return weights, [ops.zeros_like(b) for b in b_r] + b_r


def gru_to_canonical(kernel, recurrent_kernel, bias):
    """Keras GRU (``reset_after=True``, bias ``(2, 3·units)``) weights -> cuDNN ``(weights,
    biases)``: 6 matrices ``W_r, W_z, W_h, R_r, R_z, R_h`` and 6 vectors ``bW_r..bW_h``,
    ``bR_r..bR_h``."""
    if len(bias.shape) != 2 or bias.shape[0] != 2:
        raise ValueError(
            "cuDNN's GRU is Keras's reset_after=True form with a bias of shape (2, 3 * units); "
            f"got a bias of shape {tuple(bias.shape)}"
        )

    def reorder(blocks):
        return [blocks[k] for k in _GRU_TO_CUDNN]

    weights = reorder(_blocks(kernel, 3)) + reorder(_blocks(recurrent_kernel, 3))
    biases = reorder(ops.split(bias[0], 3)) + reorder(ops.split(bias[1], 3))
    return weights, biases


def lstm_to_cudnn(kernel, recurrent_kernel, bias):
    """Keras LSTM weights -> the flat cuDNN ``params`` vector."""
    return _flatten(*lstm_to_canonical(kernel, recurrent_kernel, bias))


def gru_to_cudnn(kernel, recurrent_kernel, bias):
    """Keras GRU (``reset_after=True``) weights -> the flat cuDNN ``params`` vector."""
    return _flatten(*gru_to_canonical(kernel, recurrent_kernel, bias))


def _unflatten(params, gates: int, input_dim: int, units: int):
    expected = gates * (units * input_dim + units * units + 2 * units)
    if params.shape[0] != expected:
        raise ValueError(
            f"cuDNN params for {gates} gates, input_dim={input_dim}, units={units} must have "
            f"{expected} entries, got {params.shape[0]}"
        )
    sizes = [units * input_dim] * gates + [units * units] * gates + [units] * (2 * gates)
    pieces = ops.split(params, [sum(sizes[: k + 1]) for k in range(len(sizes) - 1)])
    w = [ops.reshape(p, (units, input_dim)) for p in pieces[:gates]]
    r = [ops.reshape(p, (units, units)) for p in pieces[gates: 2 * gates]]
    return w, r, pieces[2 * gates: 3 * gates], pieces[3 * gates:]


def cudnn_to_lstm(params, input_dim: int, units: int):
    """Flat cuDNN LSTM ``params`` -> Keras ``(kernel, recurrent_kernel, bias)``; the two cuDNN
    biases are folded into Keras's one (``b = bW + bR``)."""
    w, r, b_w, b_r = _unflatten(ops.convert_to_tensor(params), 4, input_dim, units)
    kernel = ops.concatenate([ops.transpose(m) for m in w], axis=1)
    recurrent_kernel = ops.concatenate([ops.transpose(m) for m in r], axis=1)
    bias = ops.concatenate([bw + br for bw, br in zip(b_w, b_r, strict=True)], axis=0)
    return kernel, recurrent_kernel, bias


def cudnn_to_gru(params, input_dim: int, units: int):
    """Flat cuDNN GRU ``params`` -> Keras ``reset_after=True`` ``(kernel, recurrent_kernel,
    bias)`` with ``bias`` ``(2, 3·units)``."""
    w, r, b_w, b_r = _unflatten(ops.convert_to_tensor(params), 3, input_dim, units)

    def keras_order(blocks):
        return [blocks[k] for k in _GRU_TO_CUDNN]

    kernel = ops.concatenate([ops.transpose(m) for m in keras_order(w)], axis=1)
    recurrent_kernel = ops.concatenate([ops.transpose(m) for m in keras_order(r)], axis=1)
    bias = ops.stack(
        [ops.concatenate(keras_order(b_w), axis=0), ops.concatenate(keras_order(b_r), axis=0)]
    )
    return kernel, recurrent_kernel, bias


def cudnn_mask_ok(mask):
    """Whether cuDNN can honour ``mask`` ``(batch, time)``: every row is right-padded (``True``\\s
    then ``False``\\s) and none is fully masked (cuDNN rejects zero-length sequences). A scalar
    bool tensor, for a ``cond`` between the fused kernel and the engine's loop at run time."""
    mask = ops.cast(mask, "bool")
    lengths = ops.sum(ops.cast(mask, "int32"), axis=1)
    steps = ops.arange(ops.shape(mask)[1], dtype="int32")
    right_padded = ops.all(ops.equal(mask, steps[None, :] < lengths[:, None]))
    return ops.logical_and(right_padded, ops.all(lengths > 0))


def sequence_lengths(mask):
    """``(batch,)`` int32 lengths of a right-padded ``mask``: cuDNN's ``sequence_lengths``."""
    return ops.sum(ops.cast(mask, "int32"), axis=1)


# -- the fused kernel ----------------------------------------------------------------------------
def cudnn_rnn_v3(**kwargs):
    """``tf.raw_ops.CudnnRNNV3`` (GPU only). One indirection, so that CPU tests can run the
    dispatch below with cuDNN's equations written in numpy in its place."""
    from keras_fancyrnn._tf import tf

    return tf.raw_ops.CudnnRNNV3(**kwargs)


def run(cell, inputs, initial_state, *, mask=None, dropout_mask=None, go_backwards=False,
        zero_output_for_mask=False):
    """Runs an LSTM/GRU cell with the fused cuDNN kernel and returns what the engine's loop returns:
    ``(last_output, outputs [B, T, H] in processing order, final_states)``.

    ``mask`` must be right-padded with no empty row (``cudnn_mask_ok``). cuDNN writes zeros past a
    sequence's end; the engine's loop repeats the last output there (unless
    ``zero_output_for_mask``), and with ``go_backwards`` processes the padding first. Both are
    rebuilt here, so the two paths agree step for step.
    """
    from keras_fancyrnn._tf import tf

    lstm = len(initial_state) == 2
    to_cudnn = lstm_to_cudnn if lstm else gru_to_cudnn
    params = to_cudnn(cell.kernel, cell.recurrent_kernel, cell.bias)
    x = inputs if dropout_mask is None else inputs * dropout_mask[:, None, :]
    x = tf.transpose(x, [1, 0, 2])  # time-major
    steps, batch = tf.shape(x)[0], tf.shape(x)[1]
    lengths = tf.fill([batch], steps) if mask is None else tf.cast(sequence_lengths(mask),
                                                                     tf.int32)
    if go_backwards:
        x = tf.reverse_sequence(x, lengths, seq_axis=0, batch_axis=1)
    h0 = initial_state[0][None]
    c0 = initial_state[1][None] if lstm else tf.zeros_like(h0)
    outputs, h, c, _, _ = cudnn_rnn_v3(
        input=x, input_h=h0, input_c=c0, params=params, is_training=True,
        rnn_mode="lstm" if lstm else "gru", sequence_lengths=lengths, time_major=True)
    h = h[0]
    c = c[0] if lstm else None  # GRU: CudnnRNNV3's output_c is a scalar placeholder
    if mask is not None:
        valid = tf.transpose(tf.cast(mask, tf.bool), [1, 0])[:, :, None]  # [T, B, 1]
        if go_backwards:  # processing order: the padding first (zeros), then the reversed steps
            outputs = tf.reverse(tf.reverse_sequence(outputs, lengths, seq_axis=0, batch_axis=1),
                                 [0])
        elif not zero_output_for_mask:
            outputs = tf.where(valid, outputs, h[None])
    outputs = tf.transpose(outputs, [1, 0, 2])
    return outputs[:, -1], outputs, ([h, c] if lstm else [h])


__all__ = [
    "cudnn_rnn_v3",
    "run",
    "cudnn_mask_ok",
    "cudnn_to_gru",
    "cudnn_to_lstm",
    "gru_to_canonical",
    "gru_to_cudnn",
    "lstm_to_canonical",
    "lstm_to_cudnn",
    "params_size",
    "sequence_lengths",
]
