"""The one recurrence engine every keras_fancyrnn layer runs on.

A layer hands the engine its cell and its inputs; the engine owns everything that is about *time*:

* the **hoisted input projection**: ``x_t W + b`` for all timesteps is one matmul before the loop
  (``cell.project_inputs``); only ``h_{t-1} U`` runs inside the loop (``cell.step``);
* variational dropout masks (one mask per sequence, as Keras), masking, direction, initial states;
* truncated BPTT (``bptt_truncate=k``): every gradient flows back at most ``k`` steps;
* the diagnostics probe: a zero tensor ``p_t`` added to each state after each step, so that
  ``∂ℓ/∂p_t`` is the *total* derivative ``∂ℓ/∂h_t`` through the recurrence; and a zero
  ``E_t`` added to the recurrent kernel at step ``t`` only (probe key ``"recurrent_kernel"``),
  so that ``∂ℓ/∂E_t`` is step ``t``'s term of the BPTT sum ``∂ℓ/∂U = Σ_t ∂ℓ/∂E_t``.

The engine never imports a cell class. A cell it can run has

* ``state_size`` (int or list of ints) and ``get_initial_state(batch_size)``;
* ``project_inputs(x, dropout_mask) -> xp`` for ``x`` of shape ``[B, D]`` or ``[T, B, D]``;
* ``step(xp_t, states, recurrent_mask) -> (output, new_states)`` with ``output`` equal to
  ``new_states[0]`` (the hidden state ``h_t``); a cell whose other states feed ``h_t`` within
  the step (LSTM: ``c_t``) sets ``probes_in_step`` and takes ``probes={i: p_t}`` for them;
* the Keras ``DropoutRNNCell`` mask API (``get_dropout_mask`` …);
* optionally ``weights_read_once()``, a context in which the loop is built with the cell's
  weights read once rather than at every step.

Truncation (the WildML tutorial's ``bptt_truncate``): the gradient of the output at step ``t``
reaches ``h_t, h_{t-1}, …, h_{t-k}`` and no further, i.e. every Jacobian product
``∂h_t/∂h_s`` with ``t - s > k`` is cut, while forward values are unchanged. The engine realises
this exactly with ``k + 1`` copies of the state stacked along the batch axis: copy ``j`` at step
``t`` is computed from copy ``j - 1`` at step ``t - 1`` and copy 0 is a ``stop_gradient``; outputs
are read from the top copy. Every copy holds the same value, so the forward pass is unchanged and
a gradient can pass through at most ``k`` steps. Cost: ``k + 1`` times the per-step work, so it is
only used where ``k < T - 1`` (otherwise truncation changes nothing).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

from keras_fancyrnn._tf import tf
from keras_fancyrnn.engine import cudnn, dispatch
from keras_fancyrnn.engine.steps import (
    KERNEL_PROBE,
    STATES_SINK,
    as_list,
    check_unroll,
    copies_for,
    dropout_masks,
    step_function,
    tile_batch,
    untile,
)


def run(
    cell,
    inputs,
    initial_state: Sequence,
    *,
    mask=None,
    training: bool = False,
    go_backwards: bool = False,
    unroll: bool = False,
    return_sequences: bool = True,
    zero_output_for_mask: bool = False,
    bptt_truncate: int | None = None,
    probes: dict | None = None,
    plan: dispatch.Plan | None = None,
):
    """Runs ``cell`` over the time axis of ``inputs`` on the path ``plan`` names
    (``keras_fancyrnn.engine.dispatch``, which the layer asks).

    Args:
        cell: a cell with the engine contract (module docstring).
        inputs: ``[B, T, D]`` float tensor.
        initial_state: list of ``[B, S_i]`` tensors, one per entry of ``cell.state_size``.
        mask: optional ``[B, T]`` boolean tensor; at a masked step the states are carried over
            unchanged and the output is the previous output (zeros with ``zero_output_for_mask``).
        go_backwards: process the sequence in reverse; returned sequences are in processing
            order, as in Keras.
        unroll: a Python loop instead of a ``tf.while_loop`` (needs a static ``T``).
        bptt_truncate: ``None`` (full BPTT) or ``k >= 1``: gradients flow back at most ``k`` steps.
        probes: ``{state_index: [B, T, S_i] tensor}`` added to state ``state_index`` after the step
            at input time ``t`` (input order, also when ``go_backwards``). Zero tensors make
            ``∂ℓ/∂probe[:, t]`` the total derivative ``∂ℓ/∂h_t``. At masked steps the probe is not
            added, so its gradient there is 0. Key ``"recurrent_kernel"``: ``[T, H, P]`` added
            to the recurrent kernel at step ``t`` only (``keras_fancyrnn.engine.probes``); key
            ``"states_out"``: a list the engine appends its outputs ``[B, T, H]`` to (input
            time order). The kernel probe runs on the loop whatever ``plan`` says.
        plan: the path. ``"cudnn"`` runs the cuDNN kernel (with a mask, only where it is
            right-padded, else the loop: checked at run time); ``"sequence_kernel"`` and
            ``"block_lstm"`` the cell's whole-sequence kernel (``cell.fused_sequence`` or
            ``cell.block_lstm_sequence``; the loop above ``plan.batch_limit``); ``"loop"`` the
            step loop, with the input projection hoisted before it where ``plan.hoist_inputs``
            (on a GPU; on a CPU the per-step form measured faster).
            ``None``: the loop, projection per step.

    Returns:
        ``(last_output [B, H], outputs [B, T, H] or None, final_states list)``.
    """
    initial_state = as_list(initial_state)
    inputs = tf.convert_to_tensor(inputs)
    plan = plan or dispatch.Plan("", "loop", "no plan given")
    if probes and KERNEL_PROBE in probes and plan.path != "loop":
        plan = dispatch.Plan(plan.layer, "loop", "the recurrent-kernel probe runs in the loop only")

    dp_mask, rec_mask = dropout_masks(cell, inputs[:, 0], initial_state[0], training)
    loop = functools.partial(_loop_reading_weights_once, cell, inputs, initial_state, mask,
                             dp_mask, rec_mask, go_backwards, unroll, return_sequences,
                             zero_output_for_mask, bptt_truncate, probes, plan.hoist_inputs)
    if plan.path in ("sequence_kernel", "block_lstm"):
        sequence = (cell.fused_sequence if plan.path == "sequence_kernel"
                    else functools.partial(_block_lstm, cell))
        whole = functools.partial(_fused, sequence, cell, inputs, initial_state, dp_mask,
                                  go_backwards, return_sequences, mask, probes,
                                  zero_output_for_mask)
        limit = plan.batch_limit
        if limit >= dispatch.ANY_BATCH:
            return whole()
        if inputs.shape[0] is not None:
            return whole() if inputs.shape[0] <= limit else loop()
        return tf.cond(tf.shape(inputs)[0] <= limit, whole, loop)
    if plan.path != "cudnn":
        return loop()
    fused = functools.partial(cudnn.run, cell, inputs, initial_state, mask=mask,
                              dropout_mask=dp_mask, go_backwards=go_backwards,
                              zero_output_for_mask=zero_output_for_mask)
    if mask is None:
        return _drop_sequence(fused(), return_sequences)
    return tf.cond(cudnn.cudnn_mask_ok(mask), lambda: _drop_sequence(fused(), return_sequences),
                   loop)


def _fused(sequence, cell, inputs, initial_state, dp_mask, go_backwards, return_sequences,
           mask=None, probes=None, zero_output_for_mask=False):
    """The cell's whole-sequence kernel ``sequence`` in place of the loop (same results as
    ``_loop``). It reads the cell's weights, so it waits while another thread has them swapped
    for tensors (``weights_read_once``)."""
    probes = dict(probes or {})
    sink = probes.pop(STATES_SINK, None)
    mask, probes = _time_major_extras(mask, probes, go_backwards)
    kwargs = {} if mask is None and not probes else {"mask": mask, "probes": probes}
    with getattr(cell, "_weights_lock", None) or contextlib.nullcontext():
        hidden, states = sequence(inputs, list(initial_state), dp_mask, go_backwards=go_backwards,
                                  **kwargs)
    if mask is None:  # the outputs are the hidden states
        last = states[0]
    else:  # the state, once a step has been unmasked (Keras's outputs start at zeros)
        shown = mask if zero_output_for_mask else tf.cumsum(tf.cast(mask, tf.int32), axis=0) > 0
        last = tf.where(shown[-1][:, None], states[0], tf.zeros_like(states[0]))
        if return_sequences or sink is not None:
            hidden = tf.where(shown[..., None], hidden, tf.zeros_like(hidden))
    if sink is not None:  # the outputs as the loop's sink has them: batch-major, input order
        sink.append(tf.transpose(tf.reverse(hidden, [0]) if go_backwards else hidden, [1, 0, 2]))
    outputs = tf.transpose(hidden, [1, 0, 2]) if return_sequences else None
    return last, outputs, list(states)


def _block_lstm(cell, inputs, states, dropout_mask=None, go_backwards=False):
    """``cell.block_lstm_sequence`` for batch-major ``inputs`` (it takes them time-major, in
    processing order)."""
    xs = tf.transpose(inputs, [1, 0, 2])
    return cell.block_lstm_sequence(tf.reverse(xs, [0]) if go_backwards else xs, states,
                                    dropout_mask)


def _drop_sequence(result, return_sequences):
    last, outputs, states = result
    return last, (outputs if return_sequences else None), states


def _loop_reading_weights_once(cell, *args):
    """``_loop`` with the cell's weights read once before it (``cell.weights_read_once``)."""
    reading = getattr(cell, "weights_read_once", contextlib.nullcontext)
    with reading():
        return _loop(cell, *args)


