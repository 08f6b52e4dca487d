"""What a traced function's graph holds, for tests that check which path really ran."""

import tensorflow as tf


def traced_nodes(fn, *args) -> list:
    """Every node of ``tf.function(fn)`` traced on ``args``, its functions' bodies (loops,
    conditionals, gradients) included."""
    return graph_nodes(tf.function(fn).get_concrete_function(*args))


def graph_nodes(concrete) -> list:
    """Every node of a concrete function's graph, its library functions' bodies included."""
    graph_def = concrete.graph.as_graph_def()
    return list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]


def traced_ops(fn, *args) -> set[str]:
    """The op types of ``traced_nodes``."""
    return {n.op for n in traced_nodes(fn, *args)}
