"""Diagnostics: the gradient-norm curve ‖∂ℓ/∂h_t‖ of recurrent layers, measured and reported.

* ``reporting``: CSV/NPZ files, TensorBoard summaries, plots.

Diagnostics import the layers and the engine, never the other way round.
"""

from keras_fancyrnn.diagnostics.reporting import json_safe

__all__ = ["json_safe"]
