"""The ``"torch_rnn"`` path: on the PyTorch backend, an LSTM or GRU cell whose equations are
PyTorch's own runs as one ``torch._VF.lstm`` / ``torch._VF.gru`` call (PyTorch's native kernel on
the CPU, cuDNN on CUDA) instead of the engine's Python loop of ``keras.ops`` steps.

The equations are the same (``keras_fancyrnn.engine.dispatch`` checks that they are: tanh and
sigmoid, GRU with ``reset_after=True``, no mask, probes, truncation or dropout): Keras's LSTM gate
order i, f, c, o is PyTorch's i, f, g, o; PyTorch's GRU orders its gates r, z, n where Keras has
z, r, h, and its two biases are Keras's GRU bias rows (input, recurrent); PyTorch's second LSTM
bias is zeros. Only the order of the sums differs, which is float rounding.
"""

from __future__ import annotations

from keras import ops

from keras_fancyrnn.engine.steps import as_list


def _gru_order(w):
    """Keras's GRU gate blocks z, r, h along the last axis as PyTorch's r, z, n."""
    z, r, h = ops.split(w, 3, axis=-1)
    return ops.concatenate([r, z, h], axis=-1)


def _parameters(cell, dtype):
    """``[W_ih, W_hh, b_ih, b_hh]`` in PyTorch's layout (``[gates·units, features]``)."""
    import torch

    kernel = ops.convert_to_tensor(cell.kernel)
    recurrent = ops.convert_to_tensor(cell.recurrent_kernel)
    width = recurrent.shape[-1]
    bias = None if cell.bias is None else ops.convert_to_tensor(cell.bias)
    zeros = torch.zeros(width, dtype=dtype, device=kernel.device)
    if cell.gates == 3:  # GRU, reset_after=True: bias [2, 3·units] (input, recurrent)
        kernel, recurrent = _gru_order(kernel), _gru_order(recurrent)
        b_ih, b_hh = (zeros, zeros) if bias is None else (_gru_order(bias[0]),
                                                          _gru_order(bias[1]))
    else:  # LSTM: one bias [4·units]
        b_ih, b_hh = (zeros if bias is None else bias), zeros
    return [kernel.T.contiguous(), recurrent.T.contiguous(), b_ih, b_hh]


def run(cell, inputs, initial_state, *, go_backwards=False, return_sequences=True, **unused):
    """``(last_output, outputs or None, final_states)``, as ``keras_fancyrnn.engine.run``, for the
    calls the dispatch sends here (``unused``: the engine's other arguments, at their no-op
    values there)."""
    import torch

    inputs = ops.convert_to_tensor(inputs)
    states = [ops.convert_to_tensor(s)[None] for s in as_list(initial_state)]  # [1, B, H]
    if go_backwards:
        inputs = torch.flip(inputs, dims=[1])
    params = _parameters(cell, inputs.dtype)
    flags = (True, 1, 0.0, torch.is_grad_enabled(), False, True)  # bias, layers, dropout,
    if cell.gates == 4:  # training, bidirectional, batch_first
        outputs, h, c = torch._VF.lstm(inputs, (states[0], states[1]), params, *flags)
        final = [h[0], c[0]]
    else:
        outputs, h = torch._VF.gru(inputs, states[0], params, *flags)
        final = [h[0]]
    return final[0], (outputs if return_sequences else None), final


__all__ = ["run"]
