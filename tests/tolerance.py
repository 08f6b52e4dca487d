"""How close two computations of a recurrence in the same floating-point precision must be.

Two implementations of one layer (the sequence kernel and Keras's loop, or two register blocks)
add the same terms in different orders, so each is off the exact value by rounding errors, and
they differ by at most the sum of both. For a value that depends on ``n`` rounded operations, each
with relative error at most the unit roundoff ``u`` (2^-24 in float32, 2^-53 in float64), the
probabilistic bound of Higham & Mary (2019, "A new approach to probabilistic rounding error
analysis") is ``λ √n u`` relative to the magnitudes involved, with probability at least
``1 - 2 exp(-λ²/2)`` per value for independent errors; ``λ = 8`` makes that 3e-14. Magnitudes are
taken as the largest ``|value|`` of the whole tensor, not element by element: a value that is
small because terms cancelled carries the absolute error of the terms.

Where a value is a sum whose terms cancel (a gradient ``dz Wᵀ`` of one element, say), its
rounding error is relative to the terms, not to the small result, and no bound on the result's
magnitude holds. Tests then pass ``measured``: the rounding error the reference implementation
itself makes on this case (its float32 result against its float64 result, scaled by the ratio of
the unit roundoffs for float64), which includes that cancellation; the bound is then the larger
of the two, with ``MEASURED_FACTOR`` for the other implementation's different but comparable
rounding.

``n`` for a recurrence of ``T`` steps: each step rounds a ``D``-term input product, an ``H``-term
recurrent product and a few gate operations (``GATE_OPS``: the LSTM's is the longest chain, with
activations accurate to a few ulp each), and its error reaches later steps through the recurrence;
weight gradients also sum ``T · B`` products. So ``n = T · (B + D + H + GATE_OPS)``. This holds
while the recurrence does not amplify errors (contractive weights; chaotic dynamics would amplify
any rounding difference exponentially in ``T``), which the tests choose.
"""

from __future__ import annotations

import numpy as np

GATE_OPS = 16
LAMBDA = 8.0
MEASURED_FACTOR = 8.0


def rounding_chain(steps: int, batch: int, dim: int, units: int) -> int:
    """``n``, the rounded operations behind a value of a recurrence (module docstring)."""
    return max(1, steps) * (batch + dim + units + GATE_OPS)


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
