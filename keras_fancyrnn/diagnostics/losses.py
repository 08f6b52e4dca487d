"""Per-example losses ℓ_i under the model's compiled loss (or a given one).

``ℓ_i`` is the loss of a batch holding only example ``i``, sample weights and masks included:
a re-implementation of the reduction of ``keras.losses.Loss.__call__`` per example, summed over
the outputs with their loss weights as the compiled loss does.
"""

from __future__ import annotations

from keras import ops

# Keras 3 internals this module relies on, in one place: the compiled loss object and its flat
# list of (path, loss, weight, name) and build structures; the mask attribute of tensors.
_COMPILE_LOSS_ATTR = "_compile_loss"


def _get_mask(x):
    return getattr(x, "_keras_mask", None)


def _per_example_loss(loss_fn, y_true, y_pred, sample_weight):
    """``[B]`` losses: example ``i``'s value of ``loss_fn`` on a batch holding only example ``i``.

    Follows ``keras.losses.Loss.__call__``: the mask of ``y_pred`` (and of the values) and the
    sample weights weight the element losses; then the loss's reduction, per example.
    """
    from keras.src.losses.loss import squeeze_or_expand_to_same_rank

    in_mask = _get_mask(y_pred)
    dtype = loss_fn.dtype
    y_pred = ops.convert_to_tensor(y_pred, dtype=dtype)
    y_true = ops.convert_to_tensor(y_true, dtype=dtype)
    values = loss_fn.call(y_true, y_pred)
    out_mask = _get_mask(values)
    mask = in_mask if out_mask is None else (out_mask if in_mask is None else in_mask & out_mask)
    values = ops.convert_to_tensor(values, dtype=dtype)
    weights = None if sample_weight is None else ops.convert_to_tensor(sample_weight, dtype=dtype)
    if mask is not None:
        m = ops.cast(mask, dtype)
        if weights is not None:
            m, weights = squeeze_or_expand_to_same_rank(m, weights)
            weights = m * weights
        else:
            weights = m
    if weights is not None:
        values, weights = squeeze_or_expand_to_same_rank(values, weights)
        values = values * weights
    if len(values.shape) == 0:
        raise ValueError(
            f"the loss {loss_fn.name!r} returned a scalar from call(); the monitor needs "
            "per-example values (a Keras loss's call() returns them). Pass "
            "loss=fn(y_true, y_pred) -> [batch]."
        )
    axes = list(range(1, len(values.shape)))
    total = ops.sum(values, axis=axes) if axes else values
    reduction = loss_fn.reduction
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and weights is not None:
        w_axes = list(range(1, len(weights.shape)))
        denom = ops.sum(weights, axis=w_axes) if w_axes else weights
        return ops.divide_no_nan(total, denom)
    if mask is not None:  # Keras weights valid entries by total/valid: the mean over valid ones
        m = ops.cast(mask, dtype)
        m_axes = list(range(1, len(m.shape)))
        count = ops.sum(m, axis=m_axes) if m_axes else m
        return ops.divide_no_nan(total, count)
    count = 1
    for d in values.shape[1:]:
        count *= d
    return total / ops.cast(count, dtype)


def _compiled_per_example_losses(model, y_true, y_pred, sample_weight):
    """``[B]``: the sum over outputs of weighted per-example losses, as the compiled loss does."""
    from keras import tree

    compile_loss = getattr(model, _COMPILE_LOSS_ATTR, None)
    if tree.is_nested(y_pred) or tree.is_nested(y_true):
        try:
            tree.assert_same_structure(y_pred, y_true)
        except (ValueError, TypeError):
            if isinstance(y_pred, (list, tuple)) and isinstance(y_true, dict):
                y_true = [y_true[n] for n in model.output_names]
            y_true = tree.pack_sequence_as(y_pred, tree.flatten(y_true))
        for attr, value in (("_y_pred_build_structure", y_pred), ("_y_true_build_structure",
                                                                   y_true)):
            structure = getattr(compile_loss, attr, None)
            if structure is None:
                continue
            try:
                tree.assert_same_structure(structure, value)
            except (ValueError, TypeError):
                value = tree.pack_sequence_as(structure, tree.flatten(value))
            if attr == "_y_pred_build_structure":
                y_pred = value
            else:
                y_true = value
    total = None
    for path, loss_fn, weight, _ in compile_loss._flat_losses:
        y_t, y_p, sw = y_true, y_pred, sample_weight
        for p in path:
            y_t, y_p = y_t[p], y_p[p]
            if sw is not None and tree.is_nested(sw):
                sw = sw[p]
        value = ops.cast(_per_example_loss(loss_fn, y_t, y_p, sw), "float32")
        if weight is not None:
            value = value * weight
        total = value if total is None else total + value
    if total is None:
        raise ValueError("the model's compiled loss has no loss term for any output")
    return total
