"""Gradient clipping for recurrent networks: pure clip functions and a Keras optimizer wrapper.

Long (over 400 lines): the clip functions, their validators and defaults, ``ClippingOptimizer`` and
``ClippingStats`` all serve the one ``METHODS`` table; the pure functions are the part that can
leave for a module of their own.

Exploding gradients (Pascanu, Mikolov & Bengio 2013) are fixed by clipping: "if the norm of the
gradient is greater than some threshold, scale it down before applying the SGD update". This module
follows optax's layout:

* small pure functions, written with ``keras.ops``, that take a list of gradient tensors and return
  ``(clipped_gradients, fired)``, where ``fired`` is a scalar boolean saying whether any entry was
  changed (``None`` gradients pass through untouched):

  - :func:`clip_by_global_norm` — one norm over all gradients (Pascanu et al. 2013),
  - :func:`clip_by_norm` — each gradient by its own norm,
  - :func:`clip_by_value` — element-wise,
  - :func:`adaptive_clip` — unit-wise adaptive gradient clipping (AGC, Brock et al. 2021),
  - :func:`autoclip_threshold` — the AutoClip threshold (Seetharaman et al. 2020), a percentile
    of the history of gradient norms kept in a ring buffer, for :func:`clip_by_global_norm`;

* :class:`ClippingOptimizer`, a thin ``keras.optimizers.Optimizer`` around them that wraps any
  Keras optimizer (as ``keras.optimizers.LossScaleOptimizer`` does), skips steps whose gradient is
  not finite, keeps statistics as optimizer variables, and under ``tf.distribute`` clips the
  gradient summed over replicas;

* :class:`ClippingStats`, a callback that puts those statistics into ``model.fit``'s logs, so they
  appear in the progress bar and in ``History``.

Norms are computed in float32 (float64 for float64 gradients) as ``m * sqrt(sum((g / m) ** 2))``
with ``m = max |g|``, so that a large but finite gradient — the exploding case this module exists
for — has a finite norm instead of overflowing to ``inf``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

__all__ = [
    "METHODS",
    "ClippingOptimizer",
    "ClippingStats",
    "adaptive_clip",
    "autoclip_threshold",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
]

#: The clipping methods of :class:`ClippingOptimizer`.
METHODS = ("global_norm", "norm", "value", "adaptive", "auto")

# threshold when the user passes none: 1.0 for the absolute methods, lambda = 0.01 for AGC
# (Brock et al. 2021 use 0.01 at their largest batch sizes).
_DEFAULT_THRESHOLD = {"global_norm": 1.0, "norm": 1.0, "value": 1.0, "adaptive": 0.01}
DEFAULT_PERCENTILE = 10.0  # Seetharaman et al. 2020 recommend p = 10
DEFAULT_HISTORY_SIZE = 1000
DEFAULT_EPS = 1e-3  # Brock et al. 2021


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Keras optimizer wrapper
# --------------------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _select(items: Sequence[Any], mask: Sequence[bool]) -> list[Any]:
    return [x for x, m in zip(items, mask, strict=True) if m]


def _replace(items: Sequence[Any], mask: Sequence[bool], new: Sequence[Any]) -> list[Any]:
    """``items`` with the entries selected by ``mask`` replaced, in order, by ``new``."""
    new = iter(new)
    return [next(new) if m else x for x, m in zip(items, mask, strict=True)]


def _in_xla_context() -> bool:
    try:  # private TF helper; only used to decide whether to warn
        from tensorflow.python.ops import control_flow_util

        from keras_fancyrnn._tf import tf

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # pragma: no cover
        return False


_BASE_ARGS = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "gradient_accumulation_steps",
)

# -- ClippingOptimizer's argument checks (each raises a ValueError that names the argument) ----


def _check_no_base_args(kwargs: dict) -> None:
    """The base optimizer's clipping arguments belong to the inner optimizer; nothing else."""
    for arg in _BASE_ARGS:
        if arg in kwargs:
            raise ValueError(
                f"ClippingOptimizer does not take `{arg}`: choose the clipping with `method` "
                f"and `threshold`, and set `{arg}` on the inner optimizer, got {arg}="
                f"{kwargs[arg]!r}"
            )
    if kwargs:
        raise ValueError(f"ClippingOptimizer got unknown arguments: {sorted(kwargs)}")


