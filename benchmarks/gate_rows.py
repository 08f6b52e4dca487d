"""The LSTM's gate equations for a row of ``H`` units (``keras_fancyrnn/ops/kernels/gate_math.h``)
two ways, in one process, alternating: as Eigen array expressions (what float64 runs) and one
packet of units at a time with the same Eigen packet functions (what float32 runs); median ns
per row on one core, the ratio, and the largest difference between their outputs.

    python benchmarks/gate_rows.py
    python benchmarks/gate_rows.py --hidden=64,256 --rounds=15

Needs a C++ compiler and TensorFlow (for its copy of Eigen).
"""

from __future__ import annotations

import os
import subprocess
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _timing import cpu_name  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("hidden", ["16", "37", "64", "128", "256", "512"], "Units per row.")
flags.DEFINE_integer("rounds", 9, "Timed rounds per variant (median reported).")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, os.pardir, "keras_fancyrnn", "ops", "kernels")


def build(directory: str) -> str:
    import tensorflow as tf

    from keras_fancyrnn.ops.build import compiler, target_flags

    command = compiler()
    if not command:
        raise SystemExit("no C++ compiler (g++ or $CXX) on PATH")
    target = os.path.join(directory, "gate_rows")
    subprocess.run([*command, "-std=c++17", "-O3", *target_flags(tuple(command)), "-w", "-I",
                    KERNELS, "-I", tf.sysconfig.get_include(), os.path.join(HERE, "gate_rows.cc"),
                    "-o", target], check=True)
    return target


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as directory:
        done = subprocess.run([build(directory), str(FLAGS.rounds), *FLAGS.hidden],
                              capture_output=True, text=True, check=True)
    rows = ["| H | expressions ns/row | packets ns/row | expressions/packets | max difference |",
            "|---|---|---|---|---|", *done.stdout.splitlines(), "",
            f"One core, 8 rows a call. CPU: {cpu_name()}."]
    table = "\n".join(rows)
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
