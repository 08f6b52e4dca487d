"""The LSTM's gate equations for a row of ``H`` units (``keras_fancyrnn/ops/kernels/gate_math.h``),
forward and backward, two ways, in one process, alternating: as Eigen array expressions (what
float64 runs) and one packet of units at a time with the same Eigen packet functions (what
float32 runs); median ns per row on one core, the ratio, and the largest difference between
their outputs.

    python benchmarks/gate_rows.py
    python benchmarks/gate_rows.py --hidden=64,256 --rounds=15

Needs a C++ compiler and TensorFlow (for its copy of Eigen).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _native import run  # noqa: E402
from _timing import cpu_name, emit  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("hidden", ["16", "37", "64", "128", "256", "512"], "Units per row.")
flags.DEFINE_integer("rounds", 9, "Timed rounds per variant (median reported).")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")


def main(argv):
    del argv
    done = run("gate_rows.cc", [str(FLAGS.rounds), *FLAGS.hidden])
    rows = ["| row | H | expressions ns/row | packets ns/row | expressions/packets | "
            "max difference |", "|---|---|---|---|---|---|", *done.stdout.splitlines()]
    print("\n".join(rows))
    emit(rows, f"\nOne core, 8 rows a call. CPU: {cpu_name()}.", FLAGS.out)


if __name__ == "__main__":
    app.run(main)
