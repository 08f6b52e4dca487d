"""Shared pieces of the long-range task datasets: validation, seeding, the TFDS base builder.

Every task is one function used twice: a pure NumPy generator (``adding_problem(n, T, seed)`` and
friends) that returns in-memory arrays, and a TFDS builder that streams the same generator into
TFRecords. The generator draws its examples in blocks of :data:`BLOCK_SIZE`, block ``b`` from
``numpy.random.default_rng([seed, b])``, so that

* the output is a pure function of ``(n, T, seed)``, on every platform and NumPy version that keeps
  ``PCG64`` stable (NumPy promises this for ``default_rng``), and
* it is *prefix-stable*: ``f(m, T, seed)`` equals the first ``m`` examples of ``f(n, T, seed)`` for
  any ``m <= n``. A TFDS split is ``f(split_size, T, split_seed(name, T, split))`` in that order
  (the builders disable TFDS's shuffling), so the first ``m`` examples of a split can be
  regenerated in memory without TFDS.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import numbers
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

#: The sequence lengths (time lags ``T``) published as TFDS configs ``length_<T>``.
LENGTHS: tuple[int, ...] = (50, 100, 200, 400, 750, 1000)

#: The splits every task builder generates.
SPLITS: tuple[str, ...] = ("train", "test")

#: Number of examples drawn from one seeded generator (see the module docstring).
BLOCK_SIZE = 1024

_CITATIONS = {
    "hochreiter1997": """\
