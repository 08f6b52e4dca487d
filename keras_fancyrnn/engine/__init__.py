"""The recurrence engine: ``loop`` (TensorFlow: the readable reference, the time loop, masks,
truncation, probes, and the C++ and cuDNN kernels), ``scan`` (the same loop in ``keras.ops`` for
the JAX and PyTorch backends), ``steps`` (the step both loops run), ``dispatch`` (the one choice of
path, and why), ``probes`` (probe requests the layers read) and ``cudnn`` (the GPU path on
TensorFlow). A layer asks ``dispatch.choose`` for a plan and hands it to ``run``."""

from keras_fancyrnn import config
from keras_fancyrnn.engine.steps import validate_bptt_truncate


def run(cell, inputs, initial_state, *, plan=None, **kwargs):
    """Runs ``cell`` over the time axis of ``inputs`` on the path ``plan`` names: the keras.ops
    loop (``engine/scan.py``) for ``"scan"``, PyTorch's kernel (``engine/torch_rnn.py``) for
    ``"torch_rnn"``, the TensorFlow engine (``engine/loop.py``, whose
    ``run`` documents the arguments) otherwise."""
    if plan is not None and plan.path == "scan":
        from keras_fancyrnn.engine import scan

        return scan.run(cell, inputs, initial_state, hoist_inputs=plan.hoist_inputs, **kwargs)
    if plan is not None and plan.path == "torch_rnn":
        from keras_fancyrnn.engine import torch_rnn

        return torch_rnn.run(cell, inputs, initial_state, **kwargs)
    from keras_fancyrnn.engine import loop

    return loop.run(cell, inputs, initial_state, plan=plan, **kwargs)


__all__ = ["run", "validate_bptt_truncate"]

config.guard_removed(__name__, {"FUSED_ON_CPU": "fused_on_cpu"}, gone={
    "HOIST_ON_CPU": "the loop hoists x W before it on a GPU only (on a CPU it measured slower)"})
