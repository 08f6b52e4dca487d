"""TensorFlow, imported on first use with an error that says how to install it.

``tf`` is a stand-in that imports TensorFlow when one of its attributes is first read, so that
the modules using it import on the JAX and PyTorch backends without TensorFlow installed; only
the TensorFlow-only features (the C++ and cuDNN paths, tf.data inputs, SavedModel export,
TensorBoard files) need it.
"""

import importlib
import types


def require(feature: str):
    """The ``tensorflow`` module, or an ImportError that names ``feature`` and how to install
    TensorFlow (raised before a TensorFlow-only feature starts work)."""
    try:
        return importlib.import_module("tensorflow")
    except ImportError as err:
        raise ImportError(
            f"{feature} needs TensorFlow, which is not installed. Install it with the package: "
            "`pip install keras_fancyrnn[cpu]` (CPU) or `pip install keras_fancyrnn[gpu]` "
            "(NVIDIA GPU)."
        ) from err


class _TensorFlow(types.ModuleType):
    def __getattr__(self, name):
        module = require(f"this feature of keras_fancyrnn (tf.{name})")
        value = getattr(module, name)
        setattr(self, name, value)  # read from the instance from now on
        return value


tf = _TensorFlow("tensorflow")

__all__ = ["require", "tf"]
