r"""Which recurrent cell solves the adding problem at which time lag, with and without clipping.

The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015; Arjovsky et al. 2016): T pairs
(value in [0, 1), 0/1 marker) with one marker in each half of the sequence; the target is the sum
of the two marked values. Predicting 1 scores the baseline MSE 1/6 ≈ 0.167; a setting solves the
task when its test MSE falls below --solved_mse (0.01).

The sweep is the product --cells × --lengths × --clipping:

  cells     simple_rnn (tanh); lstm (unit_forget_bias); gru; chrono_lstm (fr.LSTM with
            fr.initializers.ChronoBias(T), Tallec & Ollivier 2018: forget biases log U[1, T − 1],
            input biases their negatives); irnn (ReLU SimpleRNN with an identity recurrent
            kernel, Le et al. 2015)
  clipping  on: fr.ClippingOptimizer(Adam(lr), method="global_norm", threshold=--clip_threshold);
            off: plain Adam(lr)

Each setting trains Input(T, 2) -> cell(units) -> Dense(1) for at most --steps steps (and at most
--max_seconds), evaluates the test MSE every --eval_every steps and stops as soon as it is
solved, reporting the step. Results are rewritten after every setting, so a long sweep can be
watched (results.md) and a killed one keeps what it finished.

    python examples/adding_problem.py --out /tmp/adding --cells lstm,gru,simple_rnn \
        --lengths 50,100,200 --clipping on

writes results.md and results.json to --out. The defaults (LSTM and GRU at T = 50 and 100,
clipping on and off, at most 3000 steps each, each stopping when solved) take about five minutes
on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import _cli

_cli.quiet_startup()  # before TensorFlow loads

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_fancyrnn as fr  # noqa: E402
from keras_fancyrnn import datasets as frd  # noqa: E402
from keras_fancyrnn._tf import tf  # noqa: E402
from keras_fancyrnn.diagnostics import gradient_norms, json_safe, ratio_first_last  # noqa: E402

CELLS = ("simple_rnn", "lstm", "gru", "chrono_lstm", "irnn")
CLIPPING = ("on", "off")
BASELINE_MSE = 1.0 / 6.0
LAYER_NAME = "rnn"


@dataclasses.dataclass
class Config:
    """The sweep (the flags of the same names)."""

    out: str = "adding_problem_results"
    cells: tuple[str, ...] = ("lstm", "gru")
    lengths: tuple[int, ...] = (50, 100)
    clipping: tuple[str, ...] = ("on", "off")
    units: int = 64
    batch_size: int = 32
    learning_rate: float = 0.01
    clip_threshold: float = 1.0
    steps: int = 3000
    max_seconds: float = 0.0
    eval_every: int = 100
    solved_mse: float = 0.01
    num_train: int = 10_000
    num_test: int = 1_000
    data: str = "memory"
    data_dir: str | None = None
    seed: int = 0

    def __post_init__(self):
        self.cells, self.clipping = tuple(self.cells), tuple(self.clipping)
        self.lengths = tuple(int(t) for t in self.lengths)
        for name, allowed in (("cells", CELLS), ("clipping", CLIPPING)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}, got "
                                 f"{list(values)}")
        if not self.lengths or min(self.lengths) < 4:
            raise ValueError(f"lengths must be integers >= 4, got {list(self.lengths)}")
        for name in ("units", "batch_size", "steps", "eval_every", "num_train", "num_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.data not in ("memory", "tfds"):
            raise ValueError(f"data must be 'memory' or 'tfds', got {self.data!r}")


def load_data(length: int, config: Config) -> dict[str, np.ndarray]:
    """Training and test arrays at ``length`` (in memory, or the offline TFDS builder)."""
    if config.data == "tfds":
        x, y = frd.load_numpy("adding_problem", length, "train", n=config.num_train,
                              data_dir=config.data_dir)
        xt, yt = frd.load_numpy("adding_problem", length, "test", n=config.num_test,
                                data_dir=config.data_dir)
    else:
        x, y = frd.adding_problem(config.num_train, length, seed=2 * config.seed)
        xt, yt = frd.adding_problem(config.num_test, length, seed=2 * config.seed + 1)
    return {"x_train": x, "y_train": y[:, None], "x_test": xt, "y_test": yt[:, None]}


def make_layer(cell: str, units: int, length: int, seed: int) -> keras.layers.Layer:
    """The recurrent layer of a setting (named ``"rnn"``)."""
    if cell == "simple_rnn":
        return fr.SimpleRNN(units, name=LAYER_NAME)
    if cell == "irnn":
        return fr.SimpleRNN(units, activation="relu", name=LAYER_NAME,
                            recurrent_initializer=keras.initializers.Identity(),
                            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001,
                                                                               seed=seed))
    if cell == "lstm":
        return fr.LSTM(units, name=LAYER_NAME)
    if cell == "chrono_lstm":
        return fr.LSTM(units, unit_forget_bias=False, name=LAYER_NAME,
                       bias_initializer=fr.initializers.ChronoBias(length, seed=seed))
    if cell == "gru":
        return fr.GRU(units, name=LAYER_NAME)
    raise ValueError(f"cell must be one of {list(CELLS)}, got {cell!r}")


def build_model(cell: str, length: int, clipping: str, config: Config) -> keras.Model:
    keras.utils.set_random_seed(config.seed)
    model = keras.Sequential(
        [keras.Input((length, 2)), make_layer(cell, config.units, length, config.seed),
         keras.layers.Dense(1, name="head")],
        name=f"{cell}_T{length}_clip_{clipping}",
    )
    optimizer = keras.optimizers.Adam(config.learning_rate)
    if clipping == "on":
        optimizer = fr.ClippingOptimizer(optimizer, method="global_norm",
                                         threshold=config.clip_threshold)
    model.compile(optimizer, "mse")
    return model


class StopWhenSolved(keras.callbacks.Callback):
    """After every evaluation (``val_loss`` = test MSE): stop when it is below ``solved_mse``,
    or when ``max_seconds`` (> 0) have passed, or when the loss is not finite."""

    def __init__(self, solved_mse: float, eval_every: int, max_seconds: float, label: str):
        super().__init__()
        self.solved_mse, self.eval_every = solved_mse, eval_every
        self.max_seconds, self.label = max_seconds, label
        self.history: list[tuple[int, float]] = []
        self.solved_step: int | None = None
        self.reason = "step budget"

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        step = (epoch + 1) * self.eval_every
        mse = float((logs or {}).get("val_loss", math.nan))
        self.history.append((step, mse))
        print(f"  {self.label}: step {step:5d}  test MSE {mse:.4f}", flush=True)
        if mse < self.solved_mse:
            self.solved_step, self.reason = step, "solved"
            self.model.stop_training = True
        elif not math.isfinite(mse):
            self.reason = "non-finite loss"
            self.model.stop_training = True
        elif self.max_seconds > 0 and time.perf_counter() - self.start > self.max_seconds:
            self.reason = "time budget"
            self.model.stop_training = True


def run_setting(cell: str, length: int, clipping: str, data: dict[str, np.ndarray],
                config: Config) -> dict[str, Any]:
    """Trains one setting until solved or out of budget; returns its result row."""
    label = f"{cell} T={length} clip={clipping}"
    model = build_model(cell, length, clipping, config)
    train = (tf.data.Dataset.from_tensor_slices((data["x_train"], data["y_train"]))
             .shuffle(len(data["x_train"]), seed=config.seed, reshuffle_each_iteration=True)
             .repeat().batch(config.batch_size, drop_remainder=True).prefetch(2))
    test = (data["x_test"], data["y_test"])
    stopper = StopWhenSolved(config.solved_mse, config.eval_every, config.max_seconds, label)
    start = time.perf_counter()
    model.fit(train, steps_per_epoch=config.eval_every,
              epochs=max(config.steps // config.eval_every, 1), validation_data=test,
              validation_batch_size=500, shuffle=False, verbose=0, callbacks=[stopper])
    seconds = time.perf_counter() - start
    mses = [m for _, m in stopper.history]
    probe = (data["x_test"][:128], data["y_test"][:128])
    curve = gradient_norms(model, *probe, layers=LAYER_NAME, input_norms=False)[LAYER_NAME]
    optimizer = model.optimizer
    stats = optimizer.stats() if isinstance(optimizer, fr.ClippingOptimizer) else {}
    steps = stopper.history[-1][0] if stopper.history else 0
    return {
        "cell": cell,
        "length": length,
        "clipping": clipping,
        "solved": stopper.solved_step is not None,
        "solved_step": stopper.solved_step,
        "steps": steps,
        "final_test_mse": mses[-1] if mses else math.nan,
        "best_test_mse": float(np.nanmin(mses)) if mses and np.isfinite(mses).any() else math.nan,
        "stopped_by": stopper.reason,
        "grad_ratio_final": ratio_first_last(curve),
        # timesteps whose norm underflowed to 0 in float32: the ratio is then an upper bound
        "underflow_final": int(np.sum(np.asarray(curve) == 0)),
        "clip_rate": stats.get("clip_rate"),
        "skipped_steps": stats.get("skipped_steps"),
        "seconds": round(seconds, 1),
        "ms_per_step": round(1000 * seconds / max(steps, 1), 1),
        "mse_history": stopper.history,
    }


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def _ratio(row: dict[str, Any]) -> str:
    text = _fmt(row["grad_ratio_final"], ".2e")
    zeros = row.get("underflow_final", 0)
    return f"< {text} ({zeros} t at 0)" if zeros else text


def markdown_table(rows: list[dict[str, Any]], config: Config) -> str:
    lines = [
        f"Adding problem sweep: units {config.units}, Adam lr {config.learning_rate}, batch "
        f"{config.batch_size}, clip threshold {config.clip_threshold} (global norm), at most "
        f"{config.steps} steps" + (f" / {config.max_seconds:g} s" if config.max_seconds > 0
                                       else "")
        + f" per setting, test MSE every {config.eval_every} steps; solved: test MSE < "
        f"{config.solved_mse}; baseline {BASELINE_MSE:.3f}. The gradient ratio is ‖∂ℓ/∂h_t‖ "
        "(mean over 128 test sequences) at the first timestep over the last, at the end; "
        "“< x (n t at 0)”: n timesteps underflowed to 0 in float32, x is from the first "
        "positive one.",
        "",
        "| cell | T | clipping | solved? | steps to solve | steps run | final test MSE | "
        "best test MSE | ‖∂ℓ/∂h_0‖/‖∂ℓ/∂h_T‖ (end) | clip rate | skipped | stopped by | s | "
        "ms/step |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['length']} | {r['clipping']} | {_fmt(r['solved'])} | "
            f"{_fmt(r['solved_step'])} | {r['steps']} | {_fmt(r['final_test_mse'])} | "
            f"{_fmt(r['best_test_mse'])} | {_ratio(r)} | "
            f"{_fmt(r['clip_rate'], '.2f')} | {_fmt(r['skipped_steps'])} | {r['stopped_by']} | "
            f"{r['seconds']} | {r['ms_per_step']} |"
        )
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], config: Config) -> None:
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "results.md"), "w") as f:
        f.write(markdown_table(rows, config))
    with open(os.path.join(config.out, "results.json"), "w") as f:
        json.dump(json_safe({"config": dataclasses.asdict(config), "rows": rows}), f, indent=1)


def sweep(config: Config) -> list[dict[str, Any]]:
    """Runs every setting (lengths outermost, so each data set is generated once); writes the
    results after each one; returns the rows."""
    rows: list[dict[str, Any]] = []
    progress = _cli.Progress(len(config.lengths) * len(config.cells) * len(config.clipping))
    for length in config.lengths:
        data = load_data(length, config)
        for cell in config.cells:
            for clipping in config.clipping:
                label = f"{cell} T={length} clip={clipping}"
                progress.start(label)
                row = run_setting(cell, length, clipping, data, config)
                rows.append(row)
                verdict = f"solved at step {row['solved_step']}" if row["solved"] else (
                    f"not solved ({row['stopped_by']})")
                progress.finish(f"{label}: {verdict}, final test MSE "
                                f"{row['final_test_mse']:.4f}, {row['seconds']} s")
                write_results(rows, config)
    print()
    print(markdown_table(rows, config))
    return rows


FLAGS = flags.FLAGS
_D = Config()
flags.DEFINE_string("out", _D.out, "Directory for results.md and results.json.")
flags.DEFINE_list("cells", list(_D.cells), f"Cells to sweep, from {', '.join(CELLS)}.")
flags.DEFINE_list("lengths", [str(t) for t in _D.lengths],
                  "Sequence lengths T (time lags) to sweep.")
flags.DEFINE_list("clipping", list(_D.clipping),
                  "Clipping settings to sweep: on (fr.ClippingOptimizer, global norm), off.")
flags.DEFINE_integer("units", _D.units, "Hidden units.", lower_bound=1)
flags.DEFINE_integer("batch_size", _D.batch_size, "Batch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate.")
flags.DEFINE_float("clip_threshold", _D.clip_threshold, "Global-norm clipping threshold.")
flags.DEFINE_integer("steps", _D.steps,
                     "Training steps per setting, at most (a setting stops once solved).",
                     lower_bound=1)
flags.DEFINE_float("max_seconds", _D.max_seconds,
                   "Wall-time budget per setting in seconds (checked at each evaluation; 0: "
                   "none).")
flags.DEFINE_integer("eval_every", _D.eval_every, "Evaluate the test MSE every N steps.",
                     lower_bound=1)
flags.DEFINE_float("solved_mse", _D.solved_mse, "Test MSE below which a setting is solved.")
flags.DEFINE_integer("num_train", _D.num_train, "Training sequences.", lower_bound=1)
flags.DEFINE_integer("num_test", _D.num_test, "Test sequences.", lower_bound=1)
flags.DEFINE_enum("data", _D.data, ["memory", "tfds"],
                  "memory: generated in memory (any T); tfds: the offline TFDS builder "
                  "(T in 50, 100, 200, 400, 750, 1000).")
flags.DEFINE_string("data_dir", None, "TFDS data directory for --data=tfds.")
flags.DEFINE_integer("seed", _D.seed, "Seed of the data and the initialisation.", lower_bound=0)


def config_from_flags() -> Config:
    return Config(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)})


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    sweep(config_from_flags())
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app.run(main)
