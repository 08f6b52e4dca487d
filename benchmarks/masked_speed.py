"""Masked against unmasked sequences: keras_fancyrnn vs keras.layers, side by side.

Each sequence has a length uniform in [T/2, T], zero-padded at the end behind
``keras.layers.Masking(0.0)`` (what padded text gives a recurrent layer). Every model is built in
this one process and timed alternately after a warm-up; medians (steps/s) and the ratios.

    python benchmarks/masked_speed.py                    # LSTM and GRU, B=64 T=100 D=H=128
    python benchmarks/masked_speed.py --modes=train,predict --out=masked.md
"""

from __future__ import annotations

import os
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _torch_first  # noqa: E402, F401  (before keras: see the module)
from _runners import FR, KERAS, keras_runner  # noqa: E402
from _timing import emit, time_alternating  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cells", ["lstm", "gru"], "Cells: simple_rnn, lstm, gru, irnn, gru_before.")
flags.DEFINE_list("modes", ["train"], "train (train_on_batch, Adam) and/or predict.")
flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_integer("time", 100, "Padded sequence length T.")
flags.DEFINE_integer("hidden", 128, "Units.")
flags.DEFINE_integer("input_dim", 128, "Input features D.")
flags.DEFINE_integer("repeats", 7, "Timed rounds per model (median reported).")
flags.DEFINE_integer("steps", 10, "Steps per timed round.")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")


def main(argv):
    del argv
    size = (FLAGS.batch, FLAGS.time, FLAGS.input_dim, FLAGS.hidden)
    rows = ["| cell | mode | fr unmasked | fr masked | keras unmasked | keras masked "
            "| fr masked / unmasked | fr / keras masked |",
            "|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows))
    for cell in FLAGS.cells:
        for mode in FLAGS.modes:
            train = mode == "train"
            runners = {
                (lib, masked): keras_runner(layers[cell], cell, *size, train, "auto",
                                            masked=masked)
                for lib, layers in (("fr", FR), ("keras", KERAS)) for masked in (False, True)}
            rate = time_alternating(runners, FLAGS.repeats, FLAGS.steps)
            row = (f"| {cell} | {mode} | {rate['fr', False]:.1f} | {rate['fr', True]:.1f} "
                   f"| {rate['keras', False]:.1f} | {rate['keras', True]:.1f} "
                   f"| {rate['fr', True] / rate['fr', False]:.2f} "
                   f"| {rate['fr', True] / rate['keras', True]:.2f} |")
            rows.append(row)
            print(row, flush=True)
    emit(rows, f"\nB={FLAGS.batch} T={FLAGS.time} D={FLAGS.input_dim} H={FLAGS.hidden}, lengths "
               f"uniform in [{FLAGS.time // 2}, {FLAGS.time}]; steps/s, median of {FLAGS.repeats} "
               f"rounds; {platform.machine()}, {os.cpu_count()} cores", FLAGS.out)


if __name__ == "__main__":
    app.run(main)
