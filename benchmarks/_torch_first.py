"""Loads torch, when it is installed, before anything loads TensorFlow.

On this project's CPU machines torch 2.13 and 2.14 crashed (segmentation fault in its first
optimizer, which imports ``torch._dynamo``) when TensorFlow had been imported first; with torch
and ``torch._dynamo`` loaded first, both work side by side. The benchmark scripts that time
torch import this module before keras. It applies ``_isa`` (``KERAS_FANCYRNN_BENCH_ISA``) first:
the instruction set must be set before either library loads."""

import _isa  # noqa: F401  (before torch and TensorFlow: see the module)

try:
    import torch
    import torch._dynamo  # noqa: F401  (what the optimizers import, and what crashed)
except ImportError:
    pass
