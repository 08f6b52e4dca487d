"""numpy references for the clipping tests (float64), written from the rules in
../shared/SCIENCE.md and the papers, not from the package's code; no TensorFlow, so the modules
of every backend can share them."""

import numpy as np


def np_global_norm(grads):
    return float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads)))


def np_clip_global(grads, tau):
    n = np_global_norm(grads)
    scale = tau / n if n > tau else 1.0
    return [np.asarray(g, np.float64) * scale for g in grads]


def np_clip_each(grads, tau):
    out = []
    for g in grads:
        g = np.asarray(g, np.float64)
        n = np.linalg.norm(g.ravel())
        out.append(g * tau / n if n > tau else g)
    return out


def np_agc(grads, params, lam, eps=1e-3):
    """AGC written unit by unit: a unit is a column (last axis) of a matrix, an element of a
    vector."""
    out = []
    for g, w in zip(grads, params, strict=True):
        g = np.array(g, np.float64)
        w = np.asarray(w, np.float64)
        if g.ndim <= 1:
            units = [np.index_exp[i] for i in np.ndindex(g.shape)]
        else:
            units = [np.index_exp[..., i] for i in range(g.shape[-1])]
        for u in units:
            g_norm = np.sqrt(np.sum(g[u] ** 2))
            w_norm = max(np.sqrt(np.sum(w[u] ** 2)), eps)
            if g_norm / w_norm > lam:
                g[u] = lam * w_norm * g[u] / g_norm
        out.append(g)
    return out


def np_autoclip_thresholds(norms, percentile, history_size):
    history, thresholds = [], []
    for n in norms:
        history.append(n)
        thresholds.append(float(np.percentile(history[-history_size:], percentile)))
    return thresholds


class NumpyClipper:
    """One ``ClippingOptimizer`` method as numpy: ``clip(grads, params)`` returns the clipped
    gradients and whether clipping changed them; ``"auto"`` keeps its history of norms.
    ``margin`` is the smallest relative distance ``|ratio - 1|`` of a clipping decision taken so
    far (a norm or an entry over its threshold): a test whose decisions are all far from 1 does
    not depend on float32 rounding. Exact ties (AutoClip's first norm is its own threshold) are
    left out: both sides compare the same value."""

    def __init__(self, method, tau=None, percentile=None, history_size=None):
        self.method, self.tau = method, tau
        self.percentile, self.history_size, self.norms = percentile, history_size, []
        self.margin = np.inf

    def _decide(self, measured, limit):
        ratio = np.asarray(measured, np.float64) / np.asarray(limit, np.float64)
        ratio = ratio[ratio != 1.0]
        if ratio.size:
            self.margin = min(self.margin, float(np.min(np.abs(ratio - 1))))

    def clip(self, grads, params):
        grads = [np.asarray(g, np.float64) for g in grads]
        if self.method == "global_norm":
            self._decide(np_global_norm(grads), self.tau)
            out = np_clip_global(grads, self.tau)
        elif self.method == "norm":
            self._decide([np.linalg.norm(g.ravel()) for g in grads], self.tau)
            out = np_clip_each(grads, self.tau)
        elif self.method == "value":
            self._decide(np.concatenate([np.abs(g).ravel() for g in grads]), self.tau)
            out = [np.clip(g, -self.tau, self.tau) for g in grads]
        elif self.method == "adaptive":
            for g, w in zip(grads, params, strict=True):
                axes = tuple(range(g.ndim - 1)) if g.ndim > 1 else ()
                unit = lambda a, axes=axes: np.sqrt(np.sum(a**2, axis=axes))  # noqa: E731
                self._decide(unit(g), self.tau * np.maximum(unit(np.asarray(w)), 1e-3))
            out = np_agc(grads, params, self.tau)
        else:
            self.norms.append(np_global_norm(grads))
            threshold = np_autoclip_thresholds(self.norms, self.percentile, self.history_size)[-1]
            self._decide(self.norms[-1], threshold)
            out = np_clip_global(grads, threshold)
        fired = any(not np.array_equal(a, b) for a, b in zip(out, grads, strict=True))
        return out, fired


