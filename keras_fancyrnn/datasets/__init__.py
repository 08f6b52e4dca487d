"""Long-range dependency tasks as TensorFlow Datasets builders, and a char-level text loader.

Importing this package registers three TFDS builders, each with configs ``length_<T>`` for ``T`` in
:data:`LENGTHS` and ``train``/``test`` splits generated locally from fixed seeds (no download):

* ``adding_problem`` — :class:`AddingProblem`, :func:`adding_problem` (baseline MSE 1/6);
* ``copy_memory`` — :class:`CopyMemory`, :func:`copy_memory` (baseline CE ``10 log 8 / (T + 20)``);
* ``temporal_order`` — :class:`TemporalOrder`, :func:`temporal_order` (baseline accuracy 25 %).

Three ways in::

    import tensorflow_datasets as tfds
    import keras_fancyrnn.datasets as frd

    ds = tfds.load("adding_problem/length_100", split="train", as_supervised=True)  # tf.data
    x, y = frd.load_numpy("adding_problem", length=100, split="test")             # NumPy, cached
    x, y = frd.adding_problem(n=512, length=100, seed=0)                          # NumPy, in memory

and :func:`text_dataset` / :func:`tiny_shakespeare` for character-level language modelling.
"""

from keras_fancyrnn.datasets._common import (
    LENGTHS,
    SPLITS,
    Baseline,
    LengthConfig,
    split_seed,
)
from keras_fancyrnn.datasets._load import TASKS, Task, baseline, load_numpy
from keras_fancyrnn.datasets.adding_problem_dataset import AddingProblem, adding_problem
from keras_fancyrnn.datasets.copy_memory_dataset import CopyMemory, copy_memory
from keras_fancyrnn.datasets.temporal_order_dataset import TemporalOrder, temporal_order
from keras_fancyrnn.datasets.text import (
    CharVocabulary,
    DatasetUnavailableError,
    read_text,
    text_dataset,
    tiny_shakespeare,
)

__all__ = [
    "LENGTHS",
    "SPLITS",
    "TASKS",
    "AddingProblem",
    "Baseline",
    "CharVocabulary",
    "CopyMemory",
    "DatasetUnavailableError",
    "LengthConfig",
    "Task",
    "TemporalOrder",
    "adding_problem",
    "baseline",
    "copy_memory",
    "load_numpy",
    "read_text",
    "split_seed",
    "temporal_order",
    "text_dataset",
    "tiny_shakespeare",
]
