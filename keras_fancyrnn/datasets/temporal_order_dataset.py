"""The temporal order task (Hochreiter & Schmidhuber 1997, exp. 6a; Pascanu et al. 2013).

A sequence of ``T`` tokens from 6 symbols: the distractors ``a, b, c, d`` (ids ``0..3``) and the
relevant symbols ``X`` (id 4) and ``Y`` (id 5). Every position holds a random distractor except two,
which hold an ``X`` or a ``Y`` (each drawn with probability 1/2):

* the first at a position ``p_1`` drawn uniformly from the integers in ``[0.1 T, 0.2 T]``,
* the second at ``p_2`` drawn uniformly from the integers in ``[0.5 T, 0.6 T]``

(positions counted from 0). The label is the order of the two relevant symbols, 4 classes:

.. math::

    y = 2\\,[x_{p_1} = Y] + [x_{p_2} = Y],
    \\qquad 0 = XX,\\ 1 = XY,\\ 2 = YX,\\ 3 = YY.

The first relevant symbol must be carried across at least ``0.3 T`` steps and the last ``0.4 T``
steps are noise. The classes are equally likely, so the baseline (guessing, or predicting any
constant class) has accuracy 25 % and cross-entropy ``log 4``. Hochreiter & Schmidhuber's version
also framed the sequence with start/end symbols ``E``/``B``; Pascanu et al.'s, followed here, does
not.

Inputs are stored as int32 token ids (compact); pass ``one_hot=True`` to :func:`temporal_order` or
:func:`~keras_fancyrnn.datasets.load_numpy` for the float32 ``(T, 6)`` one-hot vectors the papers
feed to the RNN, or use ``keras.ops.one_hot(x, 6)`` / an ``Embedding`` on the TFDS tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from keras_fancyrnn.datasets import _common

#: Token ids: the distractors ``a, b, c, d`` are ``0..3``.
X, Y = 4, 5
#: Size of the input vocabulary.
NUM_SYMBOLS = 6
#: Label names, in label order.
LABELS: tuple[str, ...] = ("XX", "XY", "YX", "YY")
#: Smallest ``T`` for which ``[0.1 T, 0.2 T]`` contains an integer for every ``T`` from it on.
MIN_LENGTH = 10

#: Accuracy of guessing (the four orders are equally likely).
BASELINE = _common.Baseline(metric="accuracy", value=0.25, predictor="any constant class")


def positions(length: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The inclusive ranges ``((lo_1, hi_1), (lo_2, hi_2))`` of the two relevant positions:
    the integers in ``[0.1 T, 0.2 T]`` and in ``[0.5 T, 0.6 T]`` (exact integer arithmetic)."""
    length = _common.check_int(length, "length", MIN_LENGTH)
    return (-(-length // 10), length // 5), (-(-length // 2), 3 * length // 5)


def _block(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    (lo1, hi1), (lo2, hi2) = positions(length)
    rows = np.arange(n)
    inputs = rng.integers(0, 4, size=(n, length), dtype=np.int32)
    first = rng.integers(lo1, hi1 + 1, size=n)
    second = rng.integers(lo2, hi2 + 1, size=n)
    first_is_y = rng.integers(0, 2, size=n, dtype=np.int32)
    second_is_y = rng.integers(0, 2, size=n, dtype=np.int32)
    inputs[rows, first] = X + first_is_y
    inputs[rows, second] = X + second_is_y
    return inputs, (2 * first_is_y + second_is_y).astype(np.int64)


def temporal_order(
    n: int, length: int, seed: int = 0, one_hot: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Generates ``n`` temporal-order examples of length ``length`` in memory.

    Args:
      n: number of examples, ``>= 1``.
      length: sequence length ``T``, any integer ``>= 10`` (the TFDS configs publish only
        :data:`~keras_fancyrnn.datasets.LENGTHS`).
      seed: non-negative integer; equal arguments give equal arrays, and the first ``m`` examples
        do not depend on ``n``.
      one_hot: return float32 ``(n, T, 6)`` one-hot inputs instead of token ids.

    Returns:
      ``(inputs, label)``: ``inputs`` int32 ``(n, T)`` token ids (``0..3`` distractors, ``4`` X,
      ``5`` Y) — or the one-hot float32 ``(n, T, 6)`` — and ``label`` int64 ``(n,)`` in ``0..3`` for
      XX, XY, YX, YY. Baseline accuracy: 25 %.
    """
    n = _common.check_int(n, "n", 1)
    length = _common.check_int(length, "length", MIN_LENGTH)
    seed = _common.check_seed(seed)
    inputs, label = _common.generate(lambda rng, m: _block(rng, m, length), n, seed)
    if one_hot:
        inputs = _common.to_one_hot(inputs, NUM_SYMBOLS)
    return inputs, label


class TemporalOrder(_common.TaskBuilder):
    """TFDS builder ``temporal_order``: the temporal order task at ``T`` in 50 .. 1000.

    Configs ``length_<T>``; splits ``train`` (10 000 examples) and ``test`` (1 000), generated
    locally from fixed seeds (:func:`~keras_fancyrnn.datasets.split_seed`), in generation order.

    Features (``as_supervised=True`` gives ``(inputs, label)``):

    * ``inputs``: int32 ``(T,)`` token ids — ``0..3`` the distractors a, b, c, d, ``4`` X, ``5`` Y,
      with exactly one X/Y at an integer position in ``[0.1 T, 0.2 T]`` and one in
      ``[0.5 T, 0.6 T]``;
    * ``label``: ``ClassLabel`` (int64) ``0..3`` = XX, XY, YX, YY, the order of the two.

    Baseline: 25 % accuracy (Hochreiter & Schmidhuber 1997; Pascanu et al. 2013).
    """

    name = "temporal_order"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: T in 50..1000, 10k train / 1k test, int token inputs.",
    }
    MIN_LENGTH = MIN_LENGTH
    BUILDER_CONFIGS = _common.TaskBuilder.make_configs(10_000, 1_000, "Temporal order")

    @staticmethod
    def block(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        return _block(rng, n, length)

    def to_example(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return {"inputs": x, "label": y}

    def _info(self) -> tfds.core.DatasetInfo:
        length = self.builder_config.length
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Temporal order with T = {length} (Hochreiter & Schmidhuber 1997, exp. 6a; "
                "Pascanu et al. 2013). inputs: int32 (T,) token ids, 0..3 = distractors a, b, c, "
                "d, 4 = X, 5 = Y; exactly one X/Y at an integer position in [0.1 T, 0.2 T] and one "
                "in [0.5 T, 0.6 T]. label: 0..3 = XX, XY, YX, YY, the order of the two. Baseline: "
                "25% accuracy. Generated locally from a fixed seed per split (no download)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(length,), dtype=np.int32),
                    "label": tfds.features.ClassLabel(names=list(LABELS)),
                }
            ),
            supervised_keys=("inputs", "label"),
            homepage="https://proceedings.mlr.press/v28/pascanu13.html",
            citation=_common.citation("hochreiter1997", "pascanu2013"),
            disable_shuffling=True,
        )
