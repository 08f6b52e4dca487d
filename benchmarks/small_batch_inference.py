"""Inference at small batches: the sequence kernels projecting the inputs themselves against a
TensorFlow transpose and matmul before them, with keras.layers, torch.nn and Keras's floor.

In inference at batches up to ``keras_fancyrnn.engine.dispatch.IN_KERNEL_BATCH`` a sequence
kernel takes the layer's batch-major inputs and computes ``x W`` itself; "fr, TF projection" is
the same layer with that limit at 0 while it traces (what training and larger batches run).
"floor" is the same Keras model without its recurrent layer: what Keras's ``predict_on_batch``
costs a call whatever the layer. Every model is built in this one process and timed alternately
after a warm-up; medians (calls/s) and the ratios.

    python benchmarks/small_batch_inference.py
    python benchmarks/small_batch_inference.py --cells=lstm --time=50,200 --out=small.md
"""

from __future__ import annotations

import itertools
import os
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _torch_first  # noqa: E402, F401  (before keras: see the module)
from _runners import FR, KERAS, keras_runner, torch_available, torch_runner  # noqa: E402
from _timing import emit, time_alternating  # noqa: E402
from absl import app, flags  # noqa: E402

from keras_fancyrnn.engine import dispatch  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cells", ["lstm", "gru", "simple_rnn"], "Cells: simple_rnn, lstm, gru, irnn, "
                  "gru_before.")
flags.DEFINE_list("batch", ["16"], "Batch sizes.")
flags.DEFINE_list("time", ["50", "200"], "Sequence lengths.")
flags.DEFINE_list("hidden", ["64", "256"], "Units.")
flags.DEFINE_integer("input_dim", 128, "Input features D.")
flags.DEFINE_integer("repeats", 7, "Timed rounds per model (median reported).")
flags.DEFINE_integer("steps", 20, "Calls per timed round.")
flags.DEFINE_bool("torch", True, "Include torch.nn when torch is installed.")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")


def tf_projection(run):
    """``run`` with the sequence kernels' in-kernel projection off while it traces (its first
    call traces, and the layers choose their path while tracing)."""
    def call(n):
        limit, dispatch.IN_KERNEL_BATCH = dispatch.IN_KERNEL_BATCH, 0
        try:
            run(n)
        finally:
            dispatch.IN_KERNEL_BATCH = limit
    return call


def main(argv):
    del argv
    have_torch = FLAGS.torch and torch_available()
    rows = ["| cell | B | T | H | fr calls/s | fr, TF projection | keras | torch | floor "
            "| fr / TF projection | fr / keras | fr / torch | floor / torch |",
            "|" + "---|" * 13]
    print("\n".join(rows))
    grid = itertools.product(FLAGS.cells, map(int, FLAGS.batch), map(int, FLAGS.time),
                             map(int, FLAGS.hidden))
    for cell, batch, steps, units in grid:
        dims = (cell, batch, steps, FLAGS.input_dim, units, False)
        runners = {"fr": keras_runner(FR[cell], *dims, "auto"),
                   "fr_tf": tf_projection(keras_runner(FR[cell], *dims, "auto")),
                   "keras": keras_runner(KERAS[cell], *dims, "auto"),
                   "floor": keras_runner(None, *dims, "auto")}
        if have_torch:
            runners["torch"] = torch_runner(*dims)
        rate = time_alternating(runners, FLAGS.repeats, FLAGS.steps)
        torch_rate = rate.get("torch")
        vs_torch = (f"{rate['fr'] / torch_rate:.2f} | {rate['floor'] / torch_rate:.2f}"
                    if torch_rate else " | ")
        row = (f"| {cell} | {batch} | {steps} | {units} | {rate['fr']:.1f} | "
               f"{rate['fr_tf']:.1f} | {rate['keras']:.1f} | "
               f"{f'{torch_rate:.1f}' if torch_rate else ''} | {rate['floor']:.1f} | "
               f"{rate['fr'] / rate['fr_tf']:.2f} | {rate['fr'] / rate['keras']:.2f} | "
               f"{vs_torch} |")
        rows.append(row)
        print(row, flush=True)
    emit(rows, f"\nD={FLAGS.input_dim}; predict_on_batch (fr, keras, floor) and a no-grad "
               f"forward (torch); calls/s, median of {FLAGS.repeats} rounds; "
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
         FLAGS.out)


if __name__ == "__main__":
    app.run(main)