def _checked_inner(inner_optimizer):
    """The inner optimizer (from a name or config too), which must not clip or scale itself."""
    if isinstance(inner_optimizer, (str, dict)):
        inner_optimizer = keras.optimizers.get(inner_optimizer)
    if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "inner_optimizer must be a keras.optimizers.Optimizer instance, got "
            f"{inner_optimizer!r}"
        )
    if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "inner_optimizer must not be a LossScaleOptimizer, which would make this wrapper "
            "clip the scaled gradient: wrap the other way round, "
            "LossScaleOptimizer(ClippingOptimizer(...)) (model.compile does so under the "
            "'mixed_float16' policy)"
        )
    for arg in ("clipnorm", "clipvalue", "global_clipnorm"):
        if getattr(inner_optimizer, arg, None) is not None:
            raise ValueError(
                f"inner_optimizer must not clip, got {arg}={getattr(inner_optimizer, arg)}: "
                "choose the clipping with ClippingOptimizer's `method` and `threshold`"
            )
    if getattr(inner_optimizer, "loss_scale_factor", None) is not None:
        raise ValueError(
            "inner_optimizer must not have a loss_scale_factor (the gradient must be unscaled "
            "before it is clipped): pass loss_scale_factor to ClippingOptimizer, got "
            f"{inner_optimizer.loss_scale_factor}"
        )
    return inner_optimizer


def _checked_method_args(method, threshold, percentile, history_size, eps) -> tuple:
    """``(threshold, percentile, history_size, eps)`` with the method's defaults, each given
    only to the method it applies to."""
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}"
        )
    if method == "auto":
        if threshold is not None:
            raise ValueError(
                "threshold does not apply to method='auto' (AutoClip takes its threshold from "
                f"the percentile of past gradient norms), got threshold={threshold!r}"
            )
        percentile = DEFAULT_PERCENTILE if percentile is None else percentile
        ok = isinstance(percentile, numbers.Real) and not isinstance(percentile, bool)
        if not ok or not 0 < percentile <= 100:
            raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
        percentile = float(percentile)
        history_size = DEFAULT_HISTORY_SIZE if history_size is None else history_size
        history_size = _check_positive_int("history_size", history_size)
    else:
        threshold = _DEFAULT_THRESHOLD[method] if threshold is None else threshold
        threshold = _check_positive("threshold", threshold)
        for arg, value in (("percentile", percentile), ("history_size", history_size)):
            if value is not None:
                raise ValueError(
                    f"{arg} applies only to method='auto', got {arg}={value!r} with "
                    f"method={method!r}"
                )
    if method == "adaptive":
        eps = _check_positive("eps", DEFAULT_EPS if eps is None else eps)
    elif eps is not None:
        raise ValueError(
            f"eps applies only to method='adaptive', got eps={eps!r} with method={method!r}"
        )
    return threshold, percentile, history_size, eps


def _checked_skips(skip_nonfinite, max_consecutive_skips):
    """``max_consecutive_skips`` (a positive int or ``None``), which needs ``skip_nonfinite``."""
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
    if max_consecutive_skips is not None:
        max_consecutive_skips = _check_positive_int(
            "max_consecutive_skips", max_consecutive_skips
        )
        if not skip_nonfinite:
            raise ValueError(
                "max_consecutive_skips needs skip_nonfinite=True (no step is skipped "
                f"otherwise), got max_consecutive_skips={max_consecutive_skips}"
            )
    return max_consecutive_skips



