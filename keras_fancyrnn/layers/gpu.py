"""The ``use_cudnn`` argument of LSTM and GRU (``keras_fancyrnn.engine.dispatch`` decides when
cuDNN runs)."""

from __future__ import annotations

from keras_fancyrnn.engine import dispatch


class CudnnMixin:
    """Adds Keras's ``use_cudnn="auto" | True | False`` argument to LSTM and GRU."""

    def __init__(self, *args, use_cudnn="auto", **kwargs):
        if use_cudnn not in ("auto", True, False):
            raise ValueError(f"use_cudnn must be 'auto', True or False, got {use_cudnn!r}")
        super().__init__(*args, **kwargs)
        self.use_cudnn = use_cudnn
        if use_cudnn is not False and dispatch.on_gpu():
            self.supports_jit = False  # CudnnRNN has no XLA kernel

    def get_config(self):
        return {**super().get_config(), "use_cudnn": self.use_cudnn}
