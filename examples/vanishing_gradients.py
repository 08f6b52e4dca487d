"""The main job: watch gradients vanish in a tanh RNN, and not in an LSTM or GRU.

Trains three recurrent models, fr.SimpleRNN (tanh), fr.LSTM and fr.GRU, on the adding problem
(Hochreiter & Schmidhuber 1997; Le et al. 2015; Arjovsky et al. 2016) at T = --length (100 by
default): the input is T pairs (value in [0, 1), 0/1 marker), exactly one marker in each half of
the sequence, and the target is the sum of the two marked values. Predicting the constant 1
scores the baseline MSE 1/6 ≈ 0.167; the task counts as solved at test MSE < 0.01.

Each model is Input(T, 2) -> fr layer(units) -> Dense(1), trained with MSE and
fr.ClippingOptimizer(Adam(lr), method="global_norm", threshold=1), with an
fr.GradientNormMonitor recording, every --record_every steps, the per-timestep curve

    g_t = (1/B) Σ_i ‖∂ℓ_i/∂h_t‖

on a fixed probe batch of B test sequences: the total derivative through the recurrence (BPTT),
the quantity of Arjovsky et al. 2016, Fig. 4. In a tanh RNN it is a product of T − t Jacobians
diag(1 − h²) Uᵀ and decays exponentially in T − t; in an LSTM the cell state carries it back
through c_t = f ⊙ c_(t−1) + ... and it decays far less, once the forget gates learn to stay open.

    python examples/vanishing_gradients.py --out /tmp/vanishing_gradients

writes to --out:

  gradient_norms.png   ‖∂ℓ/∂h_t‖ over t (log scale) for every model, at initialisation (left)
                       and at the end of training (right)
  heatmap.png          log10 ‖∂ℓ/∂h_t‖ per record (rows: training step) and timestep, per model
  test_mse.png         test MSE over training against the 0.167 baseline
  results.md, .json    the table (model, final test MSE vs the baseline, solved, first/last
                       gradient ratio at initialisation and at the end, clip rate, skipped
                       steps, seconds) and, in the JSON, the curves and the test-MSE history
  report.md            the table with the pictures embedded
  <model>/grad_norms.csv
                       every record of the monitor (long format)
  tensorboard/<model>  train loss, test MSE and clipping stats; in gradient_norms/ under it the
                       monitor's summaries (tensorboard --logdir <out>/tensorboard)

The defaults (units 64, Adam lr 0.01, batch 32, 2000 steps per model) run in 2-3 minutes on a
2-core laptop CPU. The main logic is in functions (Config, load_data, train_model, run,
write_report) that a test imports.
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
from keras_fancyrnn.diagnostics import decay_rate, json_safe, ratio_first_last  # noqa: E402

#: flag value -> (display name, layer class)
CELLS: dict[str, tuple[str, type]] = {
    "simple_rnn": ("SimpleRNN", fr.SimpleRNN),
    "lstm": ("LSTM", fr.LSTM),
    "gru": ("GRU", fr.GRU),
}
BASELINE_MSE = 1.0 / 6.0  # predicting the constant 1 (frd.baseline("adding_problem", T))
SOLVED_MSE = 0.01
LAYER_NAME = "rnn"  # the monitored layer; its series key in monitor.history


@dataclasses.dataclass
class Config:
    """Everything one run depends on (the flags of the same names)."""

    out: str = "vanishing_gradients_report"
    length: int = 100
    cells: tuple[str, ...] = ("simple_rnn", "lstm", "gru")
    units: int = 64
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 0.01
    clip_method: str = "global_norm"
    clip_threshold: float = 1.0
    record_every: int = 50
    eval_every: int = 100
    probe_size: int = 128
    num_train: int = 10_000
    num_test: int = 1_000
    data: str = "memory"
    data_dir: str | None = None
    seed: int = 0

    def __post_init__(self):
        self.cells = tuple(self.cells)
        unknown = [c for c in self.cells if c not in CELLS]
        if unknown or not self.cells:
            raise ValueError(f"cells must be a non-empty subset of {list(CELLS)}, got "
                             f"{list(self.cells)}")
        for name in ("length", "units", "steps", "batch_size", "record_every", "eval_every",
                     "probe_size", "num_train", "num_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.length < 2:
            raise ValueError(f"length must be >= 2, got {self.length}")
        if self.steps % self.eval_every:
            raise ValueError(f"steps ({self.steps}) must be a multiple of eval_every "
                             f"({self.eval_every})")
        if self.data not in ("memory", "tfds"):
            raise ValueError(f"data must be 'memory' or 'tfds', got {self.data!r}")
        if self.probe_size > self.num_test:
            raise ValueError(f"probe_size ({self.probe_size}) must be <= num_test "
                             f"({self.num_test}): the probe batch is the first test sequences")


# ------------------------------------------------------------------------------------------------
# Data and model
# ------------------------------------------------------------------------------------------------
def load_data(config: Config) -> dict[str, np.ndarray]:
    """``x_train, y_train, x_test, y_test`` of the adding problem at ``config.length``.

    ``data="memory"``: ``frd.adding_problem`` generated in memory (any ``T``, nothing on disk);
    ``"tfds"``: the offline TFDS builder ``adding_problem/length_<T>`` (``T`` in ``frd.LENGTHS``),
    prepared into ``data_dir`` on first use.
    """
    if config.data == "tfds":
        x, y = frd.load_numpy("adding_problem", config.length, "train", n=config.num_train,
                              data_dir=config.data_dir)
        xt, yt = frd.load_numpy("adding_problem", config.length, "test", n=config.num_test,
                                data_dir=config.data_dir)
    else:
        x, y = frd.adding_problem(config.num_train, config.length, seed=2 * config.seed)
        xt, yt = frd.adding_problem(config.num_test, config.length, seed=2 * config.seed + 1)
    return {"x_train": x, "y_train": y[:, None], "x_test": xt, "y_test": yt[:, None]}


def build_model(cell: str, config: Config) -> keras.Model:
    """``Input(T, 2) -> fr.<cell>(units, name="rnn") -> Dense(1)``, compiled with MSE and
    ``fr.ClippingOptimizer(Adam(learning_rate), clip_method, clip_threshold)``."""
    keras.utils.set_random_seed(config.seed)
    layer_cls = CELLS[cell][1]
    model = keras.Sequential(
        [keras.Input((config.length, 2)), layer_cls(config.units, name=LAYER_NAME),
         keras.layers.Dense(1, name="head")],
        name=cell,
    )
    optimizer = fr.ClippingOptimizer(keras.optimizers.Adam(config.learning_rate),
                                     method=config.clip_method, threshold=config.clip_threshold)
    model.compile(optimizer, "mse")
    return model


# ------------------------------------------------------------------------------------------------
# TensorBoard scalars without the tensorboard package (tensorflow-cpu does not install it, and
# keras.callbacks.TensorBoard needs it): tf.summary.write with the scalars plugin's metadata.
# ------------------------------------------------------------------------------------------------
class EvalPrinter(keras.callbacks.Callback):
    """Prints the test MSE (Keras's ``val_loss``) after every evaluation."""

    def __init__(self, name: str, eval_every: int):
        super().__init__()
        self.name, self.eval_every = name, eval_every

    def on_epoch_end(self, epoch, logs=None):
        mse = float((logs or {}).get("val_loss", math.nan))
        print(f"  {self.name:>9} step {(epoch + 1) * self.eval_every:5d}  test MSE {mse:.4f}",
              flush=True)


class ScalarLogger(keras.callbacks.Callback):
    """Writes the epoch logs (train loss, test MSE, ``clip/*`` stats) as TensorBoard scalars at
    the global step, under ``log_dir``."""

    def __init__(self, log_dir: str):
        super().__init__()
        from tensorflow.core.framework import summary_pb2

        self._writer = tf.summary.create_file_writer(log_dir)
        self._meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR,
        )

    def on_epoch_end(self, epoch, logs=None):
        step = int(np.asarray(self.model.optimizer.iterations))
        with self._writer.as_default():
            for name, value in (logs or {}).items():
                value = float(np.asarray(value))
                if math.isfinite(value):
                    tf.summary.write(name, tf.constant(value, tf.float32), step=step,
                                     metadata=self._meta)
        self._writer.flush()

    def on_train_end(self, logs=None):
        self._writer.close()


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def train_model(cell: str, data: dict[str, np.ndarray], config: Config) -> dict[str, Any]:
    """Trains one model for ``config.steps`` steps with the monitor on; returns its row, curves
    and histories (see ``run``)."""
    name = CELLS[cell][0]
    model_dir = os.path.join(config.out, cell)
    tb_dir = os.path.join(config.out, "tensorboard", cell)
    model = build_model(cell, config)
    probe = (data["x_test"][: config.probe_size], data["y_test"][: config.probe_size])
    monitor = fr.GradientNormMonitor(
        probe, layers=LAYER_NAME, every_n_batches=config.record_every, input_norms=False,
        log_dir=tb_dir, csv_path=os.path.join(model_dir, "grad_norms.csv"),
    )
    train = (tf.data.Dataset.from_tensor_slices((data["x_train"], data["y_train"]))
             .shuffle(len(data["x_train"]), seed=config.seed, reshuffle_each_iteration=True)
             .repeat().batch(config.batch_size, drop_remainder=True).prefetch(2))
    test = (data["x_test"], data["y_test"])
    initial_mse = float(model.evaluate(*test, batch_size=500, verbose=0))
    progress = EvalPrinter(name, config.eval_every)
    start = time.perf_counter()
    history = model.fit(
        train, steps_per_epoch=config.eval_every, epochs=config.steps // config.eval_every,
        validation_data=test, validation_batch_size=500, verbose=0, shuffle=False,
        callbacks=[monitor, ScalarLogger(tb_dir), progress],
    )
    if monitor.steps[-1] != config.steps:
        monitor.record()
    seconds = time.perf_counter() - start
    stats = model.optimizer.stats()
    curves = monitor.history[LAYER_NAME]  # [n_records, T]
    test_mse = [initial_mse] + [float(v) for v in history.history["val_loss"]]
    eval_steps = [config.eval_every * k for k in range(len(test_mse))]
    first, last = curves[0], curves[-1]
    row = {
        "model": name,
        "cell": cell,
        "final_test_mse": test_mse[-1],
        "vs_baseline": test_mse[-1] / BASELINE_MSE,
        "best_test_mse": min(test_mse),
        "beats_baseline": test_mse[-1] < 0.5 * BASELINE_MSE,
        "solved": test_mse[-1] < SOLVED_MSE,
        "first_solved_step": next((s for s, m in zip(eval_steps, test_mse) if m < SOLVED_MSE),
                                  None),
        "grad_ratio_init": ratio_first_last(first),
        "grad_ratio_final": ratio_first_last(last),
        # timesteps whose norm is exactly 0: below float32's range (see ``underflow_note``)
        "underflow_init": int(np.sum(first == 0)),
        "underflow_final": int(np.sum(last == 0)),
        "grad_decay_init": decay_rate(first),
        "grad_decay_final": decay_rate(last),
        "clip_rate": stats["clip_rate"],
        "skipped_steps": stats["skipped_steps"],
        "steps": int(np.asarray(model.optimizer.iterations)),
        "params": model.count_params(),
        "seconds": round(seconds, 1),
    }
    return {
        "row": row,
        "record_steps": monitor.steps.tolist(),
        "curves": curves,
        # the monitor's diagnosis of the last record (keras_fancyrnn.diagnostics.findings)
        "findings": [finding.as_dict() for finding in monitor.summary()],
        "eval_steps": eval_steps,
        "test_mse": test_mse,
    }


