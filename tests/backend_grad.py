"""Gradients on whichever Keras backend runs the tests, each by that backend's own differentiation
(TensorFlow's GradientTape, ``jax.value_and_grad``, torch autograd), so that tests marked
``all_backends`` can compare gradients without importing TensorFlow elsewhere.

``value_and_grad(fn, args)`` differentiates a function of tensors; ``layer_grads`` differentiates
a layer's call with respect to its inputs and its trainable weights through
``layer.stateless_call`` (the weights become arguments on every backend).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops, tree


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def value_and_grad(fn, args):
    """``fn(*args) -> (scalar, aux)``; returns ``(aux as numpy arrays, [∂scalar/∂arg] as numpy
    arrays)`` with ``args`` numpy arrays or tensors, differentiated by the backend."""
    backend = keras.config.backend()
    args = [ops.convert_to_tensor(a) for a in args]
    if backend == "jax":
        import jax

        # jit: one compilation of the whole computation, much faster than op by op
        (_, aux), grads = jax.jit(jax.value_and_grad(lambda *a: fn(*a),
                                                     argnums=tuple(range(len(args))),
                                                     has_aux=True))(*args)
    elif backend == "torch":
        import torch

        args = [a.detach().clone().requires_grad_(True) for a in args]
        value, aux = fn(*args)
        grads = torch.autograd.grad(value, args, allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(args, grads)]
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(args)
            value, aux = fn(*args)
        grads = [tf.zeros_like(a) if g is None else g
                 for a, g in zip(args, tape.gradient(value, args))]
    else:  # pragma: no cover - the matrix runs the three above
        raise NotImplementedError(f"no gradient helper for the {backend} backend")
    return tree.map_structure(to_numpy, aux), [to_numpy(g) for g in grads]


def weighted_sin_loss(outputs):
    """``Σ_i (i + 1) Σ sin(output_i)``: every output (and state) enters the loss with a distinct
    weight, and ``sin`` makes each element's gradient depend on its value."""
    flat = tree.flatten(outputs)
    return sum(ops.sum(ops.sin(o)) * (i + 1.0) for i, o in enumerate(flat)), flat


def layer_grads(layer, inputs, loss=weighted_sin_loss, **call_kw):
    """``(outputs, grads)`` of ``loss(layer(*inputs, **call_kw))``: the flat outputs and the
    gradients with respect to each of ``inputs`` then each trainable weight (in
    ``layer.trainable_variables`` order), as numpy arrays. Builds ``layer`` if needed."""
    inputs = [ops.convert_to_tensor(a) for a in inputs]
    if not layer.built:
        layer(*inputs, **call_kw)
    n = len(inputs)
    weights = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]

    def fn(*args):
        out, _ = layer.stateless_call(list(args[n:]), frozen, *args[:n], **call_kw)
        return loss(out)

    flat, grads = value_and_grad(fn, inputs + weights)
    return flat, grads
