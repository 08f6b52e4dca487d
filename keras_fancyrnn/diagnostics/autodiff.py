"""The probe pass's differentiation, by each backend's own, behind one interface.

``gradients(forward)``: ``forward(source)`` runs the model with zero probes that it takes from
``source`` (``ProbeSource.zeros``, in the order the layers ask for them) and returns ``(total
loss, aux)``; the result is ``(grads, aux)``, ``grads[i]`` the gradient of the total loss with
respect to the ``i``-th probe handed out (zeros where the loss does not depend on it).

* TensorFlow: the probes are watched on a ``tf.GradientTape``.
* JAX: the probes are the arguments of the differentiated function (``jax.grad``); their shapes
  come from a shape-only run of ``forward`` (``jax.eval_shape``) first.
* PyTorch: the probes require grad and ``torch.autograd.grad`` differentiates with respect to them.

``compile_pass(body, variables)`` makes ``run(args, loss_scale)`` of a pass ``body(x, y,
sample_weight, loss_scale)``: on TensorFlow a ``tf.function`` traced once per input signature with
the batch size left unknown; on JAX one ``jax.jit`` function, and on PyTorch an eager call, both
inside a ``keras.StatelessScope`` that maps every variable of ``variables()`` to its current value
passed in as an argument. So a compiled pass never bakes in weights that training has changed
since, no variable is differentiated (on PyTorch the values are detached), and whatever the
forward pass writes (stateful layers' states, BatchNorm statistics) is discarded with the scope.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops, tree


class ProbeSource:
    """Hands out the probes of one pass: zeros made on request (``prepare`` applied: watched,
    requiring grad), or the tensors ``given``, in request order."""

    def __init__(self, given: list | None = None, prepare: Callable = lambda p: p):
        self.given = given
        self.prepare = prepare
        self.made: list = []

    def zeros(self, shape, dtype) -> int:
        """A zero probe of ``shape``, ``dtype``; returns its index (``self.made[index]``)."""
        if self.given is not None:
            probe = self.given[len(self.made)]
        else:
            probe = self.prepare(ops.zeros(shape, dtype))
        self.made.append(probe)
        return len(self.made) - 1


def gradients(forward: Callable) -> tuple[list, object]:
    """``(grads, aux)``: the gradients of ``forward``'s total loss w.r.t. its probes (module
    docstring)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tf_gradients(forward)
    if backend == "jax":
        return _jax_gradients(forward)
    if backend == "torch":
        return _torch_gradients(forward)
    raise NotImplementedError(f"the probe pass does not support the {backend!r} backend")


def _tf_gradients(forward):
    from keras_fancyrnn._tf import tf

    with tf.GradientTape(watch_accessed_variables=False) as tape:
        def watched(probe):
            tape.watch(probe)
            return probe

        source = ProbeSource(prepare=watched)
        total, aux = forward(source)
    grads = tape.gradient(total, source.made,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return list(grads), aux


def _jax_gradients(forward):
    import jax

    def shapes_only():
        source = ProbeSource()
        forward(source)
        return source.made

    zeros = [ops.zeros(s.shape, s.dtype) for s in jax.eval_shape(shapes_only)]
    if not zeros:
        return [], forward(ProbeSource(given=[]))[1]
    grads, aux = jax.grad(lambda probes: forward(ProbeSource(given=probes)), has_aux=True)(zeros)
    return list(grads), aux


def _torch_gradients(forward):
    import torch

    source = ProbeSource(prepare=lambda p: p.requires_grad_(True))
    with torch.enable_grad():
        total, aux = forward(source)
        grads = [None] * len(source.made)
        if source.made and total.requires_grad:
            grads = torch.autograd.grad(total, source.made, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(source.made, grads)]
    return grads, tree.map_structure(lambda a: a.detach(), aux)


def compile_pass(body: Callable, variables: Callable[[], list]) -> Callable:
    """``run(args, loss_scale)`` of the pass ``body(*args, loss_scale)`` (module docstring);
    ``variables()``: every variable the pass may read, in a stable order."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _TFPass(body)

    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables(), values))):
            return body(*args)

    if backend == "jax":
        import jax

        stateless = jax.jit(stateless)

    def run(args, loss_scale):
        # detached (PyTorch): the pass differentiates the probes only
        values = [ops.stop_gradient(v.value) for v in variables()]
        return stateless(values, *_tensors(args), ops.convert_to_tensor(loss_scale, "float32"))

    return run


def _tensors(args):
    return tree.map_structure(lambda a: None if a is None else ops.convert_to_tensor(a), args)


class _TFPass:
    """The pass as a ``tf.function``: one trace per input signature, batch size unknown (one
    trace serves every probe batch size; and a batch of unknown size is what Keras's own
    training step sees, so the layers run the code path they run in fit)."""

    def __init__(self, body):
        from keras_fancyrnn._tf import tf

        self._fn = tf.function(body, jit_compile=False)
        self._concrete: dict = {}

    def __call__(self, args, loss_scale):
        from keras_fancyrnn._tf import tf

        args = tf.nest.map_structure(
            lambda a: a if a is None or isinstance(a, tf.Tensor) else tf.convert_to_tensor(a),
            args)
        specs = tf.nest.map_structure(
            lambda t: None if t is None else tf.TensorSpec((None, *t.shape[1:]), t.dtype), args
        )
        key = repr(specs)
        if key not in self._concrete:
            self._concrete[key] = self._fn.get_concrete_function(
                *specs, tf.TensorSpec((), tf.float32))
        return self._concrete[key](*args, tf.constant(loss_scale, tf.float32))


__all__ = ["ProbeSource", "compile_pass", "gradients"]