def _loop(cell, inputs, initial_state, mask, dp_mask, rec_mask, go_backwards, unroll,
          return_sequences, zero_output_for_mask, bptt_truncate, probes, hoist_inputs):
    """The engine's own time loop (``tf.while_loop``, or Python when ``unroll``)."""
    sink = None
    if probes and STATES_SINK in probes:
        probes = dict(probes)
        sink = probes.pop(STATES_SINK)
    wanted, return_sequences = return_sequences, return_sequences or sink is not None
    batch = tf.shape(inputs)[0]
    xp, project, mask, probes = _time_major(cell, inputs, mask, probes, dp_mask, go_backwards,
                                            hoist_inputs)
    copies = copies_for(bptt_truncate, inputs.shape[1])
    step = step_function(cell, project, tile_batch(rec_mask, copies), copies, batch,
                         zero_output_for_mask, initial_state[0].shape, fix_shape=tf.ensure_shape)
    states = tile_batch(initial_state, copies)
    out0 = tf.zeros_like(initial_state[0])
    if unroll:
        output, outputs, states = _unrolled(step, xp, mask, probes, states, out0,
                                            return_sequences, inputs.shape)
    else:
        output, outputs, states = _while(step, xp, mask, probes, states, out0, return_sequences)
        if output is None:  # not carried: the top copy of the hidden state
            output = states[0][-batch:] if copies > 1 else states[0]
    if sink is not None:  # in input time order, like the probes
        sink.append(tf.reverse(outputs, [1]) if go_backwards else outputs)
    return output, (outputs if wanted else None), untile(states, copies, batch)


