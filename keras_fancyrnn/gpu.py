"""The ``use_cudnn`` argument and the rule for when the fused cuDNN kernel may replace the loop."""

from __future__ import annotations

import contextlib
import threading

import keras

from keras_fancyrnn._tf import tf

_portable = threading.local()


@contextlib.contextmanager
def portable():
    """Within this context, layers trace the engine's loop, never the cuDNN kernel, so the traced
    graph runs on any device. ``tf.saved_model.save`` is covered automatically; wrap
    ``model.export(...)`` in it when exporting on a GPU machine for CPU serving."""
    previous = getattr(_portable, "on", False)
    _portable.on = True
    try:
        yield
    finally:
        _portable.on = previous


def in_portable_trace() -> bool:
    from tensorflow.python.saved_model import save_context

    return getattr(_portable, "on", False) or save_context.in_save_context()


def cudnn_eligible(layer, mask=None, training=False) -> tuple[bool, str]:
    """Whether cuDNN computes exactly what ``layer`` computes, and if not, why not.

    cuDNN's LSTM/GRU kernels hard-code tanh/sigmoid, a bias, GRU's reset-after form, no recurrent
    dropout and right-padded masks; the diagnostics probe and truncated BPTT need the engine's loop.
    """
    cell = layer.cell
    if not hasattr(cell, "recurrent_activation"):
        return False, "cuDNN runs only LSTM and GRU cells"
    checks = [
        (cell.activation is keras.activations.tanh, "activation is not tanh"),
        (cell.recurrent_activation is keras.activations.sigmoid,
         "recurrent_activation is not sigmoid"),
        (cell.use_bias, "use_bias=False"),
        (getattr(cell, "reset_after", True), "reset_after=False"),
        (not layer.unroll, "unroll=True"),
        (not (training and cell.recurrent_dropout > 0), "recurrent_dropout is active"),
        (not (training and cell.dropout > 0
              and getattr(cell, "dropout_mask_count", None) is not None),
         "input dropout draws one mask per gate (implementation=1)"),
        (layer.bptt_truncate is None, "bptt_truncate is set"),
        (layer._fr_probes is None, "the gradient monitor's probe is set"),
        (keras.config.backend() == "tensorflow", "the backend is not TensorFlow"),
        (bool(tf.config.list_logical_devices("GPU")), "no GPU is visible"),
    ]
    for ok, why in checks:
        if not ok:
            return False, why
    return True, ""


class CudnnMixin:
    """Adds Keras's ``use_cudnn="auto" | True | False`` argument to LSTM and GRU."""

    def __init__(self, *args, use_cudnn="auto", **kwargs):
        if use_cudnn not in ("auto", True, False):
            raise ValueError(f"use_cudnn must be 'auto', True or False, got {use_cudnn!r}")
        super().__init__(*args, **kwargs)
        self.use_cudnn = use_cudnn
        if use_cudnn is not False and tf.config.list_logical_devices("GPU"):
            self.supports_jit = False  # CudnnRNN has no XLA kernel

    def _use_cudnn(self, mask, training) -> bool:
        """The engine runs cuDNN iff allowed, exactly equivalent, and the trace is not portable."""
        return (self.use_cudnn is not False and not in_portable_trace()
                and cudnn_eligible(self, mask, training)[0])

    def call(self, sequences, initial_state=None, mask=None, training=False):
        if self.use_cudnn is True:
            ok, why = cudnn_eligible(self, mask, training)
            if not ok:
                raise ValueError(
                    f"{self.name}: use_cudnn=True was given but cuDNN cannot run this layer here "
                    f"({why}); pass use_cudnn='auto' to fall back to the engine's loop"
                )
        return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

    def get_config(self):
        return {**super().get_config(), "use_cudnn": self.use_cudnn}
