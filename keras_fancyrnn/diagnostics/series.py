"""Series derived from the curves: scalars per record, and a clipping optimizer's stats.

``ratio_first_last`` and ``decay_rate`` summarise one curve ``g_t`` (vanishing: ratio ``≪ 1``,
positive decay rate); ``derived_scalars`` names them ``key/grad_ratio`` and ``key/grad_decay``
for every series of a record; ``_clipping_stats`` reads an fr ``ClippingOptimizer``'s ``clip/…``
stats; ``fit_log_entries`` picks the few of them that go into ``fit``'s logs.
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


#: ``log_scalars`` values: the headline scalars, every scalar, none.
LOG_MODES = (True, "all", False)


def headline_keys(targets) -> list[str]:
    """One series per monitored layer whose scalars go into ``fit``'s logs by default: the
    hidden state where it is probed, otherwise the layer's input (but not the input of a
    Bidirectional wrapper whose directions have their own series)."""
    probed = {id(t.layer) for t in targets}
    keys = []
    for t in targets:
        if t.states:
            keys.append(t.key)
        elif t.inputs and not any(id(getattr(t.layer, side, None)) in probed
                                  for side in ("forward_layer", "backward_layer")):
            keys.append(f"{t.key}/input")
    return keys


def fit_log_entries(scalars: dict[str, float], targets, mode) -> dict[str, float]:
    """What the monitor adds to ``fit``'s logs (so to the progress bar and ``History``):
    ``mode=True``: the ``grad_ratio`` of each layer's headline series (one scalar a layer, so a
    progress line stays short beside ``ClippingStats``'s four; the clipping statistics are left
    to ``ClippingStats``, which logs them once); ``"all"``: every scalar of the record,
    ``clip/…`` included; ``False``: nothing. Every scalar stays in ``monitor.scalars`` and
    TensorBoard."""
    if mode == "all":
        return dict(scalars)
    if not mode:
        return {}
    out = {}
    for key in headline_keys(targets):
        if f"{key}/grad_ratio" in scalars:
            out[f"{key}/grad_ratio"] = scalars[f"{key}/grad_ratio"]
    return out


def _clipping_stats(optimizer) -> dict[str, float]:
    """``ClippingOptimizer.stats()`` as ``clip/<name>``, found through wrappers such as Keras's
    ``LossScaleOptimizer`` (``inner_optimizer``); ``{}`` for other optimizers and before the
    optimizer's first step (it has no statistics then)."""
    inner = optimizer
    while inner is not None and not isinstance(inner, ClippingOptimizer):
        inner = getattr(inner, "inner_optimizer", None)
    if inner is None or not inner.built:
        return {}
    stats = inner.stats()
    if stats.get("applied_steps", 0) + stats.get("skipped_steps", 0) == 0:
        return {}  # no step yet (JAX and torch build the optimizer before the first one)
    return clip_scalars(stats)


def clip_scalars(stats) -> dict[str, float]:
    """``ClippingOptimizer.stats()`` (or any ``{name: number}``) as ``{clip/<name>: float}``."""
    from collections.abc import Mapping

    if not isinstance(stats, Mapping):
        raise ValueError(f"clip_stats must be a mapping such as optimizer.stats(), got "
                        f"{type(stats).__name__}")
    out = {}
    for name, value in stats.items():
        try:
            out[f"clip/{name}"] = float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"clip_stats[{name!r}] must be a number, got {value!r}") from e
    return out


__all__ = ["LOG_MODES", "decay_rate", "derived_scalars", "fit_log_entries", "headline_keys",
           "ratio_first_last"]
