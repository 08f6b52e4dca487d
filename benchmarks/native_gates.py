"""What the fused gate kernels (``keras_fancyrnn.ops.native``) buy: fr.LSTM / fr.GRU with the
kernels vs the same layers with their plain TensorFlow gate ops vs keras.layers (vs torch.nn),
training and inference, side by side in one process, alternating, medians.

The prediction: at batch 64, 128 units a step is two matmuls (~60 µs on the critical path on
the 2-core test machine) and 10–20 element-wise ops of a few µs each, mostly TensorFlow's per-op
overhead; one op for all of them (and one for their gradient) should save 20–40 % of a step.

    python benchmarks/native_gates.py                          # LSTM, GRU; B=64 T=100 D=H=128
    python benchmarks/native_gates.py --batch=16,256 --hidden=64,256 --out=native.md
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _runners import run_on_off  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_fancyrnn as fr  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cells", ["lstm", "gru"], "Cells: lstm, gru.")
flags.DEFINE_list("modes", ["train", "predict"], "train and/or predict.")
flags.DEFINE_list("batch", ["64"], "Batch sizes.")
flags.DEFINE_list("hidden", ["128"], "Hidden sizes.")
flags.DEFINE_integer("time", 100, "Sequence length T.")
flags.DEFINE_integer("input_dim", 128, "Input features D.")
flags.DEFINE_integer("repeats", 7, "Timed rounds per variant (median reported).")
flags.DEFINE_integer("steps", 10, "Steps per timed round.")
flags.DEFINE_bool("torch", True, "Include torch.nn when torch is installed.")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")


def main(argv):
    del argv
    fr.config.set(fused_on_cpu=False)  # the whole-sequence kernels would replace both loops
    run_on_off("kernels", "plain", "native_kernels", FLAGS)


if __name__ == "__main__":
    app.run(main)
