"""One-call access to the task data sets: NumPy arrays from TFDS, and the baselines."""

# Annotations are evaluated (no ``from __future__ import annotations``): the API reference reads
# ``Task``'s fields from the class, where names of this module cannot be resolved later.

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from keras_fancyrnn import _tf
from keras_fancyrnn.datasets import _common
from keras_fancyrnn.datasets import adding_problem_dataset as _adding
from keras_fancyrnn.datasets import copy_memory_dataset as _copy
from keras_fancyrnn.datasets import temporal_order_dataset as _order


class Task(NamedTuple):
    """A long-range task: its TFDS builder, in-memory generator and token vocabulary."""

    builder: type[_common.TaskBuilder]
    generator: Callable[..., tuple[np.ndarray, np.ndarray]]
    min_length: int
    num_symbols: int | None
    """Size of the input token vocabulary, ``None`` for real-valued inputs."""


#: The tasks by TFDS name.
TASKS: dict[str, Task] = {
    "adding_problem": Task(_adding.AddingProblem, _adding.adding_problem, _adding.MIN_LENGTH, None),
    "copy_memory": Task(_copy.CopyMemory, _copy.copy_memory, _copy.MIN_LENGTH, _copy.NUM_CLASSES),
    "temporal_order": Task(
        _order.TemporalOrder, _order.temporal_order, _order.MIN_LENGTH, _order.NUM_SYMBOLS
    ),
}


def _check_name(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"name must be one of {list(TASKS)}, got {name!r}")
    return TASKS[name]


def baseline(name: str, length: int) -> _common.Baseline:
    """The trivial predictor's score on task ``name`` at time lag ``length``.

    * ``adding_problem``: MSE ``1/6`` (predict the constant 1);
    * ``copy_memory``: cross-entropy ``10 log(8) / (T + 20)`` nats per step (blanks, then uniform
      over the 8 symbols);
    * ``temporal_order``: accuracy ``0.25`` (any constant class).
    """
    task = _check_name(name)
    length = _common.check_int(length, "length", task.min_length)
    if name == "copy_memory":
        return _copy.baseline(length)
    return _adding.BASELINE if name == "adding_problem" else _order.BASELINE


def load_numpy(
    name: str,
    length: int = 100,
    split: str = "train",
    n: int | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    one_hot: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` NumPy arrays of a task's TFDS split, generating it into ``data_dir`` on first use.

    Generation is local and deterministic (no download); the arrays equal the first ``n`` examples
    of ``TASKS[name].generator(split_size, length, seed=split_seed(name, length, split))``. For a
    quick in-memory set with any ``T`` and no disk, call the generator (e.g.
    :func:`~keras_fancyrnn.datasets.adding_problem`) directly.

    Args:
      name: ``"adding_problem"``, ``"copy_memory"`` or ``"temporal_order"``.
      length: the time lag ``T``, one of :data:`~keras_fancyrnn.datasets.LENGTHS`.
      split: ``"train"`` or ``"test"``.
      n: the first ``n`` examples (``1 <= n <=`` the split size); ``None`` for all.
      data_dir: the TFDS data directory (``None``: TFDS's default, ``~/tensorflow_datasets``).
      one_hot: for the token tasks, return float32 one-hot inputs (``(..., 10)`` for copy_memory,
        ``(..., 6)`` for temporal_order) instead of int32 ids.

    Returns:
      ``(inputs, targets)`` with the shapes and dtypes of the builder's features, batched over the
      examples: adding ``(n, T, 2)`` float32 and ``(n,)`` float32; copy ``(n, T + 20)`` int32 twice;
      temporal order ``(n, T)`` int32 and ``(n,)`` int64.
    """
    _tf.require("keras_fancyrnn.datasets.load_numpy (TFDS)")
    task = _check_name(name)
    length = _common.check_length(length)
    split = _common.check_split(split)
    config = task.builder.builder_configs[f"length_{length}"]
    size = config.split_size(split)
    if n is not None:
        n = _common.check_int(n, "n", 1)
        if n > size:
            raise ValueError(
                f"n must be <= {size} (the size of {name}/{config.name} {split}), got {n}"
            )
    if one_hot and task.num_symbols is None:
        raise ValueError(
            f"one_hot applies to token inputs (copy_memory, temporal_order), not {name}"
        )
    builder = tfds.builder(f"{name}/{config.name}", data_dir=data_dir)
    builder.download_and_prepare()
    dataset = builder.as_dataset(
        split=split if n is None else f"{split}[:{n}]", batch_size=-1, as_supervised=True
    )
    inputs, targets = tfds.as_numpy(dataset)
    if one_hot:
        inputs = _common.to_one_hot(inputs, task.num_symbols)
    return inputs, targets
