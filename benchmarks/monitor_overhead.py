"""What GradientNormMonitor costs: model.fit with vs without it, at its default frequency.

One model, one process. After a warm-up that traces both the training step and the monitor's
probe pass, fits of ``--steps`` batches with and without the monitor alternate ``--trials``
times (the order flips every trial), so the machine's noise hits both alike; the medians give the
overhead ratio (goal: <= 2 % at the default frequency). The monitor is one instance reused
across trials, as in one long fit, so the timed overhead is the steady state: one forward +
backward on the probe batch every ``every_n_batches`` steps, plus its record at train begin.
The one-time cost of tracing the probe pass (paid once per monitor) is reported separately.

    python benchmarks/monitor_overhead.py                  # LSTM, B=32 T=100 D=8 H=64, 500 steps
    python benchmarks/monitor_overhead.py --cell=simple_rnn --steps=1000 --probe_batch=128
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_fancyrnn as fr  # noqa: E402
from keras_fancyrnn.diagnostics import DEFAULT_EVERY_N_BATCHES  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("cell", "lstm", ["simple_rnn", "lstm", "gru"], "Recurrent layer.")
flags.DEFINE_integer("batch", 32, "Training batch size.")
flags.DEFINE_integer("time", 100, "Sequence length T.")
flags.DEFINE_integer("input_dim", 8, "Input features D.")
flags.DEFINE_integer("units", 64, "Hidden units H.")
flags.DEFINE_integer("steps", 500, "Training steps per timed fit.")
flags.DEFINE_integer("trials", 7, "Timed fits per variant (median reported).")
flags.DEFINE_integer("probe_batch", 64, "Examples in the monitor's probe batch.")
flags.DEFINE_integer("every_n_batches", None,
                     f"Monitor frequency; default: the monitor's ({DEFAULT_EVERY_N_BATCHES}).")
flags.DEFINE_string("jit", "auto", "jit_compile of the model: auto, on, off.")

LAYERS = {"simple_rnn": fr.SimpleRNN, "lstm": fr.LSTM, "gru": fr.GRU}


def build_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((FLAGS.time, FLAGS.input_dim))
    h = LAYERS[FLAGS.cell](FLAGS.units, name="rnn")(inp)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    jit = {"auto": "auto", "on": True, "off": False}[FLAGS.jit]
    model.compile(optimizer="adam", loss="mse", jit_compile=jit)
    return model


def timed_fit(model, x, y, callbacks):
    """(wall seconds, process CPU seconds); CPU time is less sensitive to other processes."""
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(x, y, batch_size=FLAGS.batch, epochs=1, shuffle=False, verbose=0,
              callbacks=callbacks)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    n = FLAGS.batch * FLAGS.steps
    x = rng.normal(0, 1, (n, FLAGS.time, FLAGS.input_dim)).astype("float32")
    y = rng.normal(0, 1, (n, 1)).astype("float32")
    model = build_model()
    kwargs = {} if FLAGS.every_n_batches is None else {"every_n_batches": FLAGS.every_n_batches}
    monitor = fr.GradientNormMonitor((x[: FLAGS.probe_batch], y[: FLAGS.probe_batch]), **kwargs)

    warm = x[: FLAGS.batch * 2], y[: FLAGS.batch * 2]
    timed_fit(model, *warm, [])  # traces the training step
    monitor.set_model(model)
    start = time.perf_counter()
    monitor.record()  # traces the probe pass
    first_record = time.perf_counter() - start
    record_times = []
    for _ in range(9):
        start = time.perf_counter()
        monitor.record()
        record_times.append(time.perf_counter() - start)
    per_record = statistics.median(record_times)

    times = {"without": [], "with": []}
    cpu = {"without": [], "with": []}
    records = []
    for trial in range(FLAGS.trials):
        order = ("without", "with") if trial % 2 == 0 else ("with", "without")
        for variant in order:
            before = len(monitor.steps)
            callbacks = [monitor] if variant == "with" else []
            wall, cpu_s = timed_fit(model, x, y, callbacks)
            times[variant].append(wall)
            cpu[variant].append(cpu_s)
            if variant == "with":
                records.append(len(monitor.steps) - before)
        print(f"trial {trial}: without {times['without'][-1]:.2f} s "
              f"(CPU {cpu['without'][-1]:.2f} s), with {times['with'][-1]:.2f} s "
              f"(CPU {cpu['with'][-1]:.2f} s)", flush=True)

    without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
    every = monitor.every_n_batches
    print(f"\n{FLAGS.cell} B={FLAGS.batch} T={FLAGS.time} D={FLAGS.input_dim} H={FLAGS.units}, "
          f"{FLAGS.steps} steps per fit, monitor every {every} batches + train begin "
          f"({records[0]} records per fit), probe batch {FLAGS.probe_batch}")
    per_step = 1e3 * without / FLAGS.steps
    print(f"median fit without monitor: {without:.3f} s ({per_step:.1f} ms/step)")
    print(f"median fit with monitor:    {with_:.3f} s")
    overhead = 100 * (with_ / without - 1)
    print(f"overhead ratio: {with_ / without:.4f} ({overhead:+.2f} %; goal <= +2 %)")
    # each trial's two fits ran back to back: their ratio is less sensitive to drift
    paired = statistics.median(w / wo for w, wo in zip(times["with"], times["without"]))
    print(f"median of the trials' ratios: {paired:.4f} ({100 * (paired - 1):+.2f} %)")
    cpu_ratio = statistics.median(cpu["with"]) / statistics.median(cpu["without"])
    print(f"CPU-time overhead ratio: {cpu_ratio:.4f} ({100 * (cpu_ratio - 1):+.2f} %)")
    print(f"one probe pass (record): {1e3 * per_record:.1f} ms (median of 9); first record incl. "
          f"tracing (once per monitor): {first_record:.2f} s")
    # The same overhead from its parts, much less sensitive to other processes than the timed fits.
    est = records[0] * per_record / without
    steady = per_record / (every * without / FLAGS.steps)
    print(f"estimated from the parts: {100 * est:+.2f} % for these fits; steady state (one record "
          f"per {every} steps, long fit): {100 * steady:+.2f} %")


if __name__ == "__main__":
    app.run(main)
