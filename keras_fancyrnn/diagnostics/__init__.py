"""Diagnostics: the gradient-norm curve ‖∂ℓ/∂h_t‖ of recurrent layers, measured and reported.

One concept a module, data flowing down the list (each imports only those above it):

* ``targets``: which layers are probed, under which series keys;
* ``losses``: per-example losses ℓ_i under the compiled loss;
* ``probe_model``: the model a pass runs (the user's, or one running Keras's recurrent layers as fr
  layers on the same variables, or a float64 copy) and which of its layers give which series;
* ``series``: scalars derived from one curve, a clipping optimizer's stats;
* ``aggregate``: per-example norms and masks to curves, counts and per-example scalars (the mean
  over valid steps, ``align``);
* ``autodiff``: the probe gradients by each backend's own differentiation, and the compiled pass;
* ``probe_pass``: ``ProbePass`` (one forward + backward pass with zero probes), its data checks,
  ``gradient_norms``;
* ``sources``: the monitor's ``data`` (arrays, datasets, generators, callables) as batches;
* ``reporting``: CSV/NPZ files, TensorBoard summaries, plots;
* ``findings``: the diagnosis (vanishing, exploding gradients) and its remedies, ``Finding``;
* ``monitor``: the Keras callback ``GradientNormMonitor``.

Diagnostics import the layers and the engine, never the other way round.
"""

from keras_fancyrnn.diagnostics.findings import Finding, diagnose
from keras_fancyrnn.diagnostics.monitor import DEFAULT_EVERY_N_BATCHES, GradientNormMonitor
from keras_fancyrnn.diagnostics.probe_pass import ProbePass, gradient_norms
from keras_fancyrnn.diagnostics.reporting import json_safe
from keras_fancyrnn.diagnostics.series import decay_rate, derived_scalars, ratio_first_last
from keras_fancyrnn.diagnostics.targets import discover

__all__ = [
    "DEFAULT_EVERY_N_BATCHES",
    "Finding",
    "GradientNormMonitor",
    "ProbePass",
    "decay_rate",
    "derived_scalars",
    "diagnose",
    "discover",
    "gradient_norms",
    "json_safe",
    "ratio_first_last",
]
