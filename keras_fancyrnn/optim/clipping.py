"""Pure gradient-clipping functions, after optax: each takes a list of gradient tensors and
returns ``(clipped_gradients, fired)``, ``fired`` a scalar bool saying whether any entry changed.

Exploding gradients (Pascanu, Mikolov & Bengio 2013) are fixed by clipping: "if the norm of the
gradient is greater than some threshold, scale it down before applying the SGD update".

- :func:`clip_by_global_norm`: one norm over all gradients (Pascanu et al. 2013);
- :func:`clip_by_norm`: each gradient by its own norm;
- :func:`clip_by_value`: element-wise;
- :func:`adaptive_clip`: unit-wise adaptive gradient clipping (AGC, Brock et al. 2021);
- :func:`autoclip_threshold`: the AutoClip threshold (Seetharaman et al. 2020), a percentile of
  the history of gradient norms kept in a ring buffer, for :func:`clip_by_global_norm`;
- :func:`global_norm` and :func:`all_finite`, the measurements the clipping decides on.

They are written with ``keras.ops``; ``None`` gradients pass through untouched, and gradients that
are not clipped come back bit-identical. Norms are computed in float32 (float64 for float64
gradients) as ``m * sqrt(sum((g / m) ** 2))`` with ``m = max |g|``, so that a large but finite
gradient (the exploding case) has a finite norm instead of overflowing to ``inf``.

:class:`~keras_fancyrnn.ClippingOptimizer` (``optim/optimizer.py``) applies them in ``fit``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

__all__ = [
    "DEFAULT_EPS",
    "adaptive_clip",
    "all_finite",
    "autoclip_threshold",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
]

DEFAULT_EPS = 1e-3  # AGC's epsilon, Brock et al. 2021


def _norm_dtype(tensors: Sequence[Any]) -> str:
    dtypes = {keras.backend.standardize_dtype(t.dtype) for t in tensors}
    return "float64" if "float64" in dtypes else "float32"


def _is_empty(t: Any) -> bool:
    shape = tuple(t.shape)
    return all(d is not None for d in shape) and math.prod(shape) == 0


def _finish_norm(m: Any, sum_sq: Any) -> Any:
    # m * sqrt(sum (x/m)^2) for finite m; +inf if an entry is infinite (not inf/inf = nan); nan if
    # the max is nan or -inf (XLA's max skips nans, so an all-nan tensor has max -inf).
    nonfinite = ops.where(m > 0, m, ops.full_like(m, float("nan")))
    return ops.where(ops.isfinite(m), m * ops.sqrt(sum_sq), nonfinite)


def _unit_norm(x: Any, axis: Any = None) -> Any:
    """Overflow-safe ``||x||_2`` over ``axis`` (all axes if None), keeping reduced dimensions."""
    m = ops.max(ops.abs(x), axis=axis, keepdims=True)
    safe_m = ops.where(m > 0, m, ops.ones_like(m))
    return _finish_norm(m, ops.sum(ops.square(x / safe_m), axis=axis, keepdims=True))


def global_norm(grads: Sequence[Any]) -> Any:
    r"""Global L2 norm of a list of tensors, :math:`\sqrt{\sum_k \lVert g_k \rVert_2^2}`.

    ``None`` entries are ignored; an empty list has norm 0. The result is float32 (float64 if any
    tensor is float64) and does not overflow for large finite inputs.
    """
    tensors = [ops.convert_to_tensor(g) for g in grads if g is not None]
    tensors = [t for t in tensors if not _is_empty(t)]
    if not tensors:
        return ops.zeros((), dtype="float32")
    dtype = _norm_dtype(tensors)
    tensors = [ops.cast(t, dtype) for t in tensors]
    m = ops.max(ops.stack([ops.max(ops.abs(t)) for t in tensors]))
    safe_m = ops.where(m > 0, m, ops.ones_like(m))
    sum_sq = ops.sum(ops.stack([ops.sum(ops.square(t / safe_m)) for t in tensors]))
    return _finish_norm(m, sum_sq)


def _any(flags: Sequence[Any]) -> Any:
    if not flags:
        return ops.convert_to_tensor(False)
    return ops.any(ops.stack([ops.convert_to_tensor(f) for f in flags]))


def _scale(g: Any, factor: Any) -> Any:
    return g * ops.cast(factor, g.dtype)


def all_finite(grads: Sequence[Any]) -> Any:
    """A scalar bool: no entry of any gradient is ``nan`` or ``inf`` (``None`` entries ignored)."""
    return ops.logical_not(
        _any([ops.logical_not(ops.all(ops.isfinite(g))) for g in grads if g is not None])
    )


def clip_by_global_norm(
    grads: Sequence[Any], threshold: Any, norm: Any | None = None
) -> tuple[list[Any], Any]:
    r"""Clip a list of gradients by their global norm (Pascanu, Mikolov & Bengio 2013).

    .. math::
        n = \sqrt{\textstyle\sum_k \lVert g_k \rVert_2^2}, \qquad
        g_k \leftarrow \begin{cases} g_k \, \tau / n & n > \tau \\ g_k & \text{otherwise}\end{cases}

    Unlike ``g * tau / max(n, tau)``, gradients under the threshold are returned bit-identical.

    Args:
        grads: list of gradient tensors (``None`` passes through).
        threshold: :math:`\tau > 0` (a Python number or a scalar tensor).
        norm: the global norm of ``grads`` if already computed.

    Returns:
        ``(clipped_grads, fired)``: the clipped list and a scalar bool, ``n > tau``.
    """
    n = global_norm(grads) if norm is None else norm
    threshold = ops.cast(threshold, n.dtype)
    fired = n > threshold
    safe_n = ops.where(fired, n, ops.ones_like(n))
    factor = ops.where(fired, threshold / safe_n, ops.ones_like(n))
    return [None if g is None else _scale(g, factor) for g in grads], fired


def clip_by_norm(grads: Sequence[Any], threshold: float) -> tuple[list[Any], Any]:
    r"""Clip each gradient tensor by its own L2 norm.

    .. math::
        g_k \leftarrow \begin{cases} g_k \, \tau / \lVert g_k \rVert_2 & \lVert g_k \rVert_2 > \tau
        \\ g_k & \text{otherwise}\end{cases}

    Returns:
        ``(clipped_grads, fired)``, ``fired`` true when any tensor was rescaled.
    """
    out, flags = [], []
    for g in grads:
        if g is None or _is_empty(g):
            out.append(g)
            continue
        n = ops.reshape(_unit_norm(ops.cast(g, _norm_dtype([g]))), ())
        fired = n > ops.cast(threshold, n.dtype)
        factor = ops.where(fired, threshold / ops.where(fired, n, ops.ones_like(n)), 1.0)
        out.append(_scale(g, factor))
        flags.append(fired)
    return out, _any(flags)


def clip_by_value(grads: Sequence[Any], threshold: float) -> tuple[list[Any], Any]:
    r"""Clip every gradient entry to :math:`[-\tau, \tau]`: :math:`g \leftarrow \min(\max(g, -\tau),
    \tau)`.

    Returns:
        ``(clipped_grads, fired)``, ``fired`` true when any entry had :math:`|g| > \tau`.
    """
    out, flags = [], []
    for g in grads:
        if g is None or _is_empty(g):
            out.append(g)
            continue
        t = ops.cast(threshold, g.dtype)
        out.append(ops.clip(g, -t, t))
        flags.append(ops.any(ops.abs(g) > t))
    return out, _any(flags)


def _unit_axes(ndim: int) -> tuple[int, ...] | None:
    """Axes reduced for the unit-wise norm: all but the last (output) axis; none for ndim <= 1."""
    return None if ndim <= 1 else tuple(range(ndim - 1))


def adaptive_clip(
    grads: Sequence[Any], params: Sequence[Any], threshold: float, eps: float = DEFAULT_EPS
) -> tuple[list[Any], Any]:
    r"""Unit-wise adaptive gradient clipping, AGC (Brock, De, Smith & Simonyan 2021, NFNets).

    For every output unit :math:`i` of a weight :math:`W` with gradient :math:`G` — in the Keras
    layout ``(..., in, out)`` a unit is one slice along the last axis (a column of a dense or
    recurrent kernel, one output filter of a convolution); for biases and other tensors of rank
    :math:`\le 1` each element is a unit —

    .. math::
        \text{if } \frac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda:
        \qquad G_i \leftarrow \lambda \, \max(\lVert W_i \rVert, \epsilon)
        \frac{G_i}{\lVert G_i \rVert}

    with Frobenius norms over the unit, :math:`\lambda` = ``threshold``, :math:`\epsilon` = ``eps``
    (1e-3 in the paper; it stops zero-initialised weights, e.g. biases, from freezing).

    Args:
        grads: gradients, ``None`` passes through.
        params: the current values of the variables, aligned with ``grads``.
        threshold: :math:`\lambda > 0`, the largest allowed ratio of gradient to weight norm.
        eps: :math:`\epsilon > 0`.

    Returns:
        ``(clipped_grads, fired)``, ``fired`` true when any unit was rescaled.
    """
    if len(grads) != len(params):
        raise ValueError(
            f"adaptive_clip needs one parameter per gradient, got {len(grads)} gradients and "
            f"{len(params)} parameters"
        )
    out, flags = [], []
    for g, w in zip(grads, params, strict=True):
        if g is None or _is_empty(g):
            out.append(g)
            continue
        w = ops.convert_to_tensor(w)
        dtype = _norm_dtype([g, w])
        axes = _unit_axes(len(g.shape))
        if axes is None:
            g_norm = ops.abs(ops.cast(g, dtype))
            w_norm = ops.abs(ops.cast(w, dtype))
        else:
            g_norm = _unit_norm(ops.cast(g, dtype), axis=axes)
            w_norm = _unit_norm(ops.cast(w, dtype), axis=axes)
        max_norm = ops.cast(threshold, dtype) * ops.maximum(w_norm, ops.cast(eps, dtype))
        fired = g_norm > max_norm
        factor = ops.where(fired, max_norm / ops.where(fired, g_norm, ops.ones_like(g_norm)), 1.0)
        out.append(_scale(g, factor))
        flags.append(ops.any(fired))
    return out, _any(flags)


def autoclip_threshold(
    history: Any, count: Any, norm: Any, percentile: float
) -> tuple[Any, Any, Any]:
    r"""AutoClip's threshold (Seetharaman, Wichern, Pardo & Le Roux 2020), with a bounded history.

    The current global norm :math:`n_t` is written into a ring buffer of the last :math:`H` norms
    (``history``, shape ``(H,)``; slot ``count mod H``), and the threshold is the ``percentile``-th
    percentile of the :math:`\min(t, H)` stored norms, *including* :math:`n_t` as in the paper:

    .. math::
        \eta_t = \operatorname{percentile}_p\bigl(\{n_{t-H+1}, \dots, n_t\}\bigr)

    with linear interpolation between order statistics (numpy's default). Clipping the gradient
    by its global norm at :math:`\eta_t` (:func:`clip_by_global_norm`) completes AutoClip; at the
    first step :math:`\eta_1 = n_1`, so the first step is never clipped. The paper keeps all norms;
    the ring buffer bounds memory and lets the threshold follow the recent distribution.

    Args:
        history: float tensor ``(H,)``; only its first ``min(count, H)`` entries are used.
        count: number of norms already pushed (an integer scalar).
        norm: the current global gradient norm (must be finite).
        percentile: :math:`p \in (0, 100]`.

    Returns:
        ``(threshold, new_history, new_count)``.
    """
    history = ops.convert_to_tensor(history)
    size = history.shape[0]
    count = ops.convert_to_tensor(count)
    slots = ops.arange(size, dtype=count.dtype)
    new_history = ops.where(ops.equal(slots, count % size), ops.cast(norm, history.dtype), history)
    new_count = count + 1
    valid = ops.minimum(new_count, size)
    ordered = ops.sort(ops.where(slots < valid, new_history, float("inf")))
    pos = ops.cast(percentile / 100.0, history.dtype) * ops.cast(valid - 1, history.dtype)
    lo = ops.floor(pos)
    frac = pos - lo
    lo = ops.cast(lo, "int32")
    hi = ops.minimum(lo + 1, ops.cast(valid - 1, "int32"))
    a, b = ops.take(ordered, lo), ops.take(ordered, hi)
    return a + (b - a) * frac, new_history, new_count


def __getattr__(name: str) -> Any:
    # The optimizer and its callback lived here before the split; ``keras_fancyrnn.optim`` is
    # their home now. Imported lazily: optimizer.py imports this module.
    if name in ("METHODS", "ClippingOptimizer", "ClippingStats"):
        from keras_fancyrnn import optim

        return getattr(optim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
