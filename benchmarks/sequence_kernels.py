"""What the whole-sequence kernels (``keras_fancyrnn.native.*_sequence``) buy: fr.X running all
timesteps in one C++ op vs the same layer in TensorFlow's while loop with the per-step gate
kernels (the previous default) vs keras.layers (vs torch.nn), training and inference, side by
side in one process, alternating, medians.

The prediction: a step of the loop is a TensorFlow matmul, the gate kernel and the loop's own
control-flow and TensorArray ops (and in training their gradients and accumulators), each with
TensorFlow's per-op overhead; the sequence kernel keeps only the arithmetic, runs each thread's
batch rows through all timesteps without synchronising, and moves ``x W``, ``dx``, ``dW`` and
``dU`` out of the time loop into four large matmuls.

    python benchmarks/sequence_kernels.py                     # all three cells; B=64 T=100 D=H=128
    python benchmarks/sequence_kernels.py --batch=16,256 --hidden=64,256 --out=seq.md
"""

from __future__ import annotations

import itertools
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from _runners import FR, KERAS, keras_runner, torch_available, torch_columns, torch_runner  # noqa: E402
from _timing import emit, time_alternating  # noqa: E402
from absl import app, flags  # noqa: E402

from keras_fancyrnn import native  # noqa: E402
from keras_fancyrnn._tf import tf  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cells", ["simple_rnn", "lstm", "gru"], "Cells: simple_rnn, lstm, gru.")
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


def with_sequences(run, enabled: bool):
    """``run`` with the sequence kernels switched on or off while it runs (its first call
    traces, and the choice is made while tracing)."""
    def call(n):
        previous, native.SEQUENCES = native.SEQUENCES, enabled
        try:
            run(n)
        finally:
            native.SEQUENCES = previous
    return call


def main(argv):
    del argv
    if native.library() is None:
        raise SystemExit(f"the kernels are unavailable here: {native.load_error()}")
    have_torch = FLAGS.torch and torch_available()
    rows = ["| cell | mode | B | H | sequence steps/s | loop steps/s | keras steps/s | "
            "torch steps/s | sequence/loop | sequence/keras | sequence/torch |", "|" + "---|" * 11]
    grid = itertools.product(FLAGS.cells, FLAGS.modes, map(int, FLAGS.batch),
                             map(int, FLAGS.hidden))
    for cell, mode, batch, units in grid:
        dims = (cell, batch, FLAGS.time, FLAGS.input_dim, units, mode == "train")
        runners = {"sequence": with_sequences(keras_runner(FR[cell], *dims, "auto"), True),
                   "loop": with_sequences(keras_runner(FR[cell], *dims, "auto"), False),
                   "keras": keras_runner(KERAS[cell], *dims, "auto")}
        if have_torch:
            runners["torch"] = torch_runner(*dims)
        rate = time_alternating(runners, FLAGS.repeats, FLAGS.steps, FLAGS.round_seconds)
        torch_steps, vs_torch = torch_columns(rate, "sequence")
        rows.append(
            f"| {cell} | {mode} | {batch} | {units} | {rate['sequence']:.1f} | "
            f"{rate['loop']:.1f} | {rate['keras']:.1f} | {torch_steps} | "
            f"{rate['sequence'] / rate['loop']:.2f} | {rate['sequence'] / rate['keras']:.2f} | "
            f"{vs_torch} |")
        print(rows[-1], flush=True)
    footer = (f"\nT={FLAGS.time}, D={FLAGS.input_dim}. Machine: "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"TF {tf.__version__}, Keras {keras.__version__}; {time.strftime('%Y-%m-%d')}.")
    emit(rows, footer, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
