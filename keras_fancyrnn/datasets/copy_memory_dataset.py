"""The copy memory task (Hochreiter & Schmidhuber 1997; Arjovsky, Shah & Bengio 2016).

Tokens: ``0`` blank, ``1..8`` the symbols, ``9`` the delimiter (10 classes). An input sequence of
length ``T + 20`` is

* positions ``0..9``: 10 symbols drawn uniformly from ``{1, ..., 8}``,
* positions ``10..T+8``: ``T - 1`` blanks,
* position ``T + 9``: the delimiter,
* positions ``T+10..T+19``: 10 blanks,

and the target sequence is ``T + 10`` blanks followed by the 10 symbols: after the delimiter the
model must reproduce, in order, what it saw ``T + 10`` steps earlier.

.. math::

    x = (s_1, \\dots, s_{10}, 0^{T-1}, 9, 0^{10}), \\qquad y = (0^{T+10}, s_1, \\dots, s_{10}),
    \\qquad s_k \\sim U\\{1, \\dots, 8\\}.

Baseline (Arjovsky et al. 2016): predict the blank with certainty for the first ``T + 10`` steps
and a uniform distribution over the 8 symbols for the last 10; its cross-entropy, averaged over
the ``T + 20`` steps, is ``10 log(8) / (T + 20)`` nats (≈ 0.173 at ``T = 100``, ≈ 0.0594 at
``T = 330``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from keras_fancyrnn.datasets import _common

#: Token ids.
BLANK, DELIMITER = 0, 9
#: Number of symbols to copy and of distinct symbols (ids ``1..NUM_SYMBOLS``).
NUM_TO_COPY, NUM_SYMBOLS = 10, 8
#: Size of the token vocabulary of inputs and targets (blank, 8 symbols, delimiter).
NUM_CLASSES = 10
#: Smallest ``T``: no blank between the symbols and the delimiter.
MIN_LENGTH = 1


def baseline(length: int) -> _common.Baseline:
    """Cross-entropy per step of the memoryless predictor at time lag ``length``:
    ``10 log(8) / (T + 20)``."""
    length = _common.check_int(length, "length", MIN_LENGTH)
    return _common.Baseline(
        metric="cross_entropy",
        value=NUM_TO_COPY * math.log(NUM_SYMBOLS) / (length + 2 * NUM_TO_COPY),
        predictor="blank for T + 10 steps, then uniform over the 8 symbols",
    )


def _block(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    symbols = rng.integers(1, NUM_SYMBOLS + 1, size=(n, NUM_TO_COPY), dtype=np.int32)
    steps = length + 2 * NUM_TO_COPY
    inputs = np.full((n, steps), BLANK, dtype=np.int32)
    inputs[:, :NUM_TO_COPY] = symbols
    inputs[:, length + NUM_TO_COPY - 1] = DELIMITER
    targets = np.full((n, steps), BLANK, dtype=np.int32)
    targets[:, length + NUM_TO_COPY :] = symbols
    return inputs, targets


def copy_memory(
    n: int, length: int, seed: int = 0, one_hot: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Generates ``n`` copy-memory examples of time lag ``length`` in memory.

    Args:
      n: number of examples, ``>= 1``.
      length: the time lag ``T``, any integer ``>= 1`` (the TFDS configs publish only
        :data:`~keras_fancyrnn.datasets.LENGTHS`).
      seed: non-negative integer; equal arguments give equal arrays, and the first ``m`` examples
        do not depend on ``n``.
      one_hot: return the inputs as float32 ``(n, T + 20, 10)`` one-hot vectors (targets stay
        token ids, for a sparse categorical cross-entropy).

    Returns:
      ``(inputs, targets)``, both int32 ``(n, T + 20)`` token ids in ``0..9``: inputs are the 10
      symbols, ``T - 1`` blanks, the delimiter ``9`` at index ``T + 9`` and 10 blanks; targets are
      ``T + 10`` blanks then the 10 symbols. Baseline cross-entropy: ``10 log(8) / (T + 20)``.
    """
    n = _common.check_int(n, "n", 1)
    length = _common.check_int(length, "length", MIN_LENGTH)
    seed = _common.check_seed(seed)
    inputs, targets = _common.generate(lambda rng, m: _block(rng, m, length), n, seed)
    if one_hot:
        inputs = _common.to_one_hot(inputs, NUM_CLASSES)
    return inputs, targets


class CopyMemory(_common.TaskBuilder):
    """TFDS builder ``copy_memory``: the copy task at ``T`` in 50, 100, 200, 400, 750, 1000.

    Configs ``length_<T>``; splits ``train`` (10 000 examples) and ``test`` (1 000), generated
    locally from fixed seeds (:func:`~keras_fancyrnn.datasets.split_seed`), in generation order.

    Features (``as_supervised=True`` gives ``(inputs, targets)``):

    * ``inputs``: int32 ``(T + 20,)`` token ids — 10 symbols in ``1..8``, ``T - 1`` blanks ``0``,
      the delimiter ``9``, 10 blanks;
    * ``targets``: int32 ``(T + 20,)`` — ``T + 10`` blanks then the 10 symbols.

    Baseline: cross-entropy ``10 log(8) / (T + 20)`` per step (Arjovsky et al. 2016).
    """

    name = "copy_memory"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: T in 50..1000, 10k train / 1k test, Arjovsky et al. layout.",
    }
    MIN_LENGTH = MIN_LENGTH
    BUILDER_CONFIGS = _common.TaskBuilder.make_configs(10_000, 1_000, "Copy memory")

    @staticmethod
    def block(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        return _block(rng, n, length)

    def to_example(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return {"inputs": x, "targets": y}

    def _info(self) -> tfds.core.DatasetInfo:
        length = self.builder_config.length
        steps = length + 2 * NUM_TO_COPY
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Copy memory with T = {length} (Arjovsky et al. 2016). Tokens: 0 blank, 1..8 "
                "symbols, 9 delimiter. inputs: int32 (T + 20,) = 10 symbols ~ U{1..8}, T - 1 "
                "blanks, the delimiter, 10 blanks. targets: int32 (T + 20,) = T + 10 blanks, then "
                "the 10 symbols. Baseline cross-entropy (blanks, then uniform over the 8 symbols): "
                f"10 log(8) / (T + 20) = {baseline(length).value:.4f} nats per step. Generated "
                "locally from a fixed seed per split (no download)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(steps,), dtype=np.int32),
                    "targets": tfds.features.Tensor(shape=(steps,), dtype=np.int32),
                }
            ),
            supervised_keys=("inputs", "targets"),
            homepage="https://arxiv.org/abs/1511.06464",
            citation=_common.citation("hochreiter1997", "arjovsky2016"),
            disable_shuffling=True,
        )
