"""keras_fancyrnn on the backend of ``KERAS_BACKEND`` against keras.layers on the same backend and
that backend's own recurrent layers (torch.nn.LSTM/GRU on PyTorch; flax.linen's
OptimizedLSTMCell/GRUCell under nn.RNN with optax on JAX, where flax is installed), side by side
in one process: training steps (``train_on_batch``: the compiled train step, jit on JAX) and
inference (``predict_on_batch``). Every model is timed alternately after a warm-up; medians
(steps/s) and the ratios. On a GPU every model runs there.

    KERAS_BACKEND=jax python benchmarks/backend_speed.py
    KERAS_BACKEND=torch python benchmarks/backend_speed.py --out=torch.md
"""

from __future__ import annotations

import importlib.util
import itertools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _torch_first  # noqa: E402, F401  (before keras: see the module)
import keras  # noqa: E402
from _runners import FR, KERAS, flax_runner, keras_runner, torch_runner  # noqa: E402
from _timing import cpu_name, emit, time_alternating  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cells", ["lstm", "gru"], "Cells: lstm, gru (simple_rnn: no native column).")
flags.DEFINE_list("modes", ["train", "predict"], "train (train_on_batch, Adam) and/or predict.")
flags.DEFINE_list("sizes", ["64x100", "16x50"], "Grid points BxT.")
flags.DEFINE_integer("hidden", 128, "Units H.")
flags.DEFINE_integer("input_dim", 128, "Input features D.")
flags.DEFINE_integer("repeats", 7, "Timed rounds per model (median reported).")
flags.DEFINE_integer("steps", 10, "Steps per timed round.")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")


def native_column(backend: str) -> tuple[str, str | None]:
    """The backend's own recurrent layers: ``(column name, None)`` where they run, else
    ``(column name, why not)``."""
    if backend == "torch":
        return "torch.nn", None
    if backend == "jax":
        if importlib.util.find_spec("flax") is None or importlib.util.find_spec("optax") is None:
            return "flax", "flax (with optax) not installed"
        return "flax", None
    return "native", f"no native column on {backend}"


def row(backend, cell, mode, batch, steps, native, rate) -> str:
    fr_rate, keras_rate, native_rate = rate["fr"], rate["keras"], rate.get(native)
    native_cells = ("", "") if native_rate is None else (
        f"{native_rate:.1f}", f"{fr_rate / native_rate:.2f}")
    return (f"| {backend} | {cell} | {mode} | {batch} | {steps} | {fr_rate:.1f} "
            f"| {keras_rate:.1f} | {native_cells[0]} | {fr_rate / keras_rate:.2f} "
            f"| {native_cells[1]} |")


def main(argv):
    del argv
    backend = keras.config.backend()
    native, why_not = native_column(backend)
    rows = [f"| backend | cell | mode | B | T | fr steps/s | keras steps/s | {native} steps/s "
            f"| fr/keras | fr/{native} |", "|" + "---|" * 10]
    print("\n".join(rows))
    sizes = [tuple(map(int, s.split("x"))) for s in FLAGS.sizes]
    for cell, mode, (batch, steps) in itertools.product(FLAGS.cells, FLAGS.modes, sizes):
        dims = (cell, batch, steps, FLAGS.input_dim, FLAGS.hidden, mode == "train")
        runners = {"fr": keras_runner(FR[cell], *dims, "auto"),
                   "keras": keras_runner(KERAS[cell], *dims, "auto")}
        if why_not is None:
            runners[native] = (torch_runner if backend == "torch" else flax_runner)(*dims)
        rate = time_alternating(runners, FLAGS.repeats, FLAGS.steps)
        rows.append(row(backend, cell, mode, batch, steps, native, rate))
        print(rows[-1], flush=True)
    footer = (f"\nD={FLAGS.input_dim} H={FLAGS.hidden}; Dense(1) head, Adam, MSE; steps/s, median "
              f"of {FLAGS.repeats} alternating rounds of {FLAGS.steps} steps. Keras "
              f"{keras.__version__} on {backend}; {cpu_name()}, {os.cpu_count()} cores"
              + (f"; {why_not}" if why_not else ""))
    emit(rows, footer, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