@article{hochreiter1997long,
  title={Long Short-Term Memory},
  author={Hochreiter, Sepp and Schmidhuber, J{\\"u}rgen},
  journal={Neural Computation},
  volume={9},
  number={8},
  pages={1735--1780},
  year={1997}
}""",
    "pascanu2013": """\
@inproceedings{pascanu2013difficulty,
  title={On the difficulty of training recurrent neural networks},
  author={Pascanu, Razvan and Mikolov, Tomas and Bengio, Yoshua},
  booktitle={International Conference on Machine Learning (ICML)},
  pages={1310--1318},
  year={2013}
}""",
    "le2015": """\
@article{le2015simple,
  title={A Simple Way to Initialize Recurrent Networks of Rectified Linear Units},
  author={Le, Quoc V. and Jaitly, Navdeep and Hinton, Geoffrey E.},
  journal={arXiv preprint arXiv:1504.00941},
  year={2015}
}""",
    "arjovsky2016": """\
@inproceedings{arjovsky2016unitary,
  title={Unitary Evolution Recurrent Neural Networks},
  author={Arjovsky, Martin and Shah, Amar and Bengio, Yoshua},
  booktitle={International Conference on Machine Learning (ICML)},
  pages={1120--1128},
  year={2016}
}""",
}


def citation(*keys: str) -> str:
    """BibTeX entries of the given papers (keys of ``_CITATIONS``), blank-line separated."""
    return "\n\n".join(_CITATIONS[key] for key in keys)


# --------------------------------------------------------------------------------------------------
# Validation


def check_int(value: Any, name: str, minimum: int) -> int:
    """Returns ``value`` as an ``int`` if it is an integer ``>= minimum``, else raises.

    Booleans are rejected (``True`` is an ``int`` in Python, but never a meaningful size).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        if minimum == 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_seed(seed: Any) -> int:
    """Returns ``seed`` as a non-negative ``int``, else raises (``None`` is not allowed: the tasks
    are meant to be reproducible; pass e.g. ``seed=0``)."""
    return check_int(seed, "seed", 0)


def check_length(length: Any) -> int:
    """Returns ``length`` if it is one of :data:`LENGTHS` (the published TFDS configs)."""
    is_int = isinstance(length, numbers.Integral) and not isinstance(length, bool)
    if not is_int or length not in LENGTHS:
        raise ValueError(f"length must be one of {list(LENGTHS)}, got {length!r}")
    return int(length)


def check_split(split: Any) -> str:
    """Returns ``split`` if it is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return split


def split_seed(name: str, length: int, split: str) -> int:
    """The fixed seed of one TFDS split: CRC-32 of ``"<name>/length_<T>/<split>"``.

    Train and test of every config get different, independent streams; regenerate a split's first
    ``n`` examples in memory with ``generator(n, length, seed=split_seed(name, length, split))``.
    """
    check_split(split)
    return zlib.crc32(f"{name}/length_{length}/{split}".encode())


def generate_blocks(
    block_fn: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
    n: int,
    seed: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x, y)`` blocks of :data:`BLOCK_SIZE` examples (the last one cut to make ``n``).

    Block ``b`` is ``block_fn(numpy.random.default_rng([seed, b]), BLOCK_SIZE)``; it is always
    drawn at full size and then cut, which is what makes the generators prefix-stable.
    """
    for start in range(0, n, BLOCK_SIZE):
        rng = np.random.default_rng([seed, start // BLOCK_SIZE])
        x, y = block_fn(rng, BLOCK_SIZE)
        stop = min(BLOCK_SIZE, n - start)
        yield x[:stop], y[:stop]


def generate(
    block_fn: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
    n: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """All ``n`` examples of :func:`generate_blocks` as two arrays."""
    xs, ys = zip(*generate_blocks(block_fn, n, seed), strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def to_one_hot(tokens: np.ndarray, depth: int) -> np.ndarray:
    """float32 one-hot encoding of integer ``tokens`` along a new last axis of size ``depth``."""
    return np.eye(depth, dtype=np.float32)[tokens]


# --------------------------------------------------------------------------------------------------
# Baselines


class Baseline(NamedTuple):
    """The score of the trivial predictor on a task: the number a model must beat."""

    metric: str
    """``"mse"``, ``"cross_entropy"`` (mean over time steps, nats) or ``"accuracy"``."""
    value: float
    predictor: str
    """What the trivial predictor predicts."""


# --------------------------------------------------------------------------------------------------
# TFDS


@dataclasses.dataclass(eq=False)
class LengthConfig(tfds.core.BuilderConfig):
    """A task at one time lag ``length`` (``T``), with the number of examples of each split.

    The published configs are ``length_<T>`` for ``T`` in :data:`LENGTHS`, with the builder's
    default split sizes. For another ``T`` or size, pass a config of your own with a new name::

        config = LengthConfig(name="length_100_n100k", length=100, train_size=100_000)
        builder = tfds.builder("adding_problem", config=config)

    Its splits start with the same examples as the published config of that length (the seed
    depends on the task, ``length`` and split only).
    """

    length: int = 100
    train_size: int = 10_000
    test_size: int = 1_000

    def split_size(self, split: str) -> int:
        """The number of examples in ``split``."""
        return {"train": self.train_size, "test": self.test_size}[check_split(split)]


class TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the long-range task builders: configs ``length_<T>``, local deterministic generation.

    A subclass sets ``name``, ``VERSION``, ``RELEASE_NOTES``, ``BUILDER_CONFIGS`` (from
    :meth:`make_configs`) and implements :meth:`_info`, :meth:`block` and :meth:`to_example`.
    Nothing is downloaded: ``_split_generators`` ignores the download manager.
    """

    builder_config: LengthConfig

    #: Smallest time lag for which the task is defined (set by each task).
    MIN_LENGTH: int = 1
    #: ``tfds.load("<name>")`` without a config loads ``length_100``.
    DEFAULT_BUILDER_CONFIG_NAME = "length_100"

    def __init__(self, *, config: str | LengthConfig | None = None, **kwargs: Any) -> None:
        """As ``tfds.core.GeneratorBasedBuilder``, with clear errors for a bad ``config``.

        ``config`` is a published name ``length_<T>``, or a custom :class:`LengthConfig` (any
        ``length >= MIN_LENGTH`` and split sizes; give it a name of its own, e.g.
        ``"length_100_n100000"``, so that its data lives in its own directory).
        """
        names = [c.name for c in self.BUILDER_CONFIGS]
        if isinstance(config, str) and config not in names:
            raise ValueError(
                f"config must be one of {names} (length must be one of {list(LENGTHS)}), "
                f"got {config!r}"
            )
        if isinstance(config, LengthConfig):
            check_int(config.length, "length", self.MIN_LENGTH)
            check_int(config.train_size, "train_size", 1)
            check_int(config.test_size, "test_size", 1)
        super().__init__(config=config, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The file defining the builder.

        TFDS 4.9.10 computes this through ``importlib_resources``, a package it uses but does not
        declare (tensorflow/datasets#11212), so ``download_and_prepare`` fails without it. Our
        builders live in ordinary modules, so ``inspect.getfile`` is exact and needs nothing extra.
        """
        return epath.Path(inspect.getfile(cls))

    @classmethod
    def make_configs(cls, train_size: int, test_size: int, what: str) -> list[LengthConfig]:
        """One :class:`LengthConfig` per length in :data:`LENGTHS`."""
        return [
            LengthConfig(
                name=f"length_{length}",
                description=f"{what}, T = {length}; {train_size} train / {test_size} test.",
                length=length,
                train_size=train_size,
                test_size=test_size,
            )
            for length in LENGTHS
        ]

    @staticmethod
    @abc.abstractmethod
    def block(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Draws ``n`` examples ``(x, y)`` of the task at time lag ``length`` from ``rng``."""

    @abc.abstractmethod
    def to_example(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """One example's feature dict."""

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Generated locally: nothing to download.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        length = config.length

        def block_fn(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
            return self.block(rng, n, length)

        seed = split_seed(self.name, length, split)
        index = 0
        for xs, ys in generate_blocks(block_fn, config.split_size(split), seed):
            for x, y in zip(xs, ys, strict=True):
                yield index, self.to_example(x, y)
                index += 1
