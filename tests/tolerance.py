"""How close two computations of a recurrence in the same floating-point precision must be.

Two implementations of one layer (the sequence kernel and Keras's loop, or two register blocks)
add the same terms in different orders, so each is off the exact value by rounding errors, and
they differ by at most the sum of both. The bound used here is a heuristic with a margin, after
the probabilistic rounding-error analysis of Higham & Mary (2019, "A new approach to probabilistic
rounding error analysis"): for a value computed with ``n`` rounded operations, each with relative
error at most the unit roundoff ``u`` (2^-24 in float32, 2^-53 in float64), the error is at most
``λ √n u`` relative to the magnitudes involved with probability at least
``1 - 2n exp(-λ²(1-u)²/2)`` for independent errors; ``λ = 8`` makes the failure probability per
value about ``2n · 1e-14``, small enough over millions of values. Magnitudes are taken as the
largest ``|value|`` of the whole tensor, not element by element: a small value carries the
absolute error of the terms it was summed from.

Where a whole tensor is small because its terms cancelled (a one-element gradient ``dz Wᵀ``,
say), its rounding error is relative to the terms, not to the result, and no bound on the result's
magnitude holds. Tests then pass ``measured``: the rounding error the reference implementation
itself makes on this case (its float32 result against its float64 result, scaled by the ratio of
the unit roundoffs for float64), which includes that cancellation; the bound is then the larger
of the two, with ``MEASURED_FACTOR`` for the other implementation's different but comparable
rounding.

``n`` for a recurrence of ``T`` steps and ``G`` gates: each step rounds a ``D``-term input
product, an ``H``-term recurrent product and a few gate operations (``GATE_OPS``: the LSTM's is
the longest chain, with activations accurate to a few ulp each), and backwards ``G·H``-term
products ``dz Uᵀ`` and ``dz Wᵀ``; its error reaches later steps through the recurrence; weight
gradients also sum ``T · B`` products. So ``n = T · (B + D + G·H + GATE_OPS)``. This holds while
the recurrence does not amplify errors (contractive weights; chaotic dynamics would amplify any
rounding difference exponentially in ``T``), which the tests choose. On the tests' cases the
measured differences stay below a fifth of the bound.
"""

from __future__ import annotations

import numpy as np

GATE_OPS = 16
LAMBDA = 8.0
MEASURED_FACTOR = 8.0


def rounding_chain(steps: int, batch: int, dim: int, units: int, gates: int = 4) -> int:
    """``n``, the rounded operations behind a value of a recurrence of ``gates`` gates (1 for a
    SimpleRNN, 3 for a GRU, 4 for an LSTM; module docstring)."""
    return max(1, steps) * (batch + dim + gates * units + GATE_OPS)


def tolerance(chain: int, dtype) -> float:
    """The relative bound ``2 λ √n u`` on the difference of two computations of one value."""
    return 2 * LAMBDA * np.sqrt(chain) * np.finfo(dtype).eps / 2


def assert_close(actual, desired, chain: int, dtype="float32", name: str = "",
                 measured: float = 0.0) -> None:
    """``max |actual - desired| <= max(tolerance(chain) · max |desired|, MEASURED_FACTOR ·
    measured)`` (module docstring)."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, f"{name}: shape {actual.shape} != {desired.shape}"
    assert np.all(np.isfinite(desired)), f"{name}: the reference is not finite"
    scale = float(np.max(np.abs(desired), initial=0.0))
    error = float(np.max(np.abs(actual - desired), initial=0.0))
    bound = max(tolerance(chain, dtype) * scale, MEASURED_FACTOR * measured)
    assert error <= bound, (
        f"{name}: max |difference| {error:.3g} > {bound:.3g}: 2·{LAMBDA:g}·√{chain}·u·"
        f"max|reference| = {tolerance(chain, dtype) * scale:.3g} (u of {np.dtype(dtype).name}, "
        f"max|reference| {scale:.3g}), {MEASURED_FACTOR:g} · measured rounding {measured:.3g}")


def measured_rounding(low, high, dtype) -> float:
    """The reference's own rounding error on a case: ``max |low - high|`` of its float32 and
    float64 results, scaled to the unit roundoff of ``dtype``."""
    error = float(np.max(np.abs(np.asarray(low, np.float64) - np.asarray(high, np.float64)),
                         initial=0.0))
    return error * np.finfo(dtype).eps / np.finfo(np.float32).eps


def assert_each_close(actual, desired, desired_64, chain: int, label: str) -> None:
    """``assert_close`` of each ``actual[k]`` to the float32 reference ``desired[k]``, with the
    reference's own rounding on the case (``measured_rounding`` against its float64 result
    ``desired_64[k]``) as the measured part of the bound; ``label`` names them (``output k``)."""
    for k, (a, d, d_64) in enumerate(zip(actual, desired, desired_64, strict=True)):
        assert_close(a, d, chain, name=f"{label} {k}",
                     measured=measured_rounding(d, d_64, "float32"))
