"""The row-norm op (``KerasFancyrnnRowNorms``, ``keras_fancyrnn.ops.native.row_norms``) against
Python's ``math.hypot`` (scaled, so it neither underflows nor overflows), and the monitor's
per-step norms through it against the scaled Keras-ops path it replaces."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from kernel_kinds import needs_compiler

from keras_fancyrnn.diagnostics import probe_pass
from keras_fancyrnn.ops import native

pytestmark = needs_compiler("the monitor runs its Keras-ops norms")


def _hypot(rows):
    return np.array([math.hypot(*(float(v) for v in row)) for row in rows])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_row_norms_equal_hypot(library, dtype, rng):
    """Rows of ordinary, tiny (squares below the dtype's smallest value) and huge (squares past
    its largest) magnitude, and zero rows."""
    tiny, huge = (1e-30, 1e30) if dtype == "float32" else (1e-200, 1e200)
    x = rng.normal(size=(9, 37))
    x[3] *= tiny
    x[4] *= huge
    x[5] = 0.0
    x[6, :5] = tiny  # a tiny row with a few nonzero entries
    x[6, 5:] = 0.0
    x = x.astype(dtype)
    got = library.keras_fancyrnn_row_norms(tf.constant(x)).numpy()
    want = _hypot(x)
    assert got.dtype == dtype
    assert np.all(got[[3, 4, 6]] > 0) and got[5] == 0
    # float32: squares summed in double (37 terms, error ~37 u64), then rounded to float32: within
    # u32 of the norm, plus the double sum's share. float64, scaled: a rounded division and
    # square per term and a 37-term sum (Higham's γ_37), halved by the sqrt, a product: within
    # (37 + 4) u64. (hypot's own error is below 1 u64.)
    u, u64 = np.finfo(dtype).eps / 2, np.finfo("float64").eps / 2
    rtol = u + 40 * u64 if dtype == "float32" else (37 + 4) * u64
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


def test_row_norms_propagate_nan_and_inf(library):
    for dtype in ("float32", "float64"):
        x = np.ones((3, 4), dtype)
        x[0, 1] = np.nan
        x[1, 2] = np.inf
        got = library.keras_fancyrnn_row_norms(tf.constant(x)).numpy()
        assert np.isnan(got[0]) and got[1] == np.inf and got[2] == 2.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_row_norms_of_empty_dimensions(library, dtype):
    assert library.keras_fancyrnn_row_norms(tf.zeros((0, 5), dtype)).shape == (0,)
    np.testing.assert_array_equal(
        library.keras_fancyrnn_row_norms(tf.zeros((3, 0), dtype)).numpy(), np.zeros(3, dtype))


def test_row_norms_reject_other_ranks(library):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"KerasFancyrnnRowNorms: input x must have shape "
                             r"\[\?, \?\], got \[2,3,4\]"):
        library.keras_fancyrnn_row_norms(tf.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="must be rank 2"):  # traced: the shape function's
        tf.function(library.keras_fancyrnn_row_norms).get_concrete_function(
            tf.TensorSpec((2, 3, 4)))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow" or not native.usable("float32"),
                    reason="the norms op runs on the TensorFlow backend's CPU kernels only")
def test_step_norms_on_the_kernel_equal_the_scaled_keras_ops(rng, monkeypatch):
    """``probe_pass._step_norms`` of [B, T, H] and [B, T, H, W] gradients (a ConvLSTM's), in a
    traced function with an unknown batch size and length, as the probe pass runs it; against
    the same function with the kernel path turned off."""
    g3 = rng.normal(size=(5, 7, 11)).astype("float32")
    g3[1, 2] *= 1e-30  # below float32's squares
    g4 = rng.normal(size=(5, 7, 3, 4)).astype("float32")

    def norms(*gs):  # batch and length unknown while traced (a model of any length)
        fn = tf.function(lambda *a: [probe_pass._step_norms(g) for g in a])
        specs = [tf.TensorSpec((None, None, *g.shape[2:]), g.dtype) for g in gs]
        concrete = fn.get_concrete_function(*specs)
        kernel_ops = {op.type for op in concrete.graph.get_operations()} & {
            "KerasFancyrnnRowNorms"}
        return [v.numpy() for v in concrete(*gs)], kernel_ops

    got, used = norms(g3, g4)
    assert used == {"KerasFancyrnnRowNorms"}
    monkeypatch.setattr(probe_pass.native, "usable", lambda dtype: False)
    want, used = norms(g3, g4)
    assert not used
    u = np.finfo("float32").eps / 2
    for a, b, g in zip(got, want, (g3, g4)):
        assert a.shape == b.shape == g.shape[:2]
        width = int(np.prod(g.shape[2:]))
        exact = np.linalg.norm(g.reshape(5, 7, -1).astype("float64"), axis=-1)
        # the op: within u of the norm (test_row_norms_equal_hypot); the Keras ops, scaled in
        # float32: a rounded division and square per term, a width-term sum (γ_width), halved
        # by the sqrt, and the max's product: within (width / 2 + 3) u
        np.testing.assert_allclose(a, exact, rtol=1.01 * u, atol=0)
        np.testing.assert_allclose(b, exact, rtol=(width / 2 + 3) * u, atol=0)
    assert got[0][1, 2] > 0
