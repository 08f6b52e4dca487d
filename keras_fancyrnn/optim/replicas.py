"""``ClippingOptimizer``'s TensorFlow-only parts: the replicas of ``tf.distribute``, and XLA.

Keras clips each replica's gradient before the sum; ``ClippingOptimizer`` sums the gradient over
replicas first (:func:`sum_over_replicas`), clips the sum, and hands the inner optimizer the clipped
sum on replica 0 and zeros elsewhere (:func:`first_replica_only`), so that the inner optimizer's
own sum over replicas is exactly the clipped gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

__all__ = [
    "check_replica_context",
    "cross_replica_cond",
    "densify",
    "first_replica_only",
    "in_xla_context",
    "needs_merge_call",
    "sum_over_replicas",
]


def in_xla_context() -> bool:
    """Whether the current trace is compiled by XLA, which drops in-graph assertions."""
    try:  # private TF helper; only used to decide whether to warn
        from tensorflow.python.ops import control_flow_util

        from keras_fancyrnn._tf import tf

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # pragma: no cover
        return False


def check_replica_context() -> None:
    """``apply`` runs once per replica (inside ``strategy.run``), never in cross-replica context."""
    from keras_fancyrnn._tf import tf

    if tf.distribute.in_cross_replica_context():
        raise ValueError(
            "ClippingOptimizer.apply must be called in a replica context (inside "
            "strategy.run), got a cross-replica context"
        )


def densify(grads: list[Any]) -> list[Any]:
    """``IndexedSlices`` gradients (e.g. of an embedding) as dense tensors, which clipping needs."""
    from keras_fancyrnn._tf import tf

    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


def sum_over_replicas(grads: list[Any]) -> list[Any]:
    """The gradient of the whole batch: ``grads`` summed over replicas (unchanged on one)."""
    from keras_fancyrnn._tf import tf

    ctx = tf.distribute.get_replica_context()
    if ctx.num_replicas_in_sync == 1:
        return grads
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)


def first_replica_only(grads: list[Any]) -> list[Any]:
    """Under tf.distribute, zero the gradient on all replicas but the first: the inner
    optimizer sums over replicas, and the sum must be the (already summed) clipped gradient."""
    if keras.backend.backend() != "tensorflow":
        return grads
    from keras_fancyrnn._tf import tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return grads
    first = tf.equal(ctx.replica_id_in_sync_group, 0)
    return [tf.where(first, g, tf.zeros_like(g)) for g in grads]


def needs_merge_call() -> bool:
    """Whether the strategy needs a branch that calls ``merge_call`` (as ``inner_optimizer.apply``
    does) to be built in cross-replica context (:func:`cross_replica_cond`)."""
    from keras_fancyrnn._tf import tf

    return not tf.__internal__.distribute.strategy_supports_no_merge_call()


def cross_replica_cond(
    distribution: Any,
    *args: Any,
    proceed: Callable[..., Any] | None,
    step: Callable[..., Any],
    skip: Callable[..., Any],
) -> None:
    """In cross-replica context, run ``step(*args)`` on every replica if ``proceed(*args)`` (always
    if ``proceed`` is None), else ``skip(*args)``. Every replica holds the same summed gradient,
    hence takes the same decision: the first replica's is used."""
    from keras_fancyrnn._tf import tf

    def per_replica(fn: Callable[..., Any]) -> Any:
        return distribution.extended.call_for_each_replica(fn, args=args)

    if proceed is None:
        per_replica(step)
        return
    decision = distribution.experimental_local_results(per_replica(proceed))[0]
    tf.cond(decision, lambda: per_replica(step), lambda: per_replica(skip))
