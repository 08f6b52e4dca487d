"""The weight gradient ops (``KerasFancyrnnProjectWeightGrad``,
``KerasFancyrnnRecurrentWeightGrad``: sums of outer products of row pairs,
``keras_fancyrnn/ops/kernels/outer_sum.h``) against
float64 numpy, with every recurrent product; their own gradients against float64 finite
differences; and their errors. The layers' gradients through them are checked against
``keras.layers`` in ``test_native.py``."""


import numpy as np
import pytest
import tensorflow as tf
from gradcheck import assert_tape_matches_finite_differences
from kernel_kinds import PROJECT_ATTRS, needs_compiler

pytestmark = needs_compiler("the layers run their plain ops")

ATTRS = PROJECT_ATTRS


def _projection_reference(x, dy, transpose_w, reverse_0, reverse_1):
    """``sum_{q,p} x[p', q']^T dy[q, p]`` in float64 (``[K, N]``, or ``[N, K]``): the rows of
    ``x`` swapped and read backwards as the projection reads them, times ``dy``'s."""
    rows = np.swapaxes(x, 0, 1)
    if reverse_1:
        rows = rows[::-1]
    if reverse_0:
        rows = rows[:, ::-1]
    pairs = x.shape[0] * x.shape[1]
    dw = rows.reshape(pairs, x.shape[-1]).T @ dy.reshape(pairs, dy.shape[-1])
    return dw.T if transpose_w else dw


def _recurrent_reference(h0, h, dz):
    """``sum_t h_{t-1}^T dz_t`` in float64, ``h_{-1} = h0``."""
    previous = np.concatenate([h0[None], h[:-1]])[:len(h)]
    pairs = dz.shape[0] * dz.shape[1]
    return previous.reshape(pairs, h0.shape[-1]).T @ dz.reshape(pairs, dz.shape[-1])


def _bound(dtype, pairs, magnitude):
    """How far the op's sum of ``pairs`` products may be from numpy's float64 one: each is within
    ``M u sum |a||b|`` of the exact sum for any order of the sum (Higham, Thm 3.1; u of its
    precision), plus the rounding of the inputs to ``dtype``."""
    u = np.finfo(dtype).eps / 2
    return ((pairs + 2) * u + pairs * np.finfo("float64").eps / 2) * magnitude


# 11 x 13 = 143 pairs: two chunks of the register blocks' 128 where one thread takes them all;
# 37 rows: partial blocks of rows (5 of 8, 1 of 4); 53 columns: a partial last panel and vector
# (one thread). On two or more threads, with 45 columns (143 > 3 x 45) and transposed (37
# columns) the threads split the pairs; with 360 they split the columns, inside a panel.
@pytest.mark.parametrize("attrs", ATTRS, ids=lambda a: "-".join(k for k, v in a.items() if v)
                         or "plain")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [53, 45, 360])
def test_projection_weight_gradient_equals_numpy(library, product, dtype, attrs, n, rng):
    x, dy = rng.normal(size=(13, 11, 37)), rng.normal(size=(11, 13, n))
    dw = library.keras_fancyrnn_project_weight_grad(tf.constant(x, dtype), tf.constant(dy, dtype),
                                                    product=product, **attrs).numpy()
    want = _projection_reference(x, dy, **attrs)
    assert dw.shape == want.shape == ((n, 37) if attrs["transpose_w"] else (37, n))
    bound = _bound(dtype, 143, _projection_reference(np.abs(x), np.abs(dy), **attrs))
    assert np.all(np.abs(dw - want) <= bound)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
# steps x batch pairs, units x width: one thread, two chunks; pairs split (800 > 3 x 256 and 48
# on two threads); tiny; columns split, two chunks, the threads' boundary inside a panel
@pytest.mark.parametrize("shape", [(11, 13, 37, 53), (50, 16, 64, 256), (50, 16, 64, 48),
                                   (1, 3, 9, 17), (3, 2, 5, 1), (3, 50, 37, 360)],
                         ids=lambda s: "x".join(map(str, s)))
