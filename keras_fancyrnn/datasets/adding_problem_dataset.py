"""The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015; Arjovsky et al. 2016).

Each example is a sequence of ``T`` pairs. The first channel holds values drawn from ``U[0, 1)``;
the second is a 0/1 marker channel with exactly two ones, at a position drawn uniformly from the
first half ``[0, T // 2)`` and one drawn uniformly from the second half ``[T // 2, T)``. The target
is the sum of the two marked values:

.. math::

    x_t = (v_t, m_t), \\quad v_t \\sim U[0, 1), \\quad
    m_t = [t = p_1] + [t = p_2], \\quad p_1 < T/2 \\le p_2, \\qquad y = v_{p_1} + v_{p_2}.

The model must carry ``v_{p_1}`` across at least ``T / 2`` steps. The trivial predictor
``y_hat = 1`` (the mean of ``y``) has MSE ``Var(v_1 + v_2) = 2 / 12 = 1/6 ≈ 0.167``: the baseline.
The task counts as solved at test MSE < 0.01. (Hochreiter & Schmidhuber used values in ``[-1, 1]``
and the target ``0.5 + (v_1 + v_2) / 4``; this is the Le et al. / Arjovsky et al. form.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from keras_fancyrnn.datasets import _common

#: Smallest ``T`` with a non-empty first and second half.
MIN_LENGTH = 2

#: MSE of predicting the constant 1 (the mean of the target).
BASELINE = _common.Baseline(metric="mse", value=1.0 / 6.0, predictor="the constant 1")


def _block(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(n)
    values = rng.random((n, length), dtype=np.float32)
    first = rng.integers(0, length // 2, size=n)
    second = rng.integers(length // 2, length, size=n)
    markers = np.zeros((n, length), dtype=np.float32)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    inputs = np.stack([values, markers], axis=-1)
    target = values[rows, first] + values[rows, second]
    return inputs, target.astype(np.float32)


def adding_problem(n: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generates ``n`` adding-problem examples of time lag ``length`` in memory.

    Args:
      n: number of examples, ``>= 1``.
      length: sequence length ``T``, any integer ``>= 2`` (the TFDS configs publish only
        :data:`~keras_fancyrnn.datasets.LENGTHS`).
      seed: non-negative integer; equal arguments give equal arrays, and the first ``m`` examples
        do not depend on ``n``.

    Returns:
      ``(inputs, target)``: ``inputs`` float32 ``(n, T, 2)`` — channel 0 the values in ``[0, 1)``,
      channel 1 the markers, exactly one ``1`` in ``[0, T // 2)`` and one in ``[T // 2, T)`` — and
      ``target`` float32 ``(n,)``, the sum of the two marked values. Baseline: predicting ``1``
      gives MSE ``1/6``.
    """
    n = _common.check_int(n, "n", 1)
    length = _common.check_int(length, "length", MIN_LENGTH)
    seed = _common.check_seed(seed)
    return _common.generate(lambda rng, m: _block(rng, m, length), n, seed)


class AddingProblem(_common.TaskBuilder):
    """TFDS builder ``adding_problem``: the adding problem at ``T`` in 50, 100, 200, 400, 750, 1000.

    Configs ``length_<T>``; splits ``train`` (10 000 examples) and ``test`` (1 000), generated
    locally from fixed seeds (:func:`~keras_fancyrnn.datasets.split_seed`), in generation order.

    Features (``as_supervised=True`` gives ``(inputs, target)``):

    * ``inputs``: float32 ``(T, 2)`` — values in ``[0, 1)`` and the 0/1 marker channel with one
      ``1`` in each half of the sequence;
    * ``target``: float32 scalar, the sum of the two marked values.

    Baseline: predicting the constant 1 gives MSE 1/6 ≈ 0.167; solved means test MSE < 0.01.
    See the module docstring for the definition (Le et al. 2015; Arjovsky et al. 2016).
    """

    name = "adding_problem"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: T in 50..1000, 10k train / 1k test, values U[0,1), sum target.",
    }
    MIN_LENGTH = MIN_LENGTH
    BUILDER_CONFIGS = _common.TaskBuilder.make_configs(10_000, 1_000, "Adding problem")

    @staticmethod
    def block(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        return _block(rng, n, length)

    def to_example(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return {"inputs": x, "target": y}

    def _info(self) -> tfds.core.DatasetInfo:
        length = self.builder_config.length
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Adding problem with T = {length} (Le et al. 2015; Arjovsky et al. 2016). "
                "inputs: float32 (T, 2), channel 0 values ~ U[0, 1), channel 1 a 0/1 marker with "
                "exactly two ones, one in [0, T//2) and one in [T//2, T). target: float32 scalar, "
                "the sum of the two marked values. Baseline: predicting the constant 1 gives "
                "MSE 1/6 ~= 0.167; solved at test MSE < 0.01. Generated locally from a fixed seed "
                "per split (no download)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(length, 2), dtype=np.float32),
                    "target": tfds.features.Scalar(dtype=np.float32),
                }
            ),
            supervised_keys=("inputs", "target"),
            homepage="https://arxiv.org/abs/1511.06464",
            citation=_common.citation("hochreiter1997", "le2015", "arjovsky2016"),
            disable_shuffling=True,
        )
