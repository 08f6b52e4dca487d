"""``ClippingStats``: the Keras callback that shows a ``ClippingOptimizer``'s statistics in
``model.fit``'s logs and enforces its ``max_consecutive_skips`` after every batch."""

from __future__ import annotations

from typing import Any

import keras

from keras_fancyrnn.optim.optimizer import ClippingOptimizer, find_clipping_optimizer

__all__ = ["ClippingStats"]


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class ClippingStats(keras.callbacks.Callback):
    """Write a :class:`ClippingOptimizer`'s statistics into ``model.fit``'s logs.

    After every training batch and at the end of every epoch it adds

    ``grad_norm``
        the pre-clip global gradient norm of the last step,
    ``clipped_grad_norm``
        the norm after clipping (0 if the step was skipped),
    ``clip_rate``
        the fraction of applied steps that were clipped, since training began,
    ``skipped_steps``
        the number of steps skipped for a non-finite gradient, since training began,

    so they show in the progress bar and in the ``History`` returned by ``fit`` (put the callback
    before any callback that should see them, e.g. ``CSVLogger``). The optimizer is found in
    ``model.optimizer``, also when wrapped by a ``LossScaleOptimizer``.

    If the optimizer has ``max_consecutive_skips`` and that many steps in a row were skipped, the
    callback raises ``RuntimeError`` — this is how the limit is enforced where the step is compiled
    and cannot raise: under ``jit_compile=True`` on TensorFlow (XLA drops the optimizer's in-graph
    assertion) and in the JAX trainer (``jax.jit``).
    """

    KEYS = ("grad_norm", "clipped_grad_norm", "clip_rate", "skipped_steps")

    def __init__(self) -> None:
        super().__init__()
        self._optimizer: ClippingOptimizer | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        optimizer = getattr(self.model, "optimizer", None)
        self._optimizer = find_clipping_optimizer(optimizer)
        if self._optimizer is None:
            raise ValueError(
                "ClippingStats needs a model compiled with a ClippingOptimizer (possibly inside a "
                f"LossScaleOptimizer), got optimizer {optimizer!r}"
            )
        self._optimizer.skip_limit_checked_outside = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._optimizer is not None:
            self._optimizer.skip_limit_checked_outside = False

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._write(logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._write(logs)

    def _write(self, logs: dict | None) -> None:
        optimizer = self._optimizer
        if optimizer is None or not optimizer.built:
            return
        # The JAX trainer keeps the state outside the variables during an epoch; reading
        # Callback.model attaches it to them (Keras's own sync for callbacks).
        _ = self.model
        if logs is not None:
            stats = optimizer.stats()
            logs.update({key: stats[key] for key in self.KEYS})
        optimizer.check_skip_limit()

    def get_config(self) -> dict[str, Any]:
        return {}
