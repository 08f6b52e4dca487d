"""The input projection op (``KerasFancyrnnProject``, ``keras_fancyrnn.ops.native.project``)
against numpy's product of the swapped, reversed arrays, its gradients against float64 finite
differences (first and second order), and its errors."""


import numpy as np
import pytest
import tensorflow as tf
from gradcheck import assert_tape_matches_finite_differences
from kernel_kinds import PROJECT_ATTRS, PROJECT_OP, needs_compiler

from keras_fancyrnn.ops import native

pytestmark = needs_compiler("the layers run their plain ops")

ATTRS = PROJECT_ATTRS


def _reference(x, w, transpose_w, reverse_0, reverse_1):
    """``y[q, p] = x[p', q'] w`` in float64: the axes swapped, then read backwards as asked."""
    rows = np.swapaxes(x, 0, 1)
    if reverse_1:
        rows = rows[::-1]
    if reverse_0:
        rows = rows[:, ::-1]
    return rows @ (w.T if transpose_w else w)


def _inputs(rng, shape, n, transpose_w):
    x = rng.normal(size=shape)
    w = rng.normal(size=(n, shape[-1]) if transpose_w else (shape[-1], n))
    return x, w


@pytest.mark.parametrize("attrs", ATTRS, ids=lambda a: "-".join(k for k, v in a.items() if v)
                         or "plain")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_projection_equals_numpy(library, product, dtype, attrs, rng):
    """Row counts that are not multiples of a register block's height and widths that end in a
    partial panel: every block height and the masked columns run."""
    x, w = _inputs(rng, (13, 9, 37), 53, attrs["transpose_w"])
    y = library.keras_fancyrnn_project(tf.constant(x, dtype), tf.constant(w, dtype),
                                       product=product, **attrs).numpy()
    want = _reference(x, w, **attrs)
    assert y.shape == want.shape == (9, 13, 53)
    # each value is a 37-term dot product: rounded within K u sum |x_k w_k| (Higham, Thm 3.1),
    # plus the rounding of x and w to dtype
    u = np.finfo(dtype).eps / 2
    bound = (37 + 2) * u * _reference(np.abs(x), np.abs(w), **attrs)
    assert np.all(np.abs(y - want) <= bound)


def test_projection_of_empty_and_single_dimensions(library, rng):
    for shape, n in [((4, 3, 0), 5), ((0, 3, 2), 5), ((4, 0, 2), 5), ((1, 1, 1), 1),
                     ((2, 7, 3), 0)]:
        x, w = _inputs(rng, shape, n, False)
        y = library.keras_fancyrnn_project(tf.constant(x, "float32"),
                                           tf.constant(w, "float32")).numpy()
        np.testing.assert_allclose(y, _reference(x, w, False, False, False), rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("attrs", ATTRS, ids=lambda a: "-".join(k for k, v in a.items() if v)
                         or "plain")
def test_projection_gradients_equal_finite_differences(library, attrs, rng):
    x, w = _inputs(rng, (3, 4, 5), 6, attrs["transpose_w"])
    weights = rng.normal(size=(4, 3, 6))  # a loss that weighs every output differently

    def loss(x, w):
        y = library.keras_fancyrnn_project(x, w, **attrs)
        return tf.reduce_sum(tf.sin(y) * weights)

    assert_tape_matches_finite_differences(loss, [x, w])


@pytest.mark.parametrize("attrs", [ATTRS[0], ATTRS[-1]], ids=["plain", "all"])
def test_projection_second_derivatives_equal_finite_differences(library, attrs, rng):
    """The gradient's own gradient (the op again, and TensorFlow's matmul for ``w``): finite
    differences of the first derivative with respect to both inputs."""
    x, w = _inputs(rng, (3, 4, 5), 6, attrs["transpose_w"])

    def penalty(x, w):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            loss = tf.reduce_sum(tf.sin(library.keras_fancyrnn_project(x, w, **attrs)))
        dx, dw = tape.gradient(loss, [x, w])
        return tf.reduce_sum(dx ** 2) + tf.reduce_sum(tf.cos(dw))

    assert_tape_matches_finite_differences(penalty, [x, w], rtol=1e-5, atol=1e-7)


def test_project_goes_backwards_like_reversing_the_time_major_input(rng):
    x = rng.normal(size=(5, 7, 3)).astype("float32")
    w = rng.normal(size=(3, 8)).astype("float32")
    forward = native.project(tf.constant(x), tf.constant(w)).numpy()
    backward = native.project(tf.constant(x), tf.constant(w), go_backwards=True).numpy()
    np.testing.assert_allclose(backward, forward[::-1], rtol=0, atol=0)
    np.testing.assert_allclose(forward, np.swapaxes(x, 0, 1) @ w, rtol=1e-5, atol=1e-5)


def test_projection_rejects_bad_shapes_naming_the_input(library):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{PROJECT_OP}: input w must have shape \[3, 8\], got \[4,8\]"):
        library.keras_fancyrnn_project(tf.zeros((5, 7, 3)), tf.zeros((4, 8)))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{PROJECT_OP}: input w must have shape \[8, 3\], got \[8,4\]"):
        library.keras_fancyrnn_project(tf.zeros((5, 7, 3)), tf.zeros((8, 4)), transpose_w=True)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{PROJECT_OP}: input x must have shape \[\?, \?, \?\], got \[5,3\]"):
        library.keras_fancyrnn_project(tf.zeros((5, 3)), tf.zeros((3, 8)))
    with pytest.raises(ValueError, match="must be rank 3"):  # traced: the shape function's check
        tf.function(library.keras_fancyrnn_project).get_concrete_function(
            tf.TensorSpec((5, 3)), tf.TensorSpec((3, 8)))
