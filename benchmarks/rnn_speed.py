"""Side-by-side training / inference throughput: keras_fancyrnn vs keras.layers (vs torch.nn).

Every implementation is built in this one process and timed alternately after a warm-up, so the
machine's noise hits all of them alike; the table reports medians and the ratios fr / keras and
fr / torch, floor / torch (the same Keras model without its recurrent layer against torch: the
most any Keras layer could reach there, given Keras's own cost per call), the achieved GFLOP/s of
the recurrent matmuls, and the rate of one large matmul measured in the same run (the roofline:
the best of its readings before and after the grid).

    python benchmarks/rnn_speed.py                       # LSTM, B=64 T=100 D=H=128, train
    python benchmarks/rnn_speed.py --cells=lstm,gru,simple_rnn --modes=train,predict \
        --batch=16,64 --time=50,200 --hidden=64,256 --jit=auto,off --out=bench.md
    KERAS_FANCYRNN_BENCH_ISA=avx2 python benchmarks/rnn_speed.py   # everything at AVX2 (_isa.py)
"""

from __future__ import annotations

import itertools
import os
import platform
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _isa  # noqa: E402  (before torch and keras: see the module)
import _torch_first  # noqa: E402, F401  (before keras: see the module)
import keras  # noqa: E402
import numpy as np  # noqa: E402
from _runners import FR, KERAS, keras_runner, torch_available, torch_columns, torch_runner  # noqa: E402
from _timing import emit, time_alternating  # noqa: E402
from absl import app, flags  # noqa: E402

from keras_fancyrnn._tf import tf  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cells", ["lstm"], "Cells: simple_rnn, lstm, gru, irnn (SimpleRNN with ReLU), "
                  "gru_before (GRU with reset_after=False).")
flags.DEFINE_list("modes", ["train"], "train (fit steps) and/or predict.")
flags.DEFINE_list("batch", ["64"], "Batch sizes.")
flags.DEFINE_list("time", ["100"], "Sequence lengths.")
flags.DEFINE_list("hidden", ["128"], "Hidden sizes (units).")
flags.DEFINE_integer("input_dim", 128, "Input features D.")
flags.DEFINE_list("jit", ["auto"], "jit_compile settings: auto, on, off.")
flags.DEFINE_integer("repeats", 7, "Timed rounds per implementation (median reported).")
flags.DEFINE_integer("steps", 10, "Training/predict steps per timed round (the most, with "
                     "--round_seconds).")
flags.DEFINE_float("round_seconds", 0.0, "If > 0, fewer steps per round where one round would "
                   "take longer than this (keeps the big grid points affordable).")
flags.DEFINE_bool("torch", True, "Include torch.nn when torch is installed.")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")

GATES = {"simple_rnn": 1, "lstm": 4, "gru": 3, "irnn": 1, "gru_before": 3}


def flops_per_step(cell, batch, steps, dim, units, train):
    """Matmul FLOPs a step must do: x W and h U forward; in training also dz Uᵀ (through time),
    dW = xᵀ dz and dU = hᵀ dz. Not dx = dz Wᵀ: the input is data, so no implementation computes
    it (counting it, as runs before 2026-12-02's second session did, put some points above 100 %
    of the roofline)."""
    g = GATES[cell] * units
    projection, recurrent = 2 * batch * steps * dim * g, 2 * batch * steps * units * g
    return 2 * projection + 3 * recurrent if train else projection + recurrent


def matmul_roofline(n=1024, repeats=20):
    a = tf.random.normal((n, n))
    mm = tf.function(lambda: tf.matmul(a, a))
    mm()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mm().numpy()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / np.min(times) / 1e9  # the best round: what the machine can do


def main(argv):
    del argv
    have_torch = FLAGS.torch and torch_available()
    roof = matmul_roofline()
    header = ("| cell | mode | B | T | H | jit | fr steps/s | keras steps/s | torch steps/s | "
              "fr/keras | fr/torch | floor/torch | fr GFLOP/s | fr % of roofline |")
    rows, measured = [header, "|" + "---|" * 14], []
    grid = itertools.product(FLAGS.cells, FLAGS.modes, map(int, FLAGS.batch),
                             map(int, FLAGS.time), map(int, FLAGS.hidden), FLAGS.jit)
    for cell, mode, batch, steps, units, jit in grid:
        train = mode == "train"
        dims = (cell, batch, steps, FLAGS.input_dim, units, train)
        runners = {"fr": keras_runner(FR[cell], *dims, jit),
                   "keras": keras_runner(KERAS[cell], *dims, jit)}
        if have_torch and jit == FLAGS.jit[0]:
            runners["torch"] = torch_runner(*dims)
            # the same Keras model without its recurrent layer: Keras's own cost per call, so
            # floor/torch bounds what any Keras layer can reach against torch at this point
            runners["floor"] = keras_runner(None, *dims, jit)
        rate = time_alternating(runners, FLAGS.repeats, FLAGS.steps, FLAGS.round_seconds)
        gflops = flops_per_step(*dims) * rate["fr"] / 1e9
        torch_cell, vs_torch = torch_columns(rate, "fr")
        _, floor_vs_torch = torch_columns(rate, "floor")
        row = (f"| {cell} | {mode} | {batch} | {steps} | {units} | {jit} | {rate['fr']:.1f} | "
               f"{rate['keras']:.1f} | {torch_cell} | "
               f"{rate['fr'] / rate['keras']:.2f} | "
               f"{vs_torch} | {floor_vs_torch} | "
               f"{gflops:.0f} | ")
        measured.append((row, gflops))
        print(f"{row}{100 * gflops / roof:.0f} % |", flush=True)
    # The roofline again after the grid: one reading can land in a slow spell of a shared
    # machine (runs read 328-445 GFLOP/s); the table uses the better of the two.
    roof = max(roof, matmul_roofline())
    rows += [f"{row}{100 * gflops / roof:.0f} % |" for row, gflops in measured]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    footer = (f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"TF {tf.__version__}, Keras {keras.__version__}"
              f"{', torch ' + __import__('torch').__version__ if have_torch else ''}; "
              f"1024x1024 matmul roofline {roof:.0f} GFLOP/s; {_isa.describe()}; "
              f"process peak RSS {peak_mb:.0f} MB; "
              f"{time.strftime('%Y-%m-%d')}.")
    emit(rows, footer, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