def _time_major(cell, inputs, mask, probes, dp_mask, go_backwards, hoist_inputs):
    """``(xp, project, mask, probes)`` in processing order, time-major: ``xp`` is ``x W + b``
    ``[T, B, P]`` where hoisted (``project`` None), else ``x`` ``[T, B, D]`` and ``project``
    computes each step's ``x_t W + b``."""
    # Transposing x (D wide) rather than x W (gates x units wide) to time-major moves the least
    # memory. Hoisted, x W + b for all t is one matmul; otherwise each step projects its x_t.
    xp = tf.transpose(inputs, [1, 0, 2])  # [T, B, D]
    if hoist_inputs:
        xp = cell.project_inputs(xp, dp_mask)  # [T, B, P]
        project = None
    else:
        project = functools.partial(cell.project_inputs, dropout_mask=dp_mask)
    mask, probes = _time_major_extras(mask, probes, go_backwards)
    return tf.reverse(xp, [0]) if go_backwards else xp, project, mask, probes


def _time_major_extras(mask, probes, go_backwards):
    """``(mask [T, B], probes)`` time-major, in processing order."""
    if mask is not None:
        mask = tf.transpose(tf.cast(mask, tf.bool), [1, 0])  # [T, B]
    if probes:  # states [B, T, S] to time-major; the kernel probe [T, H, P] already is
        probes = {i: p if i == KERNEL_PROBE else tf.transpose(p, [1, 0, 2])
                  for i, p in probes.items()}
    if go_backwards:
        mask = None if mask is None else tf.reverse(mask, [0])
        probes = {i: tf.reverse(p, [0]) for i, p in (probes or {}).items()}
    return mask, probes


