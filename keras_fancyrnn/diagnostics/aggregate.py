r"""From per-example norms to a curve: the mean over the examples whose step is valid.

The probe pass measures, for every series and every example ``i`` of the probe batch,
``n_{i,t} = ‖∂ℓ_i/∂h_t^{(i)}‖`` and, where the layer receives a mask (``Masking``,
``Embedding(mask_zero=True)``, a ``mask=`` argument, as Keras propagates it to the layer), which
steps ``m_{i,t}`` of example ``i`` are valid. This module turns them into what is recorded:

* ``align="time"`` (default): the value at ``t`` is the mean over the examples whose step ``t``
  is valid, :math:`g_t = \sum_i m_{i,t} n_{i,t} / c_t` with :math:`c_t = \sum_i m_{i,t}`; the
  counts ``c_t`` are the series ``<layer>/count``. Where no example is valid, ``g_t`` is NaN.
  A padded example therefore does not pull the curve down where it is padded: the curve at
  ``t`` describes the examples that are that long.
* ``align="end"``: each example is shifted so that its last valid step lands on the last index
  ``T - 1``; index ``j`` holds the steps ``T - 1 - j`` steps before each example's end. This is
  what post-padded text needs: the loss usually reads the last valid state, and "k steps back
  from where the loss reads" is the distance the gradient travels. Counts as above, aligned the
  same way. Without a mask both alignments give the plain mean over the batch.

The derived scalars (``series``) are computed per example from its own valid steps and then
aggregated: ``grad_ratio`` is the geometric mean over examples of each example's
:math:`n_{i,\text{first}} / n_{i,\text{last}}` (ratios span orders of magnitude, so their
logarithms are averaged), ``grad_decay`` the mean of each example's fitted rate. So the longest
example does not decide them, and a batch gives the same scalars as its examples one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ALIGNMENTS = ("time", "end")


def check_align(align) -> str:
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    return align


def align_at_end(norms: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(norms, mask)`` ``[B, T]`` with each example shifted right so that its last valid step
    is at ``T - 1`` (an example without a valid step stays where it is, all masked)."""
    out_n, out_m = np.zeros_like(norms), np.zeros_like(mask)
    steps = mask.shape[1]
    for i, row in enumerate(mask):
        valid = np.flatnonzero(row)
        if valid.size == 0:
            continue
        shift = steps - 1 - valid[-1]
        out_n[i, shift:] = norms[i, : steps - shift]
        out_m[i, shift:] = row[: steps - shift]
    return out_n, out_m


def curve_and_count(norms, mask=None, align: str = "time") -> tuple[np.ndarray, np.ndarray]:
    """``(curve [T], count [T] int64)`` from per-example norms ``[B, T]`` and the valid steps
    ``mask`` ``[B, T]`` (``None``: every step valid); module docstring. The curve is float32, or
    float64 for float64 norms (a float64 probe pass, whose values go below float32's range)."""
    dtype = np.float64 if np.asarray(norms).dtype == np.float64 else np.float32
    norms = np.asarray(norms, dtype=np.float64)
    mask = np.ones(norms.shape, bool) if mask is None else np.asarray(mask, bool)
    if align == "end":
        norms, mask = align_at_end(norms, mask)
    count = mask.sum(axis=0)
    total = np.where(mask, norms, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return curve.astype(dtype), count.astype(np.int64)


def per_example_scalars(norms, mask=None) -> tuple[float, float]:
    """``(grad_ratio, grad_decay)``: per example from its valid steps (``ratio_first_last``,
    ``decay_rate``, here for all rows at once), then the geometric mean of the ratios and the
    mean of the rates over the examples where they are defined (NaN if none)."""
    norms = np.asarray(norms, dtype=np.float64)
    mask = np.ones(norms.shape, bool) if mask is None else np.asarray(mask, bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        valid = mask & np.isfinite(norms) & (norms > 0)  # masked steps count as zero norms
        count = valid.sum(axis=1)
        rows = np.flatnonzero(count > 0)
        first = np.argmax(valid[rows], axis=1)
        last = norms.shape[1] - 1 - np.argmax(valid[rows, ::-1], axis=1)
        ratios = norms[rows, first] / norms[rows, last]
        # the least-squares slope of ln n_t over the valid t of each row
        t = np.arange(norms.shape[1], dtype=np.float64)
        logs = np.where(valid, np.log(np.where(valid, norms, 1.0)), 0.0)
        n = np.maximum(count, 1)[:, None]
        t_c = np.where(valid, t - (valid * t).sum(axis=1, keepdims=True) / n, 0.0)
        rates = (t_c * (logs - logs.sum(axis=1, keepdims=True) / n)).sum(axis=1) / (
            t_c * t_c).sum(axis=1)
        rates = rates[count >= 2]
    logs = np.log(ratios[np.isfinite(ratios) & (ratios > 0)])
    rates = rates[np.isfinite(rates)]
    return (math.exp(logs.mean()) if logs.size else math.nan,
            float(rates.mean()) if rates.size else math.nan)


def count_key(layer_key: str) -> str:
    """The series of valid-example counts of a masked layer."""
    return f"{layer_key}/count"


@dataclass
class Measurement:
    """What one probe pass measured: ``norms`` ``{series key: [B, T]}``, ``masks`` ``{layer key:
    [B, T] bool}`` for the layers that received a mask, ``owners`` ``{series key: layer key}``,
    and ``kernels`` ``{key/recurrent_kernel: [T, H, P]}``, step ``t``'s term of the recurrent
    kernel's gradient of ``Σ_i ℓ_i`` (a sum over the batch, kept in time order whatever the
    alignment; the ``targets`` module's docstring); ``saturation`` ``{layer key: [B, T]}``, for
    tanh SimpleRNNs the fraction of units with ``|h_t| > 0.99`` (``tanh' < 0.02``), whose mean
    over the valid steps is the scalar ``<layer>/saturation``."""

    norms: dict
    masks: dict
    owners: dict
    kernels: dict = field(default_factory=dict)
    saturation: dict = field(default_factory=dict)  # {layer key: [B, T] saturated fraction}

    def mask_of(self, key: str):
        return self.masks.get(self.owners.get(key, key))

    def curves(self, align: str = "time") -> dict[str, np.ndarray]:
        """``{key: [T] curve}`` and, after a masked layer's series, ``<layer>/count``."""
        out = {}
        for key, norms in self.norms.items():
            curve, count = curve_and_count(norms, self.mask_of(key), align)
            out[key] = curve
            owner = self.owners.get(key, key)
            if owner in self.masks and count_key(owner) not in out:
                out[count_key(owner)] = count
        for key, terms in self.kernels.items():  # Frobenius norm of each step's term
            terms = np.asarray(terms, dtype=np.float64)
            out[key] = np.sqrt((terms.reshape(len(terms), -1) ** 2).sum(-1)).astype(np.float32)
        return out

    def scalars(self) -> dict[str, float]:
        """``{key/grad_ratio, key/grad_decay}`` per series, per example (module docstring)."""
        out = {}
        for key, norms in self.norms.items():
            out[f"{key}/grad_ratio"], out[f"{key}/grad_decay"] = per_example_scalars(
                norms, self.mask_of(key))
        for key, fraction in self.saturation.items():  # over valid (example, step) pairs
            mask = self.masks.get(key)
            valid = np.ones(fraction.shape, bool) if mask is None else np.asarray(mask, bool)
            out[f"{key}/saturation"] = float(fraction[valid].mean()) if valid.any() else math.nan
        return out


__all__ = ["ALIGNMENTS", "Measurement", "count_key", "curve_and_count", "per_example_scalars"]