@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class ClippingOptimizer(keras.optimizers.Optimizer):
    r"""Wrap a Keras optimizer: clip the gradient, skip non-finite steps, and report what happened.

    Each step, with :math:`g` the gradient (summed over replicas under ``tf.distribute``, and
    divided by ``loss_scale_factor`` if one is set):

    1. if ``skip_nonfinite`` and any entry of :math:`g` is ``nan``/``inf``: the step is skipped —
       no variable of the model or of the inner optimizer changes, ``iterations`` does not
       advance — and counted in ``skipped_steps``;
    2. otherwise :math:`g` is clipped by ``method`` and handed to ``inner_optimizer``:

       * ``"global_norm"`` — :func:`clip_by_global_norm`, :math:`g \leftarrow g\,\tau/\lVert g
         \rVert` if :math:`\lVert g \rVert > \tau` (Pascanu et al. 2013); default :math:`\tau = 1`;
       * ``"norm"`` — :func:`clip_by_norm`, every variable's gradient by its own norm;
       * ``"value"`` — :func:`clip_by_value`, every entry to :math:`[-\tau, \tau]`;
       * ``"adaptive"`` — :func:`adaptive_clip`, unit-wise AGC (Brock et al. 2021) with
         :math:`\lambda` = ``threshold`` (default 0.01) and ``eps`` (default 1e-3);
       * ``"auto"`` — AutoClip (Seetharaman et al. 2020): global-norm clipping at the
         ``percentile``-th percentile (default 10) of the last ``history_size`` (default 1000)
         gradient norms, current one included (:func:`autoclip_threshold`); no ``threshold``.

    Statistics, kept as non-trainable optimizer variables (saved with the model, readable at any
    time through :meth:`stats` or the properties of the same names):

    ``grad_norm``
        global norm of the last step's gradient before clipping (``inf``/``nan`` if it was skipped);
    ``clipped_grad_norm``
        global norm of the gradient handed to the inner optimizer (0 for a skipped step);
    ``applied_steps``, ``clipped_steps``, ``skipped_steps``
        steps applied, applied steps where clipping changed the gradient, steps skipped;
    ``clip_rate``
        ``clipped_steps / applied_steps``, the fraction of applied steps that were clipped;
    ``consecutive_skips``
        length of the current run of skipped steps;
    ``norm_history``
        (``"auto"`` only) the ring buffer of gradient norms.

    ``max_consecutive_skips``: on the N-th skipped step in a row the optimizer raises, and from then
    on it refuses every step (the weights stay those of the last finite step) until
    ``optimizer.consecutive_skips.assign(0)``. The error comes from two places, because XLA compiles
    assertions away: without XLA an in-graph ``tf.debugging.Assert`` stops ``fit`` at that step
    (``tf.errors.InvalidArgumentError``); under ``jit_compile=True`` the :class:`ClippingStats`
    callback raises ``RuntimeError`` after the batch (it also does so without XLA, after the
    assertion would have fired). Use the callback when compiling with XLA; the optimizer warns
    when it is traced under XLA with a limit set and no callback watching.

    Distribution: Keras clips each replica's gradient before the sum (two replicas with gradients 10
    and 20, ``global_clipnorm=1``, lr 1 move a variable by 2). This wrapper all-reduces the gradient
    first, clips the sum (so the move is 1) and skips a step if any replica's gradient is not
    finite. The inner optimizer sums across replicas again; replica 0 hands it the clipped sum and
    the others zeros, so that second sum is exactly the clipped gradient. It costs one extra
    all-reduce of the gradient.

    Mixed precision: ``model.compile`` wraps the optimizer as
    ``LossScaleOptimizer(ClippingOptimizer(...))`` under the ``"mixed_float16"`` policy, which
    unscales the gradient before it reaches this wrapper: the unscaled gradient is clipped and the
    loss scale is unaffected. Wrapping a ``LossScaleOptimizer`` inside this one is refused (it would
    clip the scaled gradient).

    ``IndexedSlices`` gradients (e.g. from an embedding) are converted to dense tensors. Tested with
    the TensorFlow backend (the package's); the TF-specific parts are the distribution path and the
    in-graph assertion. ``stateless_apply`` (the JAX trainer) is not supported.

    Args:
        inner_optimizer: the ``keras.optimizers.Optimizer`` to wrap (or a name/config accepted by
            ``keras.optimizers.get``). It must not clip itself nor set ``loss_scale_factor``.
        method: one of :data:`METHODS`.
        threshold: :math:`\tau` (or AGC's :math:`\lambda`); ``None`` takes the method's default.
            Not accepted by ``"auto"``.
        skip_nonfinite: skip steps with a non-finite gradient. If False they are clipped and
            applied as Keras does (a nan norm never exceeds the threshold, so a nan gradient
            reaches the inner optimizer unclipped).
        max_consecutive_skips: raise after this many skipped steps in a row (needs
            ``skip_nonfinite``); ``None`` never raises.
        percentile: AutoClip's :math:`p \in (0, 100]`; only with ``"auto"``.
        history_size: AutoClip's ring buffer length; only with ``"auto"``.
        eps: AGC's :math:`\epsilon`; only with ``"adaptive"``.
        loss_scale_factor: static loss scale (see ``keras.optimizers.Optimizer``); the gradient is
            unscaled before it is clipped.
        name: optimizer name.
    """

    def __init__(
        self,
        inner_optimizer: Any,
        method: str = "global_norm",
        threshold: float | None = None,
        skip_nonfinite: bool = True,
        max_consecutive_skips: int | None = None,
        percentile: float | None = None,
        history_size: int | None = None,
        eps: float | None = None,
        loss_scale_factor: float | None = None,
        name: str | None = None,
        **kwargs: Any,
    ):
        _check_no_base_args(kwargs)
        inner_optimizer = _checked_inner(inner_optimizer)
        threshold, percentile, history_size, eps = _checked_method_args(
            method, threshold, percentile, history_size, eps)
        max_consecutive_skips = _checked_skips(skip_nonfinite, max_consecutive_skips)
        if loss_scale_factor is not None:
            loss_scale_factor = _check_positive("loss_scale_factor", loss_scale_factor)

        super().__init__(learning_rate=0.0, loss_scale_factor=loss_scale_factor, name=name)
        self.inner_optimizer = inner_optimizer
        self.method = method
        self.threshold = threshold
        self.skip_nonfinite = skip_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.percentile = percentile
        self.history_size = history_size
        self.eps = eps
        # set by ClippingStats while it watches this optimizer (silences the XLA warning)
        self._skip_limit_watched = False
        self._xla_warned = False

    # -- state ------------------------------------------------------------------------------------

    def build(self, var_list: Sequence[Any]) -> None:
        def scalar(name: str, dtype: str) -> Any:
            return self.add_variable(
                (), initializer="zeros", dtype=dtype, aggregation="only_first_replica", name=name
            )

        self._grad_norm = scalar("grad_norm", "float32")
        self._clipped_grad_norm = scalar("clipped_grad_norm", "float32")
        self._clip_rate = scalar("clip_rate", "float32")
        self._applied_steps = scalar("applied_steps", "int")
        self._clipped_steps = scalar("clipped_steps", "int")
        self._skipped_steps = scalar("skipped_steps", "int")
        self._consecutive_skips = scalar("consecutive_skips", "int")
        if self.method == "auto":
            self._norm_history = self.add_variable(
                (self.history_size,),
                initializer="zeros",
                dtype="float32",
                aggregation="only_first_replica",
                name="norm_history",
            )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self) -> list[Any]:
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    def _stat(self, name: str) -> Any:
        if not self.built:
            raise ValueError(
                f"{self.name} has no statistics before it is built: call build(variables), "
                "apply(...) or model.fit(...) first"
            )
        return getattr(self, "_" + name)

    grad_norm = property(lambda self: self._stat("grad_norm"), doc="Pre-clip norm, last step.")
    clipped_grad_norm = property(
        lambda self: self._stat("clipped_grad_norm"), doc="Post-clip norm, last step."
    )
    clip_rate = property(lambda self: self._stat("clip_rate"), doc="clipped / applied steps.")
    applied_steps = property(lambda self: self._stat("applied_steps"), doc="Steps applied.")
    clipped_steps = property(lambda self: self._stat("clipped_steps"), doc="Steps clipped.")
    skipped_steps = property(lambda self: self._stat("skipped_steps"), doc="Steps skipped.")
    consecutive_skips = property(
        lambda self: self._stat("consecutive_skips"), doc="Current run of skipped steps."
    )

    @property
    def norm_history(self) -> Any:
        """AutoClip's ring buffer of gradient norms (``method="auto"`` only)."""
        if self.method != "auto":
            raise ValueError(f"norm_history exists only for method='auto', not {self.method!r}")
        return self._stat("norm_history")

    def stats(self) -> dict[str, float | int]:
        """The statistics as Python numbers: ``grad_norm``, ``clipped_grad_norm``, ``clip_rate``,
        ``applied_steps``, ``clipped_steps``, ``skipped_steps``, ``consecutive_skips``."""
        out: dict[str, float | int] = {}
        for name in ("grad_norm", "clipped_grad_norm", "clip_rate"):
            out[name] = float(self._stat(name).numpy())
        for name in ("applied_steps", "clipped_steps", "skipped_steps", "consecutive_skips"):
            out[name] = int(self._stat(name).numpy())
        return out

    # -- the step ---------------------------------------------------------------------------------

    def apply_gradients(self, grads_and_vars: Any) -> Any:
        grads, trainable_variables = zip(*grads_and_vars, strict=True)
        self.apply(grads, trainable_variables)
        return self.iterations

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `trainable_variables`, the optimizer must "
                    "already be built: call `optimizer.build(trainable_variables)` first"
                )
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                self.build(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(
                f"apply needs one gradient per variable, got {len(grads)} gradients for "
                f"{len(trainable_variables)} variables"
            )
        if keras.backend.backend() == "tensorflow":
            self._tf_apply(grads, trainable_variables)
        else:
            grads = self._unscale(grads, trainable_variables)
            self._apply_local(grads, trainable_variables)

    def _clippable(self, grads: Sequence[Any], variables: Sequence[Any]) -> list[bool]:
        return [
            g is not None and not self._overwrite_variable_with_gradient(v)
            for g, v in zip(grads, variables, strict=True)
        ]

    def _unscale(self, grads: list[Any], variables: Sequence[Any]) -> list[Any]:
        if self.loss_scale_factor is None:
            return grads
        mask = self._clippable(grads, variables)
        return _replace(grads, mask, [g / self.loss_scale_factor for g in _select(grads, mask)])

    def _tf_apply(self, grads: list[Any], variables: list[Any]) -> None:
        from keras_fancyrnn._tf import tf

        if tf.distribute.in_cross_replica_context():
            raise ValueError(
                "ClippingOptimizer.apply must be called in a replica context (inside "
                "strategy.run), got a cross-replica context"
            )
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        grads = self._unscale(grads, variables)
        if self.max_consecutive_skips is not None and not self._skip_limit_watched:
            if not self._xla_warned and _in_xla_context():
                self._xla_warned = True
                warnings.warn(
                    f"{self.name}: XLA compiles assertions away, so max_consecutive_skips="
                    f"{self.max_consecutive_skips} cannot raise from inside the step under "
                    "jit_compile=True; add keras_fancyrnn.ClippingStats() to the callbacks, "
                    "which raises after the batch",
                    stacklevel=2,
                )
        ctx = tf.distribute.get_replica_context()
        if ctx.num_replicas_in_sync > 1:
            # Clip the gradient of the whole batch: sum it over replicas first.
            mask = self._clippable(grads, variables)
            summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, _select(grads, mask))
            grads = _replace(grads, mask, summed)
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            self._apply_local(grads, variables)
        else:
            # A cond whose branch calls merge_call (as inner_optimizer.apply does) must be built in
            # cross-replica context: decide there, then run the branch on every replica.
            ctx.merge_call(self._cross_replica_apply, args=(grads, variables))

    def _cross_replica_apply(self, distribution: Any, grads: Any, variables: Any) -> None:
        from keras_fancyrnn._tf import tf

        def per_replica(fn: Any, *args: Any) -> Any:
            return distribution.extended.call_for_each_replica(fn, args=args)

        if not self.skip_nonfinite:
            per_replica(self._finite_step, grads, variables)
            return
        # Every replica holds the same summed gradient, hence the same decision.
        proceed = distribution.experimental_local_results(
            per_replica(self._proceed, grads, variables)
        )[0]
        tf.cond(
            proceed,
            lambda: per_replica(self._finite_step, grads, variables),
            lambda: per_replica(self._skip_step, grads, variables),
        )

    def _apply_local(self, grads: list[Any], variables: list[Any]) -> None:
        if not self.skip_nonfinite:
            self._finite_step(grads, variables)
            return
        ops.cond(
            self._proceed(grads, variables),
            lambda: self._finite_step(grads, variables),
            lambda: self._skip_step(grads, variables),
        )

    def _proceed(self, grads: list[Any], variables: list[Any]) -> Any:
        sub = _select(grads, self._clippable(grads, variables))
        proceed = ops.logical_not(_any([ops.logical_not(ops.all(ops.isfinite(g))) for g in sub]))
        if self.max_consecutive_skips is not None:
            proceed = ops.logical_and(proceed, self._consecutive_skips < self.max_consecutive_skips)
        return proceed

    def _clip(self, sub: list[Any], params: list[Any], norm: Any) -> tuple[list[Any], Any]:
        """Dispatch to the pure function of ``method``; "auto" also pushes ``norm`` into the
        history."""
        if self.method == "global_norm":
            return clip_by_global_norm(sub, self.threshold, norm=norm)
        if self.method == "norm":
            return clip_by_norm(sub, self.threshold)
        if self.method == "value":
            return clip_by_value(sub, self.threshold)
        if self.method == "adaptive":
            return adaptive_clip(sub, params, self.threshold, self.eps)
        threshold, history, _ = autoclip_threshold(
            self._norm_history, self._applied_steps, norm, self.percentile
        )
        self._norm_history.assign(history)
        return clip_by_global_norm(sub, threshold, norm=norm)

    def _finite_step(self, grads: list[Any], variables: list[Any]) -> None:
        mask = self._clippable(grads, variables)
        sub = _select(grads, mask)
        params = _select(variables, mask)
        norm = global_norm(sub)
        clipped, fired = self._clip(sub, params, norm)

        applied = self._applied_steps + 1
        clipped_steps = self._clipped_steps + ops.cast(fired, self._clipped_steps.dtype)
        self._grad_norm.assign(ops.cast(norm, "float32"))
        self._clipped_grad_norm.assign(ops.cast(global_norm(clipped), "float32"))
        self._applied_steps.assign(applied)
        self._clipped_steps.assign(clipped_steps)
        self._clip_rate.assign(ops.cast(clipped_steps, "float32") / ops.cast(applied, "float32"))
        self._consecutive_skips.assign(ops.zeros((), self._consecutive_skips.dtype))

        grads = _replace(grads, mask, self._first_replica_only(clipped))
        self.inner_optimizer.apply(grads, variables)

    def _first_replica_only(self, grads: list[Any]) -> list[Any]:
        """Under tf.distribute, zero the gradient on all replicas but the first: the inner
        optimizer sums over replicas, and the sum must be the (already summed) clipped gradient."""
        if keras.backend.backend() != "tensorflow":
            return grads
        from keras_fancyrnn._tf import tf

        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return grads
        first = tf.equal(ctx.replica_id_in_sync_group, 0)
        return [tf.where(first, g, tf.zeros_like(g)) for g in grads]

    def _skip_step(self, grads: list[Any], variables: list[Any]) -> None:
        sub = _select(grads, self._clippable(grads, variables))
        consecutive = self._consecutive_skips + 1
        self._grad_norm.assign(ops.cast(global_norm(sub), "float32"))
        self._clipped_grad_norm.assign(ops.zeros((), "float32"))
        self._skipped_steps.assign(self._skipped_steps + 1)
        self._consecutive_skips.assign(consecutive)
        if self.max_consecutive_skips is not None and keras.backend.backend() == "tensorflow":
            from keras_fancyrnn._tf import tf

            tf.debugging.Assert(
                consecutive < self.max_consecutive_skips,
                [self._skip_limit_message(), "consecutive skips:", consecutive],
            )

    def _skip_limit_message(self) -> str:
        return (
            f"{self.name}: {self.max_consecutive_skips} consecutive steps had a non-finite "
            f"gradient (max_consecutive_skips={self.max_consecutive_skips}); every step was "
            "skipped, so the weights are those of the last finite step. Lower the learning rate, "
            "tighten the clipping, or check the data for nan/inf."
        )

    def stateless_apply(self, optimizer_variables: Any, grads: Any, trainable_variables: Any):
        raise NotImplementedError(
            "ClippingOptimizer does not support stateless_apply (the JAX trainer); use the "
            "TensorFlow backend"
        )

    # -- delegation and serialization -------------------------------------------------------------

    def finalize_variable_values(self, var_list: Sequence[Any]) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def exclude_from_weight_decay(self, var_list: Any = None, var_names: Any = None) -> None:
        self.inner_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "method": self.method,
            "threshold": self.threshold,
            "skip_nonfinite": self.skip_nonfinite,
            "max_consecutive_skips": self.max_consecutive_skips,
            "percentile": self.percentile,
            "history_size": self.history_size,
            "eps": self.eps,
            "loss_scale_factor": self.loss_scale_factor,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> ClippingOptimizer:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def _find_clipping_optimizer(optimizer: Any) -> ClippingOptimizer | None:
    seen = 0
    while optimizer is not None and seen < 16:
        if isinstance(optimizer, ClippingOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
        seen += 1
    return None


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class ClippingStats(keras.callbacks.Callback):
    """Write a :class:`ClippingOptimizer`'s statistics into ``model.fit``'s logs.

    After every training batch and at the end of every epoch it adds

    ``grad_norm``
        the pre-clip global gradient norm of the last step,
    ``clipped_grad_norm``
        the norm after clipping (0 if the step was skipped),
    ``clip_rate``
        the fraction of applied steps that were clipped, since training began,
    ``skipped_steps``
        the number of steps skipped for a non-finite gradient, since training began,

    so they show in the progress bar and in the ``History`` returned by ``fit`` (put the callback
    before any callback that should see them, e.g. ``CSVLogger``). The optimizer is found in
    ``model.optimizer``, also when wrapped by a ``LossScaleOptimizer``.

    If the optimizer has ``max_consecutive_skips`` and that many steps in a row were skipped, the
    callback raises ``RuntimeError`` — this is how the limit is enforced under ``jit_compile=True``,
    where XLA drops the optimizer's in-graph assertion.
    """

    KEYS = ("grad_norm", "clipped_grad_norm", "clip_rate", "skipped_steps")

    def __init__(self) -> None:
        super().__init__()
        self._optimizer: ClippingOptimizer | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        optimizer = getattr(self.model, "optimizer", None)
        self._optimizer = _find_clipping_optimizer(optimizer)
        if self._optimizer is None:
            raise ValueError(
                "ClippingStats needs a model compiled with a ClippingOptimizer (possibly inside a "
                f"LossScaleOptimizer), got optimizer {optimizer!r}"
            )
        self._optimizer._skip_limit_watched = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._optimizer is not None:
            self._optimizer._skip_limit_watched = False

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._write(logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._write(logs)

    def _write(self, logs: dict | None) -> None:
        optimizer = self._optimizer
        if optimizer is None or not optimizer.built:
            return
        stats = optimizer.stats()
        if logs is not None:
            logs.update({key: stats[key] for key in self.KEYS})
        limit = optimizer.max_consecutive_skips
        if limit is not None and stats["consecutive_skips"] >= limit:
            raise RuntimeError(optimizer._skip_limit_message())

    def get_config(self) -> dict[str, Any]:
        return {}
