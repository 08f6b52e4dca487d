"""Peak memory of one training step, fr vs keras.layers, over sequence length T.

Each (implementation, T) runs in a fresh subprocess (peak RSS is per process): it builds the
model, records RSS, runs two training steps and reports the growth of the peak RSS over that
baseline. Printed: a Markdown table with MB per implementation, the fr/keras ratio, and the MB per
1000 steps (linearity in T).

    python benchmarks/rnn_memory.py --cell=lstm --batch=32 --hidden=256 --time=1000,2000,4000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("cell", "lstm", "simple_rnn, lstm or gru.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("hidden", 256, "Units.")
flags.DEFINE_integer("input_dim", 8, "Input features.")
flags.DEFINE_list("time", ["1000", "2500", "5000", "10000"], "Sequence lengths.")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")

CHILD = r"""
import os, sys, json, resource
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras
import keras_fancyrnn as fr
impl, cell, B, T, D, H = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
layer = getattr(fr if impl == "fr" else keras.layers,
                {"lstm": "LSTM", "gru": "GRU", "simple_rnn": "SimpleRNN"}[cell])(H)
model = keras.Sequential([keras.Input((T, D)), layer, keras.layers.Dense(1)])
model.compile("adam", "mse")
x = np.random.default_rng(0).normal(size=(B, T, D)).astype("float32")
y = np.zeros((B, 1), "float32")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model.train_on_batch(x, y)
model.train_on_batch(x, y)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", json.dumps({"mb": (peak - base) / 1024}))
"""


def measure(impl: str, steps: int) -> float:
    args = [sys.executable, "-c", CHILD, impl, FLAGS.cell, str(FLAGS.batch), str(steps),
            str(FLAGS.input_dim), str(FLAGS.hidden)]
    proc = subprocess.run(args, capture_output=True, text=True, check=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][0]
    return json.loads(line[len("RESULT "):])["mb"]


def main(argv):
    del argv
    rows = ["| T | fr peak MB | keras peak MB | fr/keras | fr MB per 1000 steps |",
            "|---|---|---|---|---|"]
    for steps in map(int, FLAGS.time):
        ours, theirs = measure("fr", steps), measure("keras", steps)
        rows.append(f"| {steps} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} | "
                    f"{1000 * ours / steps:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows) + (f"\n\n{FLAGS.cell}, B={FLAGS.batch}, H={FLAGS.hidden}, "
                               f"D={FLAGS.input_dim}: growth of peak RSS over two train steps.")
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
