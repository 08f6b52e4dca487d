"""Import TensorFlow with an error that says how to install it."""

try:
    import tensorflow as tf
except ImportError as err:  # pragma: no cover - exercised only without TensorFlow
    raise ImportError(
        "keras_fancyrnn needs TensorFlow. Install it with the package: "
        "`pip install keras_fancyrnn[cpu]` (CPU) or `pip install keras_fancyrnn[gpu]` (NVIDIA GPU)."
    ) from err

__all__ = ["tf"]
