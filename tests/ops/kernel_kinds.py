"""The kinds of recurrence the C++ kernels run, as the kernel tests name them, and the mask
patterns they are tested with."""

import itertools
import shutil

import numpy as np
import pytest

from keras_fancyrnn.ops import native


def needs_compiler(instead: str):
    """The mark of a module of kernel tests: skipped where no C++ compiler can build the kernels
    (``instead``: what runs then, tested everywhere else)."""
    return pytest.mark.skipif(
        native.compiler() is None or shutil.which(native.compiler()[0]) is None,
        reason=f"no C++ compiler: {instead} (tested everywhere else)")


#: Test kinds beyond the layer names: the IRNN's activation (the SimpleRNN's sequence kernel) and
#: the GRU with the reset gate before the product (a sequence kernel of its own).
VARIANTS = {"SimpleRNN-relu": {"activation": "relu"}, "GRU-before": {"reset_after": False}}

#: Each kind's whole-sequence op.
SEQUENCE_OPS = {"SimpleRNN": "KerasFancyrnnRnnSequence", "LSTM": "KerasFancyrnnLstmSequence",
                "GRU": "KerasFancyrnnGruSequence", "SimpleRNN-relu": "KerasFancyrnnRnnSequence",
                "GRU-before": "KerasFancyrnnGruBeforeSequence"}

#: The op that projects between a layer's batch-major inputs and the sequence ops' time-major
#: ``x W`` (the sequence ops' gradient with respect to their inputs).
PROJECT_OP = "KerasFancyrnnProject"

#: Every combination of the projection ops' three attrs (``KerasFancyrnnProject`` and the
#: gradient of its ``w``).
PROJECT_ATTRS = [dict(zip(("transpose_w", "reverse_0", "reverse_1"), v))
                 for v in itertools.product([False, True], repeat=3)]

def weight_grad_ops() -> set[str]:
    """The ops of the float32 weight gradients (``dW`` of the projection, ``dU`` of a recurrence)
    with the ``recurrent_product`` set now: none with Eigen's (TensorFlow's matmuls then)."""
    name = native.product()
    if name == "auto":
        name = native.products()[0]
    return (set() if name == "eigen"
            else {"KerasFancyrnnProjectWeightGrad", "KerasFancyrnnRecurrentWeightGrad"})

#: Gates per unit (the width of ``x W`` over the units).
GATES = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1, "SimpleRNN-relu": 1, "GRU-before": 3}

#: Every way the sequence kernels compute their float32 recurrent products
#: (``keras_fancyrnn.config``'s ``recurrent_product``); each test runs those this CPU can.
PRODUCTS = ["avx512", "avx2", "eigen"]


def layer_kind(kind):
    """``(layer name, arguments)`` for a test kind."""
    return kind.partition("-")[0], VARIANTS.get(kind, {})


def mask_patterns(batch, steps, rng):
    """``[B, T]`` masks: unmasked, all masked, left- and right-padded rows, holes, then random."""
    mask = rng.random((batch, steps)) > 0.4
    mask[0], mask[1] = True, False
    mask[2], mask[3] = np.arange(steps) >= steps // 2, np.arange(steps) < steps // 2
    mask[4] = np.arange(steps) % 2 == 1
    return mask
