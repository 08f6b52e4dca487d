r"""A diagnosis from the gradient-norm curves and the clipping statistics, and what to do.

``diagnose`` reads a monitor's records and returns ``Finding`` s, each with the numbers it rests
on and concrete remedies. The thresholds, and why:

The curve scalars are judged on the median of the last ``RECENT = 5`` records: one probe batch
is one sample, and the median keeps a single lucky or unlucky batch from deciding.

* **Vanishing** (per monitored layer): ``grad_ratio`` (the per-example geometric mean of
  ‖∂ℓ/∂h_first‖ / ‖∂ℓ/∂h_last‖, ``aggregate``) below ``VANISHING_RATIO = 1e-2``. The weight
  gradient is a sum over timesteps of terms that scale with these norms (BPTT), so below one
  percent what the first steps contribute is lost beside the last steps' terms and their noise:
  a dependency across the sequence is learnt at least a hundred times more slowly than a local
  one, which in practice means not at all (Bengio, Simard & Frasconi 1994). The reach, reported
  with it, is the distance back at which the curve falls below ``VANISHING_RATIO`` of its last
  value.
* **Exploding**, any of:

  - a curve growing backwards: ``grad_ratio`` above ``EXPLODING_RATIO = 1e2``. In a contracting
    recurrence the norm shrinks or stays level going back; a hundredfold growth over the
    sequence means the Jacobian products have norm above one (Pascanu, Mikolov & Bengio 2013),
    with a margin for losses read at several steps, which add level terms;
  - ``clip/skipped_steps > 0``: a ``ClippingOptimizer`` skipped a step whose gradient was not
    finite (the norm overflowed float32);
  - ``clip/clip_rate`` above ``HIGH_CLIP_RATE = 0.5`` with the recorded pre-clip norms a median
    ``CLIP_FACTOR = 10`` times the clipped ones: most steps were clipped, and by an order of
    magnitude, so the gradient's size is the recurrence's doing, not the data's (a threshold
    merely a little below the typical norm clips most steps too, and is no sign of explosion);
    judged from ``MIN_CLIP_STEPS = 10`` applied steps on (the first steps' large initial errors
    alone say little);
  - the recorded global norms ``clip/grad_norm`` growing by more than ``NORM_GROWTH = 1e2`` from
    the first record to the largest later one.

Remedies carry the numbers seen: a clip threshold at the median of the observed pre-clip global
norms (Pascanu et al. clip at about the average norm), ``fr.LSTM``/``fr.GRU`` instead of a tanh
``SimpleRNN``, the identity-initialised ReLU RNN (IRNN, Le, Jaitly & Hinton 2015),
``ChronoBias(T)`` for an LSTM with the sequence length ``T`` the monitor saw (Tallec & Ollivier
2018), ``bptt_truncate=k`` with the distance at which the curve has grown a hundredfold.

* **Saturated units** (tanh SimpleRNNs, whose hidden states the probe pass reads): the scalar
  ``<layer>/saturation``, the fraction of units with ``|h_t| > 0.99`` over the valid steps of the
  probe batch, above ``SATURATED_FRACTION = 0.5``. Such a unit passes less than 2 % of the
  gradient back through its step (``tanh' = 1 - h²``), so where most units are saturated the
  Jacobian products shrink whatever the recurrent kernel does. (Gated cells are not judged: an
  LSTM's or GRU's ``h`` near ±1 says nothing of its gates, which carry its gradient.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from keras_fancyrnn.diagnostics.reporting import norm_label

VANISHING_RATIO = 1e-2
RECENT = 5
SATURATED_FRACTION = 0.5
EXPLODING_RATIO = 1e2
HIGH_CLIP_RATE = 0.5
CLIP_FACTOR = 10.0
MIN_CLIP_STEPS = 10
NORM_GROWTH = 1e2


@dataclass(frozen=True)
class Finding:
    """One diagnosis: ``kind`` (``"vanishing"``, ``"exploding"`` or ``"saturated"``), the
    ``series`` it concerns (a series key, or ``"clip"`` for the optimizer's statistics), the
    ``step`` of the record it rests on, the numbers (``evidence``), ``remedies`` and a ``text``
    for people."""

    kind: str
    series: str
    step: int
    evidence: dict = field(default_factory=dict)
    remedies: tuple = ()
    text: str = ""

    def as_dict(self) -> dict:
        out = asdict(self)
        out["remedies"] = list(self.remedies)
        return out

    def __str__(self) -> str:
        return self.text


def _reach(curve, fraction) -> int | None:
    """Steps back from the last valid step at which the curve first leaves
    ``[fraction, 1/fraction]`` × its last value; ``None`` if it never does."""
    c = np.asarray(curve, dtype=np.float64)
    valid = np.flatnonzero(np.isfinite(c))
    if valid.size < 2 or not c[valid[-1]] > 0:
        return None
    rel = c[valid] / c[valid[-1]]
    out = np.flatnonzero((rel < fraction) | (rel > 1 / fraction))
    return int(valid[-1] - valid[out[-1]]) if out.size else None


def _layer_kind(layer) -> str:
    """``"lstm"``, ``"gru"``, ``"tanh"`` (a SimpleRNN with tanh) or ``"other"``."""
    cell = getattr(layer, "cell", None)
    name = type(cell).__name__.lower() if cell is not None else type(layer).__name__.lower()
    if "lstm" in name:
        return "lstm"
    if "gru" in name:
        return "gru"
    activation = getattr(cell, "activation", None)
    if "simple" in name and getattr(activation, "__name__", "") == "tanh":
        return "tanh"
    return "other"


def _recent(values) -> float:
    """The median of the last ``RECENT`` finite values (NaN if none)."""
    finite = [float(v) for v in list(values)[-RECENT:] if math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def _n_finite(values) -> int:
    return sum(math.isfinite(v) and v > 0 for v in values)


def _clip_threshold(norms) -> float | None:
    finite = [v for v in norms if math.isfinite(v) and v > 0]
    return float(np.percentile(finite, 50)) if finite else None


def _vanishing_remedies(kind: str, steps: int, layer_name: str) -> list[str]:
    if kind == "tanh":
        return [f"replace the tanh SimpleRNN {layer_name!r} by fr.LSTM or fr.GRU (gated "
                "states carry the gradient back)",
                "or an IRNN: fr.SimpleRNN(units, activation='relu', "
                "recurrent_initializer=keras.initializers.Identity()) with a clipping optimizer"]
    if kind == "lstm":
        return [f"fr.LSTM(..., unit_forget_bias=False, "
                f"bias_initializer=fr.initializers.ChronoBias({max(steps, 3)})): forget gates "
                f"with timescales up to the {steps} steps seen"]
    if kind == "gru":
        return [f"fr.LSTM(..., unit_forget_bias=False, bias_initializer="
                f"fr.initializers.ChronoBias({max(steps, 3)})) for dependencies over "
                f"{steps} steps"]
    return ["a gated layer (fr.LSTM with fr.initializers.ChronoBias(T), fr.GRU)"]


def _over(records: int) -> str:
    return "the latest record" if records == 1 else f"median of the last {records} records"


def _vanishing(key, curve, ratio, decay, step, layer, records) -> Finding | None:
    if not (math.isfinite(ratio) and ratio < VANISHING_RATIO):
        return None
    steps = int(np.isfinite(np.asarray(curve, dtype=np.float64)).sum())
    reach = _reach(curve, VANISHING_RATIO)
    kind = _layer_kind(layer)
    remedies = _vanishing_remedies(kind, steps, getattr(layer, "name", key))
    text = (f"{key}: vanishing gradients at step {step}: {norm_label(key)} at the first step is "
            f"{ratio:.2g} of that at the last ({_over(records)}; threshold "
            f"{VANISHING_RATIO:g}), shrinking about {math.exp(-decay):.2g}x per step back"
            + (f"; in the latest record it falls below {VANISHING_RATIO:g} of its last value "
               f"{reach} steps back of {steps}" if reach else "")
            + ". Try: " + "; ".join(remedies) + ".")
    return Finding("vanishing", key, step, {"grad_ratio": ratio, "grad_decay": decay,
                                            "reach": reach, "timesteps": steps},
                   tuple(remedies), text)


def _saturated(key, fraction, step, records) -> Finding | None:
    if not (math.isfinite(fraction) and fraction > SATURATED_FRACTION):
        return None
    remedies = ["standardise the inputs (zero mean, unit variance) or start from a smaller "
                "input kernel, so that the pre-activations x_t W + h_{t-1} U + b stay near 0",
                "or fr.LSTM / fr.GRU, whose gates carry the gradient past saturated units"]
    text = (f"{key}: saturated units at step {step}: {fraction:.0%} of the tanh units have "
            f"|h_t| > 0.99 ({_over(records)}; threshold {SATURATED_FRACTION:.0%}); each passes "
            "under 2% of the gradient back through its step. Try: " + "; ".join(remedies) + ".")
    return Finding("saturated", key, step, {"saturation": fraction}, tuple(remedies), text)


def _clip_evidence(scalars) -> dict:
    """The exploding signs in the clipping statistics (latest values, norm growth)."""
    out = {}
    skipped = scalars.get("clip/skipped_steps")
    if skipped is not None and len(skipped) and np.nanmax(skipped) > 0:
        out["skipped_steps"] = int(np.nanmax(skipped))
    rate = scalars.get("clip/clip_rate")
    norms = [float(v) for v in scalars.get("clip/grad_norm", [])]
    clipped = [float(v) for v in scalars.get("clip/clipped_grad_norm", [])]
    factors = [n / c for n, c in zip(norms, clipped) if c > 0 and math.isfinite(n / c)] if (
        len(clipped) == len(norms)) else []
    factor = float(np.median(factors)) if factors else math.nan
    applied = scalars.get("clip/applied_steps")
    enough = applied is None or (len(applied) and applied[-1] >= MIN_CLIP_STEPS)
    if rate is not None and len(rate) and rate[-1] > HIGH_CLIP_RATE and factor > CLIP_FACTOR and (
            enough):
        out["clip_rate"] = float(rate[-1])
        out["clip_factor"] = factor
    finite = [v for v in norms if math.isfinite(v) and v > 0]
    if len(finite) >= 2 and max(finite[1:]) > NORM_GROWTH * finite[0]:
        out["norm_growth"] = max(finite[1:]) / finite[0]
    return out


def _exploding_remedies(norms, curve=None, layer=None) -> list[str]:
    threshold = _clip_threshold(norms)
    if threshold is not None:
        out = [f"clip the global norm at the median observed norm: fr.ClippingOptimizer("
               f"optimizer, threshold={threshold:.3g}) (from {_n_finite(norms)} recorded norm(s))"]
    else:
        out = ["fr.ClippingOptimizer(optimizer, method='auto') (a percentile of recent norms "
               "as threshold) and record its stats to size a fixed threshold"]
    growth = None if curve is None else _reach(curve, 1 / EXPLODING_RATIO)
    if growth:
        out.append(f"or bptt_truncate={growth} on the layer (the curve grows "
                   f"{EXPLODING_RATIO:g}x within {growth} steps back)")
    if layer is not None and _layer_kind(layer) == "tanh":
        out.append("a recurrent kernel of gain <= 1 (the default "
                   "recurrent_initializer='orthogonal')")
    return out


def _exploding_curve(key, ratio, curve, step, layer, norms, records) -> Finding | None:
    if not (math.isfinite(ratio) and ratio > EXPLODING_RATIO):
        return None
    remedies = _exploding_remedies(norms, curve, layer)
    text = (f"{key}: exploding gradients at step {step}: {norm_label(key)} at the first step is "
            f"{ratio:.3g}x that at the last ({_over(records)}; threshold "
            f"{EXPLODING_RATIO:g}). Try: "
            + "; ".join(remedies) + ".")
    return Finding("exploding", key, step, {"grad_ratio": ratio}, tuple(remedies), text)


def _exploding_clip(scalars, step) -> Finding | None:
    evidence = _clip_evidence(scalars)
    if not evidence:
        return None
    norms = [float(v) for v in scalars.get("clip/grad_norm", [])]
    remedies = _exploding_remedies(norms)
    said = {"skipped_steps": "{} steps skipped for a non-finite gradient",
            "clip_rate": "{:.0%} of steps clipped (threshold " + f"{HIGH_CLIP_RATE:.0%})",
            "clip_factor": "by a median factor of {:.3g}",
            "norm_growth": "the global norm grew {:.3g}x since the first record"}
    text = (f"exploding gradients at step {step}: "
            + ", ".join(said[k].format(v) for k, v in evidence.items())
            + ". Try: " + "; ".join(remedies) + ".")
    return Finding("exploding", "clip", step, evidence, tuple(remedies), text)


def diagnose(history: dict, scalars: dict, steps, layers: dict | None = None) -> list[Finding]:
    """Findings for the latest record of a monitor.

    ``history``: ``{key: [n_records, T]}``; ``scalars``: ``{name: [n_records]}`` (with
    ``key/grad_ratio``, ``key/grad_decay`` and any ``clip/…``); ``steps``: the records' steps;
    ``layers``: ``{series key: layer}`` of the series to diagnose (default: every series with a
    ``grad_ratio``). Returns vanishing and saturation findings, then exploding ones (module
    docstring).
    """
    steps = list(np.asarray(steps).tolist())
    if not steps:
        return []
    step = int(steps[-1])
    if layers is None:
        layers = {k[: -len("/grad_ratio")]: None for k in scalars if k.endswith("/grad_ratio")}
    norms = [float(v) for v in scalars.get("clip/grad_norm", [])]
    out, exploding = [], []
    for key, layer in layers.items():
        if key not in history or f"{key}/grad_ratio" not in scalars:
            continue
        curve = np.asarray(history[key])[-1]
        ratio = _recent(scalars[f"{key}/grad_ratio"])
        decay = _recent(scalars.get(f"{key}/grad_decay", [math.nan]))
        records = min(RECENT, len(steps))
        found = _vanishing(key, curve, ratio, decay, step, layer, records)
        if found is not None:
            out.append(found)
        found = _saturated(key, _recent(scalars.get(f"{key}/saturation", [])), step, records)
        if found is not None:
            out.append(found)
        found = _exploding_curve(key, ratio, curve, step, layer, norms, records)
        if found is not None:
            exploding.append(found)
    clip = _exploding_clip(scalars, step)
    return out + exploding + ([clip] if clip is not None else [])


__all__ = ["CLIP_FACTOR", "EXPLODING_RATIO", "HIGH_CLIP_RATE", "MIN_CLIP_STEPS", "NORM_GROWTH",
           "RECENT", "SATURATED_FRACTION", "VANISHING_RATIO", "Finding", "diagnose"]
