"""The recurrence engine: ``loop`` (the readable reference: the time loop, masks, truncation,
probes), ``dispatch`` (the one choice of path, and why), ``probes`` (probe requests the layers
read) and ``cudnn`` (the GPU path). A layer asks ``dispatch.choose`` for a plan and hands it to
``run``."""

from keras_fancyrnn import config
from keras_fancyrnn.engine.loop import run, validate_bptt_truncate

__all__ = ["run", "validate_bptt_truncate"]

config.guard_removed(__name__, {"FUSED_ON_CPU": "fused_on_cpu"}, gone={
    "HOIST_ON_CPU": "the loop hoists x W before it on a GPU only (on a CPU it measured slower)"})