def run(config: Config) -> dict[str, Any]:
    """Trains a model of every cell of ``config.cells`` and writes the report to ``config.out``.

    Returns ``{"config", "baseline_mse", "seconds", "rows": [...], "models": {cell: {...}}}``
    where each row is the table line of one model and ``models[cell]`` also holds
    ``record_steps``, ``curves`` ([n_records, T] array of ‖∂ℓ/∂h_t‖), ``eval_steps`` and
    ``test_mse``.
    """
    start = time.perf_counter()
    os.makedirs(config.out, exist_ok=True)
    data = load_data(config)
    baseline = float(frd.baseline("adding_problem", config.length).value)
    print(f"adding problem T={config.length}: {len(data['x_train'])} train / "
          f"{len(data['x_test'])} test sequences; baseline test MSE {baseline:.4f}")
    results: dict[str, Any] = {"config": dataclasses.asdict(config), "baseline_mse": baseline,
                               "models": {}}
    progress = _cli.Progress(len(config.cells))
    for cell in config.cells:
        progress.start(f"training {CELLS[cell][0]} ({config.steps} steps)")
        results["models"][cell] = train_model(cell, data, config)
        row = results["models"][cell]["row"]
        progress.finish(f"{row['model']}: final test MSE {row['final_test_mse']:.4f}, "
                        f"{row['seconds']} s")
    results["rows"] = [results["models"][c]["row"] for c in config.cells]
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_report(results, config.out)
    return results


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def underflow_note() -> str:
    return (
        "Timesteps with ‖∂ℓ/∂h_t‖ exactly 0 (gaps in the curves, white in the heatmap, counted as "
        "“t at 0” in the table) are where the float32 backward pass itself underflowed: each "
        "step multiplies ∂ℓ/∂h_t by a Jacobian of norm below 1, and once the components fall "
        "below float32's smallest normal number (about 1.2e-38) TensorFlow flushes them to 0 "
        "(no denormals), so every earlier gradient is exactly 0. (The norm itself is computed "
        "scaled, sqrt(Σ (g/m)²)·m with m = max |g|, so it does not underflow before the "
        "gradient does.) GradientNormMonitor(probe_dtype='float64') follows the curve further "
        "down, in a float64 copy of the model. Where the curve reaches 0 the "
        "ratio is taken from the first timestep with a positive norm, so the true ratio is "
        "smaller still (an upper bound, written “<”)."
    )


