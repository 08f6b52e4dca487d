"""What the whole-sequence kernels (``keras_fancyrnn.ops.native.*_sequence``) buy: fr.X running all
timesteps in one C++ op vs the same layer in TensorFlow's while loop with the per-step gate
kernels (the previous default) vs keras.layers (vs torch.nn), training and inference, side by
side in one process, alternating, medians.

The prediction: a step of the loop is a TensorFlow matmul, the gate kernel and the loop's own
control-flow and TensorArray ops (and in training their gradients and accumulators), each with
TensorFlow's per-op overhead; the sequence kernel keeps only the arithmetic, runs each thread's
batch rows through all timesteps without synchronising, computes ``x W`` a few steps ahead of
the recurrence in the same op, and moves ``dx``, ``dW`` and ``dU`` out of the time loop into
three large products (the projection op and the two weight gradient ops).

    python benchmarks/sequence_kernels.py                     # all three cells; B=64 T=100 D=H=128
    python benchmarks/sequence_kernels.py --batch=16,256 --hidden=64,256 --out=seq.md
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _runners import run_on_off  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cells", ["simple_rnn", "lstm", "gru"],
                  "Cells: simple_rnn, lstm, gru, irnn (SimpleRNN with ReLU), gru_before (GRU "
                  "with reset_after=False).")
flags.DEFINE_list("modes", ["train", "predict"], "train and/or predict.")
flags.DEFINE_list("batch", ["64"], "Batch sizes.")
flags.DEFINE_list("hidden", ["128"], "Hidden sizes.")
flags.DEFINE_integer("time", 100, "Sequence length T.")
flags.DEFINE_integer("input_dim", 128, "Input features D.")
flags.DEFINE_integer("repeats", 7, "Timed rounds per variant (median reported).")
flags.DEFINE_integer("steps", 10, "Steps per timed round.")
flags.DEFINE_float("round_seconds", 0.0, "If > 0, fewer steps per round where one round would "
                   "take longer than this.")
flags.DEFINE_bool("torch", True, "Include torch.nn when torch is installed.")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")


def main(argv):
    del argv
    run_on_off("sequence", "loop", "sequence_kernels", FLAGS)


if __name__ == "__main__":
    app.run(main)
