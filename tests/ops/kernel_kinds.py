"""The kinds of recurrence the C++ kernels run, as the kernel tests name them, and the mask
patterns they are tested with."""

import numpy as np

#: Test kinds beyond the layer names: the IRNN's activation (the SimpleRNN's sequence kernel) and
#: the GRU with the reset gate before the product (a sequence kernel of its own).
VARIANTS = {"SimpleRNN-relu": {"activation": "relu"}, "GRU-before": {"reset_after": False}}

#: Each kind's whole-sequence op.
SEQUENCE_OPS = {"SimpleRNN": "KerasFancyrnnRnnSequence", "LSTM": "KerasFancyrnnLstmSequence",
                "GRU": "KerasFancyrnnGruSequence", "SimpleRNN-relu": "KerasFancyrnnRnnSequence",
                "GRU-before": "KerasFancyrnnGruBeforeSequence"}

#: The op that projects a layer's batch-major inputs to the sequence ops' time-major ``x W``
#: (forward, and the gradient with respect to the inputs).
PROJECT_OP = "KerasFancyrnnProject"

#: The ops of the weight gradients, ``dW`` of the projection and ``dU`` of a recurrence.
WEIGHT_GRAD_OPS = {"KerasFancyrnnProjectWeightGrad", "KerasFancyrnnRecurrentWeightGrad"}

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