def test_recurrent_weight_gradient_equals_numpy(library, product, dtype, shape, rng):
    steps, batch, units, width = shape
    h0 = rng.normal(size=(batch, units))
    h, dz = rng.normal(size=(steps, batch, units)), rng.normal(size=(steps, batch, width))
    du = library.keras_fancyrnn_recurrent_weight_grad(
        tf.constant(h0, dtype), tf.constant(h, dtype), tf.constant(dz, dtype),
        product=product).numpy()
    want = _recurrent_reference(h0, h, dz)
    assert du.shape == want.shape == (units, width)
    bound = _bound(dtype, steps * batch, _recurrent_reference(np.abs(h0), np.abs(h), np.abs(dz)))
    assert np.all(np.abs(du - want) <= bound)


def test_weight_gradients_of_empty_and_single_dimensions(library, product, rng):
    """No pairs give zeros; no rows or columns, an empty result."""
    for shape, n in [((4, 0, 3), 5), ((0, 3, 3), 5), ((4, 3, 0), 5), ((4, 3, 2), 0),
                     ((1, 1, 1), 1)]:
        x, dy = rng.normal(size=shape), rng.normal(size=(shape[1], shape[0], n))
        dw = library.keras_fancyrnn_project_weight_grad(
            tf.constant(x, "float32"), tf.constant(dy, "float32"), product=product).numpy()
        assert dw.shape == (shape[2], n)
        bound = _bound("float32", shape[0] * shape[1],
                       _projection_reference(np.abs(x), np.abs(dy), False, False, False))
        assert np.all(np.abs(dw - _projection_reference(x, dy, False, False, False)) <= bound)
    h0 = rng.normal(size=(3, 4)).astype("float32")
    du = library.keras_fancyrnn_recurrent_weight_grad(
        h0, np.zeros((0, 3, 4), "float32"), np.zeros((0, 3, 6), "float32"),
        product=product).numpy()
    np.testing.assert_array_equal(du, np.zeros((4, 6)))


def test_recurrent_weight_gradient_second_derivatives_equal_finite_differences(library, rng):
    """The op's own gradient (its equations in TensorFlow ops): finite differences with respect
    to all three inputs."""
    h0, h, dz = rng.normal(size=(3, 4)), rng.normal(size=(5, 3, 4)), rng.normal(size=(5, 3, 6))
    weights = rng.normal(size=(4, 6))

    def loss(h0, h, dz):
        return tf.reduce_sum(tf.sin(library.keras_fancyrnn_recurrent_weight_grad(h0, h, dz))
                             * weights)

    assert_tape_matches_finite_differences(loss, [h0, h, dz])


@pytest.mark.parametrize("attrs", [ATTRS[0], ATTRS[-1], ATTRS[3]],
                         ids=["plain", "all", "reversed"])
def test_projection_weight_gradient_second_derivatives_equal_finite_differences(library, attrs,
                                                                               rng):
    x, dy = rng.normal(size=(3, 4, 5)), rng.normal(size=(4, 3, 6))
    weights = rng.normal(size=(6, 5) if attrs["transpose_w"] else (5, 6))

    def loss(x, dy):
        dw = library.keras_fancyrnn_project_weight_grad(x, dy, **attrs)
        return tf.reduce_sum(tf.sin(dw) * weights)

    assert_tape_matches_finite_differences(loss, [x, dy])


def test_weight_gradients_reject_bad_shapes_naming_the_input(library):
    op = "KerasFancyrnnProjectWeightGrad"
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{op}: input dy must have shape \[7, 5, \?\], got \[5,7,8\]"):
        library.keras_fancyrnn_project_weight_grad(tf.zeros((5, 7, 3)), tf.zeros((5, 7, 8)))
    op = "KerasFancyrnnRecurrentWeightGrad"
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{op}: input h must have shape \[\?, 3, 4\], got \[6,3,5\]"):
        library.keras_fancyrnn_recurrent_weight_grad(tf.zeros((3, 4)), tf.zeros((6, 3, 5)),
                                                     tf.zeros((6, 3, 8)))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{op}: input dz must have shape \[6, 3, \?\], got \[5,3,8\]"):
        library.keras_fancyrnn_recurrent_weight_grad(tf.zeros((3, 4)), tf.zeros((6, 3, 4)),
                                                     tf.zeros((5, 3, 8)))
    with pytest.raises(ValueError, match="must be rank 3"):  # traced: the shape function's check
        tf.function(library.keras_fancyrnn_recurrent_weight_grad).get_concrete_function(
            tf.TensorSpec((3, 4)), tf.TensorSpec((6, 3, 4)), tf.TensorSpec((6, 8)))
