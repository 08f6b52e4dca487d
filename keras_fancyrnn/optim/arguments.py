"""``ClippingOptimizer``'s argument checks: each takes the arguments it checks and returns them with
their defaults filled in, or raises a ``ValueError`` that names the argument and what it expects."""

from __future__ import annotations

import math
import numbers
from typing import Any

import keras

from keras_fancyrnn.optim.clipping import DEFAULT_EPS

__all__ = [
    "METHODS",
    "check_no_base_args",
    "checked_inner",
    "checked_method_args",
    "checked_skips",
    "positive",
]

#: The clipping methods of :class:`~keras_fancyrnn.ClippingOptimizer`.
METHODS = ("global_norm", "norm", "value", "adaptive", "auto")

# threshold when the user passes none: 1.0 for the absolute methods, lambda = 0.01 for AGC
# (Brock et al. 2021 use 0.01 at their largest batch sizes).
_DEFAULT_THRESHOLD = {"global_norm": 1.0, "norm": 1.0, "value": 1.0, "adaptive": 0.01}
_DEFAULT_PERCENTILE = 10.0  # Seetharaman et al. 2020 recommend p = 10
_DEFAULT_HISTORY_SIZE = 1000

# the base optimizer's arguments that belong to the inner optimizer
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


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive(name: str, value: Any) -> float:
    """``value`` as a float, which must be a finite number > 0."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_no_base_args(kwargs: dict) -> None:
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


def checked_inner(inner_optimizer: Any) -> keras.optimizers.Optimizer:
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


def _autoclip_args(threshold: Any, percentile: Any, history_size: Any) -> tuple[float, int]:
    """AutoClip's ``(percentile, history_size)``; it takes no ``threshold``."""
    if threshold is not None:
        raise ValueError(
            "threshold does not apply to method='auto' (AutoClip takes its threshold from "
            f"the percentile of past gradient norms), got threshold={threshold!r}"
        )
    percentile = _DEFAULT_PERCENTILE if percentile is None else percentile
    if not _is_real(percentile) or not 0 < percentile <= 100:
        raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
    history_size = _DEFAULT_HISTORY_SIZE if history_size is None else history_size
    return float(percentile), _positive_int("history_size", history_size)


def _fixed_threshold(method: str, threshold: Any, percentile: Any, history_size: Any) -> float:
    """The threshold of a method other than AutoClip, which takes no AutoClip arguments."""
    threshold = positive(
        "threshold", _DEFAULT_THRESHOLD[method] if threshold is None else threshold
    )
    for arg, value in (("percentile", percentile), ("history_size", history_size)):
        if value is not None:
            raise ValueError(
                f"{arg} applies only to method='auto', got {arg}={value!r} with method={method!r}"
            )
    return threshold


def checked_method_args(
    method: Any, threshold: Any, percentile: Any, history_size: Any, eps: Any
) -> tuple[float | None, float | None, int | None, float | None]:
    """``(threshold, percentile, history_size, eps)`` with the method's defaults, each given
    only to the method it applies to."""
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}"
        )
    if method == "auto":
        percentile, history_size = _autoclip_args(threshold, percentile, history_size)
    else:
        threshold = _fixed_threshold(method, threshold, percentile, history_size)
    if method == "adaptive":
        eps = positive("eps", DEFAULT_EPS if eps is None else eps)
    elif eps is not None:
        raise ValueError(
            f"eps applies only to method='adaptive', got eps={eps!r} with method={method!r}"
        )
    return threshold, percentile, history_size, eps


def checked_skips(skip_nonfinite: Any, max_consecutive_skips: Any) -> int | None:
    """``max_consecutive_skips`` (a positive int or ``None``), which needs ``skip_nonfinite``."""
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
    if max_consecutive_skips is None:
        return None
    max_consecutive_skips = _positive_int("max_consecutive_skips", max_consecutive_skips)
    if not skip_nonfinite:
        raise ValueError(
            "max_consecutive_skips needs skip_nonfinite=True (no step is skipped "
            f"otherwise), got max_consecutive_skips={max_consecutive_skips}"
        )
    return max_consecutive_skips
