"""The engine's loop on the JAX and PyTorch backends: the step of ``engine/steps.py`` under
``keras.ops.scan`` (``jax.lax.scan``, which XLA compiles into one loop; a Python loop of torch
ops on PyTorch), with everything the TensorFlow loop (``engine/loop.py``) does: masks, variational
dropout, direction, truncated BPTT, ``unroll``, and the monitor's probes, whose gradients each
backend's own differentiation computes.

``x W + b`` for all timesteps is one matmul before the loop where the plan says so (on PyTorch
and on GPUs); on a CPU under XLA each step projects its own inputs, which measured faster
(benchmarks/results/).
"""

from __future__ import annotations

import contextlib

from keras import ops, tree

from keras_fancyrnn.engine import steps


def run(cell, inputs, initial_state, *, mask=None, training=False, go_backwards=False,
        unroll=False, return_sequences=True, zero_output_for_mask=False, bptt_truncate=None,
        probes=None, hoist_inputs=True):
    """Runs ``cell`` over the time axis of ``inputs``; the arguments and the result are those of
    ``keras_fancyrnn.engine.run`` (``(last_output, outputs or None, final_states)``);
    ``hoist_inputs``: ``x W + b`` for all steps before the loop, else in each step."""
    initial_state = steps.as_list(initial_state)
    inputs = ops.convert_to_tensor(inputs)
    dp_mask, rec_mask = steps.dropout_masks(cell, inputs[:, 0], initial_state[0], training)
    with getattr(cell, "weights_read_once", contextlib.nullcontext)():
        return _scan(cell, inputs, initial_state, mask, dp_mask, rec_mask, go_backwards, unroll,
                     return_sequences, zero_output_for_mask, bptt_truncate, dict(probes or {}),
                     hoist_inputs)


def _time_major(cell, inputs, mask, probes, dp_mask, go_backwards, hoist_inputs):
    """``x W + b`` ``[T, B, P]`` (or the inputs ``[T, B, D]`` where the steps project them), the
    mask ``[T, B]`` and the probes, in processing order."""
    xp = ops.transpose(inputs, (1, 0, 2))
    if hoist_inputs:
        xp = cell.project_inputs(xp, dp_mask)
    if mask is not None:
        mask = ops.transpose(ops.cast(mask, "bool"), (1, 0))
    probes = {i: p if i == steps.KERNEL_PROBE else ops.transpose(p, (1, 0, 2))
              for i, p in probes.items()}
    if go_backwards:
        xp = ops.flip(xp, axis=0)
        mask = None if mask is None else ops.flip(mask, axis=0)
        probes = {i: ops.flip(p, axis=0) for i, p in probes.items()}
    return xp, mask, probes


def _scan(cell, inputs, initial_state, mask, dp_mask, rec_mask, go_backwards, unroll,
          return_sequences, zero_output_for_mask, bptt_truncate, probes, hoist_inputs):
    sink = probes.pop(steps.STATES_SINK, None)
    batch = inputs.shape[0] if inputs.shape[0] is not None else ops.shape(inputs)[0]
    xp, mask, probes = _time_major(cell, inputs, mask, probes, dp_mask, go_backwards,
                                   hoist_inputs)
    copies = steps.copies_for(bptt_truncate, inputs.shape[1])
    project = None if hoist_inputs else (lambda x_t: cell.project_inputs(x_t, dp_mask))
    step = steps.step_function(cell, project, steps.tile_batch(rec_mask, copies), copies, batch,
                         zero_output_for_mask)
    keys = list(probes)  # a list, not the dict: its keys mix ints and strings, which trees sort
    xs = {"xp": xp, "probes": [probes[k] for k in keys]}
    if mask is not None:
        xs["mask"] = mask

    def body(carry, x_t):
        states, previous = carry
        output, new_states = step(x_t["xp"], x_t.get("mask"), dict(zip(keys, x_t["probes"])),
                                  states, previous)
        return (new_states, output), output

    carry = (steps.tile_batch(initial_state, copies), ops.zeros_like(initial_state[0]))
    if unroll:
        outputs = []
        for t in range(steps.check_unroll(inputs.shape)):
            carry, output = body(carry, tree.map_structure(lambda a, t=t: a[t], xs))
            outputs.append(output)
        outputs = ops.stack(outputs, axis=0)
    else:
        carry, outputs = ops.scan(body, carry, xs)
    states, last = carry
    outputs = ops.transpose(outputs, (1, 0, 2))  # [B, T, H], in processing order
    if sink is not None:  # in input time order, like the probes
        sink.append(ops.flip(outputs, axis=1) if go_backwards else outputs)
    return last, (outputs if return_sequences else None), steps.untile(states, copies, batch)


__all__ = ["run"]
