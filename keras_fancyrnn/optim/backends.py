"""``ClippingOptimizer``'s parts that differ between Keras backends, outside TensorFlow's
``tf.distribute`` (``optim/replicas.py``).

The skip decision. TensorFlow and torch branch with ``ops.cond`` (a graph cond, a Python ``if``).
A JAX ``cond`` traces its branches into pure functions: a branch that assigns Keras variables
would leak values out of its trace, and the JAX trainer calls the step inside
``stateless_apply`` under ``jax.jit``. There :func:`select_step` runs both branches one after
the other from the same state and keeps, for every variable, the value of the branch that
``proceed`` chose (``ops.where``), so nothing is assigned inside a traced branch.

Enforcing ``max_consecutive_skips``: a step that runs eagerly (torch, JAX outside ``jax.jit``)
raises at the step, TensorFlow's asserts in its graph; a step compiled by XLA or traced by
``jax.jit`` cannot raise, and ``ClippingStats`` raises after the batch instead
(:func:`compiled_step`). During ``fit`` the JAX trainer holds the variables' values
(:func:`held_by_jax_trainer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

from keras_fancyrnn.optim import replicas

__all__ = ["compiled_step", "held_by_jax_trainer", "select_step"]


def select_step(
    proceed: Any, state: Sequence[Any], step: Callable[[], None], skip: Callable[[], None]
) -> None:
    """``step()`` if ``proceed`` else ``skip()``, without a branch: both run from the same values
    of the variables ``state`` (every variable either may assign), then each variable keeps the
    value of the chosen one. Values are only read and assigned, never changed in place, so this
    suits backends whose arrays are immutable (JAX); a skip keeps the old values bit for bit."""
    before = [v.value for v in state]
    step()
    stepped = [v.value for v in state]
    for v, value in zip(state, before, strict=True):
        v.assign(value)
    skip()
    for v, value in zip(state, stepped, strict=True):
        v.assign(ops.where(proceed, value, v.value))


def _jax_traced(value: Any) -> bool:
    import jax

    return isinstance(value, jax.core.Tracer)


def compiled_step(value: Any) -> bool:
    """Whether the step that computes ``value`` is compiled, so that it cannot raise from inside:
    traced by ``jax.jit`` on JAX, compiled by XLA on TensorFlow. Torch steps run in Python."""
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_traced(value)
    if backend == "tensorflow":
        return replicas.in_xla_context()
    return False


def held_by_jax_trainer(variable: Any) -> bool:
    """Whether ``variable``'s value is held by the JAX trainer: during ``fit`` it detaches the
    values from the variables (Keras's private ``_value`` is None) until ``Callback.model`` or the
    end of the epoch attaches them again."""
    return keras.backend.backend() == "jax" and getattr(variable, "_value", 0) is None
