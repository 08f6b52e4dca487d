"""Series derived from the curves: scalars per record, and a clipping optimizer's stats.

``ratio_first_last`` and ``decay_rate`` summarise one curve ``g_t`` (vanishing: ratio ``≪ 1``,
positive decay rate); ``derived_scalars`` names them ``key/grad_ratio`` and ``key/grad_decay``
for every series of a record; ``_clipping_stats`` reads an fr ``ClippingOptimizer``'s ``clip/…``
stats.
"""

from __future__ import annotations

import math

import numpy as np

from keras_fancyrnn.optim.clipping import ClippingOptimizer


def _positive(curve) -> np.ndarray:
    c = np.asarray(curve, dtype=np.float64)
    return np.flatnonzero(np.isfinite(c) & (c > 0))


def ratio_first_last(curve) -> float:
    r"""``‖∂ℓ/∂h_first‖ / ‖∂ℓ/∂h_last‖`` over the timesteps with a positive norm (masked steps
    report 0 and are skipped); ``nan`` if fewer than one. ``≪ 1``: the signal from the far end
    vanishes; ``≫ 1``: it explodes."""
    idx = _positive(curve)
    if idx.size == 0:
        return math.nan
    c = np.asarray(curve, dtype=np.float64)
    return float(c[idx[0]] / c[idx[-1]])


def decay_rate(curve) -> float:
    r"""Least-squares slope of :math:`\ln g_t` over ``t`` (timesteps with a positive norm): the
    fitted exponential rate per timestep, :math:`g_t \approx A e^{\text{rate}\, t}`. Positive: the
    gradient shrinks by about :math:`e^{-\text{rate}}` per step it travels back in time."""
    idx = _positive(curve)
    if idx.size < 2:
        return math.nan
    logs = np.log(np.asarray(curve, dtype=np.float64)[idx])
    t = idx.astype(np.float64)
    t = t - t.mean()
    return float(np.dot(t, logs - logs.mean()) / np.dot(t, t))


def derived_scalars(curves: dict[str, np.ndarray]) -> dict[str, float]:
    """``{key + "/grad_ratio": ratio_first_last, key + "/grad_decay": decay_rate}``."""
    out = {}
    for k, c in curves.items():
        out[f"{k}/grad_ratio"] = ratio_first_last(c)
        out[f"{k}/grad_decay"] = decay_rate(c)
    return out


def _clipping_stats(optimizer) -> dict[str, float]:
    """``ClippingOptimizer.stats()`` as ``clip/<name>``, found through wrappers such as Keras's
    ``LossScaleOptimizer`` (``inner_optimizer``); ``{}`` for other optimizers and before the
    optimizer is built (it has no statistics then)."""
    inner = optimizer
    while inner is not None and not isinstance(inner, ClippingOptimizer):
        inner = getattr(inner, "inner_optimizer", None)
    if inner is None or not inner.built:
        return {}
    return {f"clip/{name}": float(value) for name, value in inner.stats().items()}


__all__ = ["decay_rate", "derived_scalars", "ratio_first_last"]
