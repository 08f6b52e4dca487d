"""Where the gradient monitor's probe batches come from: its ``data`` argument (a tuple of arrays,
a ``tf.data.Dataset``, a ``keras.utils.PyDataset``, a generator or a callable) made into one
``next()`` of ``(x, y, sample_weight)`` batches, with the checks that a source gives batches and
not single examples (``ProbeDataError`` where it does not).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import keras
from keras import ops, tree

from keras_fancyrnn.diagnostics.probe_pass import _leading_size, _shapes
from keras_fancyrnn.errors import ProbeDataError


@dataclasses.dataclass
class Source:
    """``next()`` gives a batch ``(x, y, sample_weight)``; ``static_batch``: its batch size where
    known before one is drawn; ``spec``: a dataset's ``(x, y, sample_weight)`` element specs."""

    next: Callable[[], tuple]
    static_batch: int | None = None
    spec: tuple | None = None


def unpack(element, where: str):
    if isinstance(element, dict) or not isinstance(element, (tuple, list)) or not 2 <= len(
        element
    ) <= 3:
        raise ProbeDataError(
            f"data: {where} must give (x, y) or (x, y, sample_weight), got "
            f"{type(element).__name__}"
            + (f" of length {len(element)}" if isinstance(element, (tuple, list)) else "")
        )
    x, y = element[0], element[1]
    return x, y, (element[2] if len(element) == 3 else None)


def _model_input_ranks(model) -> list[int] | None:
    try:
        return [len(spec.shape) for spec in model.inputs]
    except (AttributeError, TypeError, ValueError):  # a subclassed model has no declared inputs
        return None


def check_batched(x, y, sample_weight, model=None, where: str | None = None) -> None:
    """Raises ``ProbeDataError`` when a dataset element (or its spec) is not a batch: a component
    without a leading axis, components whose leading sizes differ, or an ``x`` with one axis fewer
    than every input of ``model``. A dataset of single examples gives such elements; without this
    check the first record would fail on mismatched shapes, far from the cause."""
    parts = {"x": _shapes(x), "y": _shapes(y), "sample_weight": _shapes(sample_weight)}
    flat = [shape for shapes in parts.values() for shape in shapes]
    leading = {shape[0] for shape in flat if shape and shape[0] is not None}
    single = any(not shape for shape in flat) or len(leading) > 1
    ranks = None if model is None else _model_input_ranks(model)
    if not single and ranks and len(ranks) == len(parts["x"]):
        single = all(len(shape) == rank - 1 for shape, rank in zip(parts["x"], ranks))
    if single:
        got = ", ".join(f"{name} {shapes[0] if len(shapes) == 1 else shapes}"
                        for name, shapes in parts.items() if shapes)
        hint = ("call .batch(n) on it, e.g. data=dataset.batch(32)" if where is None
                else "give whole batches")
        raise ProbeDataError(
            f"data: {where or 'a tf.data.Dataset'} must yield batches (x of shape [batch, time, "
            "...] and y, sample_weight with the same leading batch axis), but its elements look "
            f"like single examples ({got}); {hint}"
        )


def _is_tf_dataset(data) -> bool:
    """A ``tf.data.Dataset`` (without importing TensorFlow: none exists if it is not imported)."""
    tensorflow = sys.modules.get("tensorflow")
    return tensorflow is not None and isinstance(data, tensorflow.data.Dataset)


def _as_tensor(a):
    """``a`` as a tensor of the backend (kept as it is if it already is one)."""
    if a is None or ops.is_tensor(a):
        return a
    return ops.convert_to_tensor(a)


def _cycled(data, where: str, model_of: Callable):
    """``next()`` of a source of batches: a ``keras.utils.PyDataset`` (indexed, cycled) or an
    iterator / generator (which cannot restart: exhausted, it raises)."""
    state = {"i": 0}

    def from_py_dataset():
        if len(data) == 0:
            raise ProbeDataError(f"data: {where} is empty; it must give at least one batch")
        element = unpack(data[state["i"] % len(data)], where)
        state["i"] += 1
        check_batched(*element, model=model_of(), where=where)
        return element

    def from_iterator():
        try:
            element = unpack(next(data), where)
        except StopIteration:
            raise ProbeDataError(
                f"data: {where} is exhausted (a generator cannot start again); pass one that "
                "never ends, a keras.utils.PyDataset, or a callable that returns a batch"
            ) from None
        check_batched(*element, model=model_of(), where=where)
        return element

    return from_py_dataset if isinstance(data, keras.utils.PyDataset) else from_iterator


def _from_dataset(data) -> Source:
    spec = unpack(data.element_spec, "the dataset")
    check_batched(*spec)
    state = {"it": None}

    def from_dataset():
        for _ in range(2):
            if state["it"] is None:
                state["it"] = iter(data)
            try:
                element = unpack(next(state["it"]), "the dataset")
            except StopIteration:
                state["it"] = None
                continue
            check_batched(*element)  # sizes the spec left unknown
            return element
        raise ProbeDataError("data: the dataset is empty; it must yield at least one batch")

    return Source(from_dataset, _leading_size(spec[0]), spec)


def make_source(data, model_of: Callable) -> Source:
    """The ``Source`` of the monitor's ``data``; ``model_of()`` gives the model once known (its
    input ranks tell a batch from a single example)."""
    if _is_tf_dataset(data):
        return _from_dataset(data)
    if isinstance(data, keras.utils.PyDataset):
        return Source(_cycled(data, "the PyDataset", model_of))
    if hasattr(data, "__next__"):
        return Source(_cycled(data, "the generator", model_of))
    if callable(data) and not isinstance(data, (tuple, list)):
        return Source(lambda: unpack(data(), "the callable"))
    if isinstance(data, (tuple, list)):
        x, y, sw = unpack(data, "data")
        fixed = (tree.map_structure(_as_tensor, x), tree.map_structure(_as_tensor, y),
                 None if sw is None else tree.map_structure(_as_tensor, sw))
        return Source(lambda: fixed, _leading_size(fixed[0]))
    raise ProbeDataError(
        "data must be a tuple (x, y) or (x, y, sample_weight), a tf.data.Dataset, "
        "keras.utils.PyDataset or generator of such batches, or a callable returning one, "
        f"got {type(data).__name__}"
    )


__all__ = ["Source", "check_batched", "make_source", "unpack"]