def _unrolled(step, xp, mask, probes, states, out0, return_sequences, input_shape):
    """The steps as a Python loop (``unroll=True``; needs a static T)."""
    steps_static = check_unroll(input_shape)
    output, outputs = out0, []
    for t in range(steps_static):
        mask_t = None if mask is None else mask[t]
        probe_t = {i: p[t] for i, p in (probes or {}).items()}
        output, states = step(xp[t], mask_t, probe_t, states, output)
        outputs.append(output)
    stacked = tf.stack(outputs, axis=1) if return_sequences else None
    return output, stacked, states


def _while(step, xp, mask, probes, states, out0, return_sequences):
    """The steps as a ``tf.while_loop``; the output is ``None`` where it is not carried (no
    mask: it is the hidden state)."""
    n_steps = tf.shape(xp)[0]
    xp_ta = tf.TensorArray(xp.dtype, size=n_steps, element_shape=xp.shape[1:]).unstack(xp)
    mask_ta = None
    if mask is not None:
        mask_ta = tf.TensorArray(tf.bool, size=n_steps, element_shape=mask.shape[1:]).unstack(mask)
    probe_tas = {
        i: tf.TensorArray(p.dtype, size=n_steps, element_shape=p.shape[1:]).unstack(p)
        for i, p in (probes or {}).items()
    }
    # Loop variables beyond t and the states cost control-flow ops at every step (and gradient
    # accumulators), so there are only those the call needs: the output list with
    # return_sequences, and the output itself only with a mask (otherwise it is the hidden state).
    out_tas = ([tf.TensorArray(out0.dtype, size=n_steps, element_shape=out0.shape)]
               if return_sequences else [])
    carry_output = mask is not None

    def body(t, *carry):
        carry = list(carry)
        out_ta = carry.pop(0) if return_sequences else None
        output = carry.pop() if carry_output else None
        mask_t = None if mask_ta is None else mask_ta.read(t)
        probe_t = {i: ta.read(t) for i, ta in probe_tas.items()}
        output, new_states = step(xp_ta.read(t), mask_t, probe_t, carry, output)
        out_tas = [out_ta.write(t, output)] if return_sequences else []
        return (t + 1, *out_tas, *new_states, *([output] if carry_output else []))

    loop = tf.while_loop(
        lambda t, *_: t < n_steps,
        body,
        (tf.constant(0), *out_tas, *states, *([out0] if carry_output else [])),
        maximum_iterations=n_steps,
        parallel_iterations=32,
        swap_memory=True,
    )
    carry = list(loop[1:])
    out_ta = carry.pop(0) if return_sequences else None
    output = carry.pop() if carry_output else None
    outputs = tf.transpose(out_ta.stack(), [1, 0, 2]) if return_sequences else None
    return output, outputs, carry


__all__ = ["run"]