def np_adam(params, grads_per_step, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Adam (Kingma & Ba 2015, Algorithm 1 with the efficient form of section 2: the bias
    corrections folded into the step size, epsilon added to sqrt(v) as Keras does); returns the
    parameters after each step and the final moments."""
    params = [np.asarray(p, np.float64) for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    history = []
    for t, grads in enumerate(grads_per_step, start=1):
        alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        for i, g in enumerate(grads):
            m[i] = beta_1 * m[i] + (1 - beta_1) * g
            v[i] = beta_2 * v[i] + (1 - beta_2) * g**2
            params[i] = params[i] - alpha * m[i] / (np.sqrt(v[i]) + epsilon)
        history.append([p.copy() for p in params])
    return history, m, v


def gradient_steps():
    """Initial values of a (3, 4) kernel and a (4,) bias, and four gradients for them: large,
    small, with one nan entry, large."""
    rng = np.random.default_rng(11)
    shapes = [(3, 4), (4,)]
    steps = [[rng.normal(size=s).astype(np.float32) * scale for s in shapes]
             for scale in (3.0, 0.2, 1.0, 5.0)]
    steps[2][1][2] = np.nan
    return [rng.normal(size=s).astype(np.float32) for s in shapes], steps


# --------------------------------------------------------------------------------------------------
# linear regression trained with clipped SGD: the reference for model.fit
# --------------------------------------------------------------------------------------------------


LINEAR_W0 = np.array([[0.5], [-0.5], [1.0]], np.float32)  # weights to start a fit from
LINEAR_B0 = np.array([0.5], np.float32)


def linear_clean():
    rng = np.random.default_rng(7)  # the same data as the MirroredStrategy script
    x = rng.normal(size=(24, 3)).astype(np.float32)
    y = (x @ np.array([[2.0], [-1.0], [0.5]]) + 3.0).astype(np.float32)
    return x, y


def linear_data():
    x, y = linear_clean()
    x[4, 1] = np.nan  # batch 1 of 6
    x[17, 0] = np.inf  # batch 4 of 6
    return x, y


def all_nan_after_first_batch():
    """40 rows of 3 features, all nan after the first 8 (one finite batch of 8, then four)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    x[8:] = np.nan
    return x, rng.normal(size=(40, 1)).astype(np.float32)


def linear_gradient(x, y, w, b):
    """The gradient of the MSE of ``x w + b`` against ``y``: ``2/N X^T r`` and ``2/N sum r``."""
    r = x @ w + b - y
    return 2 / len(x) * x.T @ r, 2 / len(x) * r.sum(0)


def np_fit_linear(x, y, batch, epochs, lr, clipper, w0=None, b0=None):
    """Linear regression y ~ x w + b, MSE, SGD on the gradient ``clipper`` clipped, non-finite
    batches skipped; returns ``(w, b, stats)``."""
    w = np.zeros((3, 1)) if w0 is None else np.asarray(w0, np.float64)
    b = np.zeros(1) if b0 is None else np.asarray(b0, np.float64)
    stats = {"applied": 0, "clipped": 0, "skipped": 0, "norms": [], "clipped_norms": [],
             "per_epoch": []}
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            xb, yb = x[i : i + batch].astype(np.float64), y[i : i + batch].astype(np.float64)
            if not np.all(np.isfinite(xb)):
                stats["skipped"] += 1
                continue
            grads = linear_gradient(xb, yb, w, b)
            stats["norms"].append(np_global_norm(grads))
            (gw, gb), fired = clipper.clip(grads, [w, b])
            stats["clipped_norms"].append(np_global_norm([gw, gb]))
            stats["clipped"] += fired
            w, b = w - lr * gw, b - lr * gb
            stats["applied"] += 1
        stats["per_epoch"].append(
            (stats["norms"][-1], stats["clipped"] / stats["applied"], stats["skipped"])
        )
    return w, b, stats


def np_clipped_sgd(x, y, batch, epochs, lr, tau):
    """:func:`np_fit_linear` with global-norm clipping at ``tau`` from zero weights."""
    return np_fit_linear(x, y, batch, epochs, lr, NumpyClipper("global_norm", tau))
