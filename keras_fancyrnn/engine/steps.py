"""What the engine's two loops share, written with ``keras.ops`` so that it runs on every backend:
one step of a cell with the truncation copies, the probes and the mask around it, the dropout
masks of a call, and the argument checks.

The loops are ``engine/loop.py`` (TensorFlow: ``tf.while_loop`` and the C++ kernels) and
``engine/scan.py`` (JAX and PyTorch: ``keras.ops.scan``).
"""

from __future__ import annotations

import contextlib

from keras import ops

KERNEL_PROBE = "recurrent_kernel"
STATES_SINK = "states_out"  # a list the engine appends its outputs [B, T, H] to


def as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def tile_batch(x, copies: int):
    """Stacks ``copies`` copies of ``x`` along axis 0 (the batch axis)."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [tile_batch(e, copies) for e in x]
    return ops.concatenate([x] * copies, axis=0) if copies > 1 else x


def where_rows(mask_t, new, old):
    """``new`` where ``mask_t`` ([B] bool) is true, else ``old``."""
    return ops.where(ops.expand_dims(mask_t, -1), new, old)


def dropout_masks(cell, x0, h0, training: bool):
    """This call's variational dropout masks (constant over time, as Keras)."""
    dp_mask = rec_mask = None
    if training and 0.0 < getattr(cell, "dropout", 0.0) < 1.0:
        dp_mask = cell.get_dropout_mask(x0)
    if training and 0.0 < getattr(cell, "recurrent_dropout", 0.0) < 1.0:
        rec_mask = cell.get_recurrent_dropout_mask(h0)
    if hasattr(cell, "reset_dropout_mask"):
        cell.reset_dropout_mask()
        cell.reset_recurrent_dropout_mask()
    return dp_mask, rec_mask


def copies_for(bptt_truncate, steps_static) -> int:
    """State copies the truncation needs: 1 where it cuts nothing (``k >= T - 1``)."""
    if bptt_truncate is not None and (steps_static is None or bptt_truncate < steps_static - 1):
        return bptt_truncate + 1
    return 1


def untile(states, copies: int, batch):
    """The top copy of each state (the one whose values and gradients are the layer's)."""
    return [s[-batch:] for s in states] if copies > 1 else list(states)


@contextlib.contextmanager
def kernel_offset(cell, offset):
    """Inside, ``cell.recurrent_kernel`` is ``U + offset`` (a step's kernel probe ``E_t``), so
    that what the step computes from ``U`` depends on ``E_t`` too; restored on exit. Holds the
    cell's lock like ``weights_read_once``."""
    if offset is None:
        yield
        return
    with getattr(cell, "_weights_lock", None) or contextlib.nullcontext():
        kernel = cell.recurrent_kernel
        object.__setattr__(cell, "recurrent_kernel", kernel + ops.cast(offset, kernel.dtype))
        try:
            yield
        finally:
            object.__setattr__(cell, "recurrent_kernel", kernel)


def step_function(cell, project, rec_mask, copies, batch, zero_output_for_mask, state_shape=None,
                  fix_shape=lambda x, shape: x):
    """``step(xp_t, mask_t, probe_t, states, prev_output) -> (output, new_states)``: one step of
    the cell with the projection, the truncation copies, the probes and the mask around it.
    ``fix_shape(x, shape)`` restores a static shape that slicing by a dynamic batch loses (the
    TensorFlow loop needs it)."""

    def step(xp_t, mask_t, probe_t, states, prev_output):
        probe_t = dict(probe_t)
        kernel_t = probe_t.pop(KERNEL_PROBE, None)
        if project is not None:
            xp_t = project(xp_t)
        if copies > 1:  # copy j reads copy j-1 of the previous step; copy 0 is cut off
            states = [fix_shape(ops.concatenate([ops.stop_gradient(s[:batch]), s[:-batch]],
                                                axis=0), s.shape)
                      for s in states]
            xp_t = tile_batch(xp_t, copies)
            mask_t = tile_batch(mask_t, copies)
            probe_t = {i: tile_batch(p, copies) for i, p in probe_t.items()}
        # A cell with ``probes_in_step`` adds the probes of its inner states (LSTM: c_t) itself,
        # before they feed h_t; added after the step they would miss the path c_t -> h_t.
        inner = ({i: p for i, p in probe_t.items() if i > 0}
                 if probe_t and getattr(cell, "probes_in_step", False) else None)
        with kernel_offset(cell, kernel_t):
            if inner:
                output, new_states = cell.step(xp_t, states, rec_mask, probes=inner)
                probe_t = {i: p for i, p in probe_t.items() if i not in inner}
            else:
                output, new_states = cell.step(xp_t, states, rec_mask)
        new_states = as_list(new_states)
        if probe_t:
            new_states = [s + probe_t[i] if i in probe_t else s for i, s in enumerate(new_states)]
            output = new_states[0]
        if mask_t is not None:
            new_states = [where_rows(mask_t, n, s) for n, s in zip(new_states, states)]
            fallback = ops.zeros_like(output) if zero_output_for_mask else prev_output
            output = where_rows(mask_t, output, tile_batch(fallback, copies))
        if copies > 1:
            output = fix_shape(output[-batch:], state_shape)
        return output, new_states

    return step


def validate_bptt_truncate(bptt_truncate) -> int | None:
    """``None`` or a positive int, else a ValueError that says so."""
    if bptt_truncate is None:
        return None
    if isinstance(bptt_truncate, bool) or not isinstance(bptt_truncate, int) or bptt_truncate < 1:
        raise ValueError(
            f"bptt_truncate must be None (full BPTT) or a positive integer, got {bptt_truncate!r}"
        )
    return bptt_truncate


def check_unroll(input_shape) -> int:
    """The static number of timesteps ``unroll=True`` needs, else a ValueError."""
    steps_static = input_shape[1]
    if steps_static is None:
        raise ValueError(
            "unroll=True needs a static number of timesteps; the input has shape "
            f"{tuple(input_shape)}. Pass keras.Input(shape=(T, D)) with a fixed T."
        )
    return steps_static