def format_ratio(ratio: float, underflow: int) -> str:
    """The first/last ratio; ``< ratio`` when some timesteps underflowed to 0 (the ratio is then
    taken from the first timestep with a positive norm, an upper bound of the true one)."""
    text = _fmt(ratio, ".2e")
    return f"< {text} ({underflow} t at 0)" if underflow else text


def markdown_table(rows: list[dict[str, Any]], baseline: float = BASELINE_MSE) -> str:
    """The results table in Markdown, one line per model."""
    lines = [
        f"| model | final test MSE (baseline {baseline:.3f}) | MSE / baseline | solved (< "
        f"{SOLVED_MSE}) | ‖∂ℓ/∂h_0‖ / ‖∂ℓ/∂h_T‖ at init | … at the end | clip rate | "
        "skipped steps | steps | seconds |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        solved = _fmt(r["solved"])
        if r["solved"] and r.get("first_solved_step") is not None:
            solved += f" (step {r['first_solved_step']})"
        lines.append(
            f"| {r['model']} | {r['final_test_mse']:.4f} | {r['vs_baseline']:.3f} | {solved} | "
            f"{format_ratio(r['grad_ratio_init'], r['underflow_init'])} | "
            f"{format_ratio(r['grad_ratio_final'], r['underflow_final'])} | "
            f"{r['clip_rate']:.2f} | {r['skipped_steps']} | {r['steps']} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def _positive(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    return np.where(np.isfinite(c) & (c > 0), c, np.nan)


def plot_gradient_curves(results: dict[str, Any], path: str) -> None:
    """‖∂ℓ/∂h_t‖ over t, log scale: left at initialisation, right at the end; one line per
    model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for i, res in enumerate(results["models"].values()):
        curves = res["curves"]
        t = np.arange(curves.shape[1])
        label = res["row"]["model"]
        zeros = [int(np.sum(curves[k] == 0)) for k in (0, -1)]
        gap = [f", {z} t at 0 (underflow)" if z else "" for z in zeros]
        axes[0].plot(t, _positive(curves[0]), color=f"C{i}", label=label + gap[0])
        axes[1].plot(t, _positive(curves[-1]), color=f"C{i}",
                     label=f"{label} (test MSE {res['row']['final_test_mse']:.4f}{gap[1]})")
    last_step = max(res["record_steps"][-1] for res in results["models"].values())
    for ax, title in zip(axes, ("at initialisation", f"after {last_step} steps")):
        ax.set_yscale("log")
        ax.set_xlabel("timestep t")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("mean ‖∂ℓ/∂h_t‖ (log scale)")
    T = results["config"]["length"]
    fig.suptitle(f"Gradient of the loss w.r.t. the hidden state, adding problem T={T}")
    fig.tight_layout()
    fig.savefig(path)


def plot_heatmaps(results: dict[str, Any], path: str) -> None:
    """``log10 ‖∂ℓ/∂h_t‖``: rows = records (training step), columns = timestep; one panel per
    model, one shared colour scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = results["models"]
    logs = {}
    for cell, res in models.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            logs[cell] = np.log10(_positive(res["curves"]))
    finite = np.concatenate([v[np.isfinite(v)] for v in logs.values()] or [np.zeros(1)])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig = Figure(figsize=(11, 2.6 * len(models)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    im = None
    for ax, (cell, res) in zip(axes, models.items()):
        data, steps = logs[cell], res["record_steps"]
        n, width = data.shape
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis",
                       vmin=vmin, vmax=vmax, extent=(-0.5, width - 0.5, n - 0.5, -0.5))
        ticks = np.unique(np.linspace(0, n - 1, min(n, 6)).astype(int))
        ax.set_yticks(ticks)
        ax.set_yticklabels([str(steps[k]) for k in ticks])
        ax.set_ylabel("training step")
        ax.set_title(f"{res['row']['model']}: log10 ‖∂ℓ/∂h_t‖ (white: 0, float32 underflow)"
                     if np.any(res["curves"] == 0) else f"{res['row']['model']}: log10 ‖∂ℓ/∂h_t‖")
    axes[-1].set_xlabel("timestep t")
    fig.tight_layout()
    fig.colorbar(im, ax=list(axes), label="log10 ‖∂ℓ/∂h_t‖", shrink=0.9)
    fig.savefig(path)


def plot_test_mse(results: dict[str, Any], path: str) -> None:
    """Test MSE over training steps (log scale) against the baseline and the solved line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, res in enumerate(results["models"].values()):
        ax.plot(res["eval_steps"], res["test_mse"], "o-", ms=3, color=f"C{i}",
                label=res["row"]["model"])
    ax.axhline(results["baseline_mse"], color="gray", ls="--", label="baseline 1/6")
    ax.axhline(SOLVED_MSE, color="gray", ls=":", label=f"solved ({SOLVED_MSE})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("test MSE")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def write_report(results: dict[str, Any], out: str) -> dict[str, str]:
    """Writes the pictures, ``results.md``, ``results.json`` and ``report.md`` to ``out``;
    returns ``{kind: path}``."""
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in (
        "gradient_norms.png", "heatmap.png", "test_mse.png", "results.md", "results.json",
        "report.md")}
    plot_gradient_curves(results, paths["gradient_norms.png"])
    plot_heatmaps(results, paths["heatmap.png"])
    plot_test_mse(results, paths["test_mse.png"])
    table = markdown_table(results["rows"], results["baseline_mse"])
    print()
    print(table)
    with open(paths["results.md"], "w") as f:
        f.write(table)
    payload = {
        "config": results["config"],
        "baseline_mse": results["baseline_mse"],
        "seconds": results.get("seconds"),
        "rows": results["rows"],
        "models": {
            cell: {k: res[k] for k in ("record_steps", "eval_steps", "test_mse", "findings")}
            | {"curve_init": res["curves"][0], "curve_final": res["curves"][-1]}
            for cell, res in results["models"].items()
        },
    }
    with open(paths["results.json"], "w") as f:
        json.dump(json_safe(payload), f, indent=1)
    print(diagnosis_markdown(results))
    with open(paths["report.md"], "w") as f:
        f.write(report_markdown(results, table))
    print(f"wrote {out}/: gradient_norms.png heatmap.png test_mse.png results.md results.json "
          "report.md, tensorboard/, <model>/grad_norms.csv")
    return paths


def diagnosis_markdown(results: dict[str, Any]) -> str:
    """The monitor's findings at the end of each model's training (``monitor.summary()``), one
    bullet each, or that it found nothing to report."""
    lines = ["Diagnosis (GradientNormMonitor.summary() after the last step):", ""]
    for res in results["models"].values():
        name = res["row"]["model"]
        texts = [f["text"] for f in res.get("findings", [])]
        lines += [f"* **{name}**: {text}" for text in texts] or [
            f"* **{name}**: no vanishing or exploding gradients or saturated units found."]
    return "\n".join(lines) + "\n"


def report_markdown(results: dict[str, Any], table: str) -> str:
    c = results["config"]
    lines = [
        f"# Vanishing gradients on the adding problem, T = {c['length']}",
        "",
        f"Models `Input({c['length']}, 2) -> fr layer({c['units']}) -> Dense(1)`, MSE, "
        f"`fr.ClippingOptimizer(Adam({c['learning_rate']}), method={c['clip_method']!r}, "
        f"threshold={c['clip_threshold']})`, batch {c['batch_size']}, {c['steps']} steps each, "
        f"{c['num_train']} training / {c['num_test']} test sequences (data: {c['data']}), "
        f"seed {c['seed']}. Baseline (predict 1): test MSE {results['baseline_mse']:.3f}; "
        f"solved: < {SOLVED_MSE}. Total run time {results.get('seconds')} s.",
        "",
        table,
        "The gradient ratio is the mean ‖∂ℓ/∂h_t‖ at the first timestep over that at the last, "
        f"on a probe batch of {c['probe_size']} test sequences (total derivative through the "
        "recurrence, `GradientNormMonitor`): ≪ 1 means the loss barely reaches the start of the "
        "sequence, where the first marked value sits.",
        "",
        "![‖∂ℓ/∂h_t‖ over t at initialisation and at the end](gradient_norms.png)",
        "",
    ]
    notes = []
    for r in results["rows"]:
        notes.append(
            f"* **{r['model']}**: first/last ratio "
            f"{format_ratio(r['grad_ratio_init'], r['underflow_init'])} at initialisation, "
            f"{format_ratio(r['grad_ratio_final'], r['underflow_final'])} after {r['steps']} "
            f"steps (fitted: ln‖∂ℓ/∂h_t‖ drops by {_fmt(r['grad_decay_final'], '.3f')} per step "
            f"back in time); test MSE {r['final_test_mse']:.4f} at the end, "
            f"{r['best_test_mse']:.4f} at best ({r['vs_baseline']:.1%} of the baseline at the "
            "end" + (f"; solved at step {r['first_solved_step']}" if r["solved"] else "") + ")."
        )
    notes += [
        "",
        "Reading the picture. A tanh RNN's ∂ℓ/∂h_t is a product of T − t Jacobians "
        "diag(1 − h²) Uᵀ, so it shrinks geometrically with the distance to the loss; once training "
        "saturates its units, the signal from the first marker is many orders of magnitude "
        "below that from the last step, and the model does not beat the baseline. An LSTM "
        "carries the gradient back along c_t = f ⊙ c_{t−1} + …, at a rate set by its forget "
        "gates: at initialisation (b_f = 1, f ≈ σ(1) ≈ 0.73) that path decays too, faster than "
        "the tanh RNN's (whose orthogonal U and small pre-activations start it near an "
        "isometry), but training opens the gates, the curve flattens and the task is solved. "
        "The GRU's update gate (z ≈ 0.5 at initialisation, h_t = z ⊙ h_{t−1} + …) does the same. "
        "The clip rate is the fraction of steps whose global gradient norm exceeded the "
        "threshold and was rescaled; skipped steps had a non-finite gradient.",
        "",
        underflow_note(),
    ]
    lines += notes + [
        "",
        diagnosis_markdown(results),
        "Over training (rows: training step; columns: timestep; colour: log10 ‖∂ℓ/∂h_t‖):",
        "",
        "![heatmap](heatmap.png)",
        "",
        "![test MSE over training](test_mse.png)",
        "",
        "TensorBoard: `tensorboard --logdir tensorboard` (loss, test MSE, clipping statistics, "
        "and the monitor's per-record histograms and curves).",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS
_D = Config()
flags.DEFINE_string("out", _D.out, "Directory for the report, pictures, CSVs and TensorBoard.")
flags.DEFINE_integer("length", _D.length,
                     "Sequence length T (the time lag) of the adding problem.", lower_bound=2)
flags.DEFINE_list("cells", list(_D.cells),
                  f"Comma-separated cells to train a model of, from {', '.join(CELLS)}.")
flags.DEFINE_integer("units", _D.units, "Hidden units of every recurrent layer.", lower_bound=1)
flags.DEFINE_integer("steps", _D.steps, "Training steps (batches) per model.", lower_bound=1)
flags.DEFINE_integer("batch_size", _D.batch_size, "Batch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate.")
flags.DEFINE_enum("clip_method", _D.clip_method, ["global_norm", "norm", "value", "adaptive"],
                  "fr.ClippingOptimizer method.")
flags.DEFINE_float("clip_threshold", _D.clip_threshold, "fr.ClippingOptimizer threshold.")
flags.DEFINE_integer("record_every", _D.record_every,
                     "GradientNormMonitor: record every this many steps.", lower_bound=1)
flags.DEFINE_integer("eval_every", _D.eval_every,
                     "Evaluate the test MSE every this many steps (must divide --steps).",
                     lower_bound=1)
flags.DEFINE_integer("probe_size", _D.probe_size,
                     "Test sequences in the monitor's probe batch.", lower_bound=1)
flags.DEFINE_integer("num_train", _D.num_train, "Training sequences.", lower_bound=1)
flags.DEFINE_integer("num_test", _D.num_test, "Test sequences.", lower_bound=1)
flags.DEFINE_enum("data", _D.data, ["memory", "tfds"],
                  "memory: frd.adding_problem in memory (any T); tfds: the offline TFDS builder "
                  "adding_problem/length_<T> (T in 50, 100, 200, 400, 750, 1000).")
flags.DEFINE_string("data_dir", None, "TFDS data directory for --data=tfds.")
flags.DEFINE_integer("seed", _D.seed, "Seed of the data and the initialisation.", lower_bound=0)


def config_from_flags() -> Config:
    return Config(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)})


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    results = run(config_from_flags())
    print(f"total {results['seconds']} s")


if __name__ == "__main__":
    app.run(main)
