"""Float64 finite-difference checks shared by the test files (an independent reference: the
loss itself, evaluated at perturbed points, against the tape's gradients)."""

import numpy as np
import tensorflow as tf


def assert_tape_matches_finite_differences(loss, inputs, rtol=1e-6, atol=1e-8, eps=1e-6):
    """``loss(*inputs)``'s tape gradients with respect to every input (float64 arrays) equal
    central differences (``tf.test.compute_gradient``)."""
    theoretical, numerical = tf.test.compute_gradient(loss, [tf.constant(x) for x in inputs],
                                                      delta=eps)
    for got, want in zip(theoretical, numerical, strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def assert_gradients_match_finite_differences(loss_of, x, variables, rng, eps=1e-6):
    """``loss_of(x)``'s tape gradients equal central differences: with respect to ``x`` in full
    (``tf.test.compute_gradient``), and with respect to each variable along a random direction."""
    theoretical, numerical = tf.test.compute_gradient(loss_of, [tf.constant(x)], delta=eps)
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-7)
    with tf.GradientTape() as tape:
        loss = loss_of(x)
    grads = tape.gradient(loss, variables)
    for w, g in zip(variables, grads):
        v = rng.normal(size=w.shape)
        w0 = w.numpy()
        w.assign(w0 + eps * v)
        up = loss_of(x).numpy()
        w.assign(w0 - eps * v)
        down = loss_of(x).numpy()
        w.assign(w0)
        np.testing.assert_allclose(np.sum(g.numpy() * v), (up - down) / (2 * eps), rtol=1e-6)
