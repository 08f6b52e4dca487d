"""The recurrent product of the sequence kernels (``keras_fancyrnn/ops/kernels/small_gemm.h``) every
way this CPU can run it, in one process, alternating: Eigen's product, the AVX2/FMA register block
(4 x 24 or 6 x 16, by the rows of a product) and the AVX-512 one (8 x 48 or 8 x 32, by the
kernel's shape), each with both its panel widths, median GFLOP/s on one core (each round after
one untimed product: the ops reuse their packed U at every step) for a shard's shapes (``n``
batch rows, ``K`` x ``N`` recurrent kernel), each result first checked against a
double-precision product; and the time the widest block takes to pack ``U`` (or ``U^T``)
into its panels, which every op call does once. This is the measurement behind the header's rule
(the AVX-512 block where the CPU has AVX-512, else the AVX2 block where it has AVX2/FMA, else
Eigen).

    python benchmarks/small_gemm.py
    python benchmarks/small_gemm.py --shapes=32x128x512 --rounds=15

Needs a C++ compiler and TensorFlow (for its copy of Eigen). A block the CPU lacks reads n/a.
"""

from __future__ import annotations

import os
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _native import run  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["8x128x128", "32x128x128", "128x128x128", "32x128x384",
                             "32x128x512", "8x128x512", "8x512x128", "16x128x512",
                             "16x512x128", "8x256x1024", "8x1024x256", "32x256x1024"],
                  "Products nxKxN: n rows of a shard times a K x N kernel.")
flags.DEFINE_integer("rounds", 9, "Timed rounds per variant (median reported).")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")


def main(argv):
    del argv
    done = run("small_gemm.cc", [str(FLAGS.rounds), *FLAGS.shapes], check=False)
    if done.returncode == 2:
        raise SystemExit(done.stderr)
    rows = ["| n | K | N | kernel | eigen GFLOP/s | avx2 6x16 GFLOP/s | avx2 4x24 GFLOP/s | "
            "avx2 panels chosen | avx512 8x32 GFLOP/s | avx512 8x48 GFLOP/s | "
            "avx512 panels chosen | fastest/eigen | widest block's packing us | max rel. error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *done.stdout.splitlines(), "",
            f"One core. Machine: {platform.machine()}, {os.cpu_count()} cores; "
            f"{_isa()}."]
    table = "\n".join(rows)
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(table + "\n")
    if done.returncode != 0:
        raise SystemExit("a product differs from the double-precision reference (see the table)")


def _isa() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags_line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return platform.processor()
    have = [isa for isa in ("avx2", "fma", "avx512f") if f" {isa} " in flags_line + " "]
    return "ISA " + ", ".join(have) if have else "no AVX2"


if __name__ == "__main__":
    app.run(main)
