"""TensorFlow, imported on first use with an error that says how to install it.

``tf`` is a stand-in that imports TensorFlow when one of its attributes is first read, so that
the modules using it import on the JAX and PyTorch backends without TensorFlow installed; only
the TensorFlow-only features (the C++ and cuDNN paths, tf.data inputs, SavedModel export,
TensorBoard files) need it.
"""

import importlib
import types


class _TensorFlow(types.ModuleType):
    def __getattr__(self, name):
        try:
            module = importlib.import_module("tensorflow")
        except ImportError as err:  # pragma: no cover - exercised only without TensorFlow
            raise ImportError(
                f"this feature of keras_fancyrnn (tf.{name}) needs TensorFlow. Install it with "
                "the package: `pip install keras_fancyrnn[cpu]` (CPU) or "
                "`pip install keras_fancyrnn[gpu]` (NVIDIA GPU)."
            ) from err
        value = getattr(module, name)
        setattr(self, name, value)  # read from the instance from now on
        return value


tf = _TensorFlow("tensorflow")

__all__ = ["tf"]
