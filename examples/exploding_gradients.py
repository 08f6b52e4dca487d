"""Exploding gradients in a tanh RNN: plain SGD diverges to nan, the ClippingOptimizer trains.

A tanh SimpleRNN whose recurrent kernel is drawn with a large gain, U ~ N(0, gain² / units), is
in the chaotic regime for gain > 1: the BPTT Jacobian products diag(1 − h_t²) Uᵀ grow with the
time lag, and the gradient of the loss reaches hundreds or thousands at initialisation (Pascanu,
Mikolov & Bengio 2013). One plain SGD step of that size throws the weights far away and the loss
becomes inf, then nan. The same model and data trained with
ClippingOptimizer(SGD(lr), method="global_norm", threshold=1) ("if the norm of the gradient is
greater than some threshold, scale it down before applying the SGD update") learns.

Task: the input is a sequence x_t ~ U[−1, 1] of length --length; the target is the sum of its
last 5 values. Predicting the mean scores the baseline MSE, Var(y) = 5/3.

Both runs log the global gradient norm of every step through keras_fancyrnn.ClippingStats. For
the plain-SGD run the wrapper is only a monitor: threshold=1e38 never fires and
skip_nonfinite=False lets nan through, and an update under the threshold is bit-identical to the
inner optimizer's (tests/optim/test_clipping.py checks this), so that run is plain SGD.

    python examples/exploding_gradients.py --out /tmp/exploding

writes summary.json and summary.md to --out. The defaults run in about 15 s on a CPU.
"""

from __future__ import annotations

import json
import math
import os
import time

import _cli

_cli.quiet_startup()  # before TensorFlow loads

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from keras_fancyrnn.diagnostics import json_safe  # noqa: E402
from keras_fancyrnn.optim import METHODS, ClippingOptimizer, ClippingStats  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("length", 30, "Sequence length T.")
flags.DEFINE_integer("units", 32, "Hidden units of the tanh SimpleRNN.")
flags.DEFINE_float("gain", 2.5, "Recurrent init: U ~ N(0, gain^2 / units); > 1 is chaotic.")
flags.DEFINE_float("learning_rate", 0.1, "SGD learning rate, the same for both runs.")
flags.DEFINE_enum("clip_method", "global_norm", list(METHODS), "ClippingOptimizer method.")
flags.DEFINE_float("clip_threshold", None,
                  "Clip threshold (default: the method's; none for 'auto').")
flags.DEFINE_integer("epochs", 30, "Training epochs.")
flags.DEFINE_integer("num_train", 2048, "Training sequences.")
flags.DEFINE_integer("num_test", 512, "Test sequences.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("seed", 0, "Seed for data and initialisation.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_integer("show_steps", 6, "Per-step gradient norms to print from the first epoch.")
flags.DEFINE_string("out", None, "Directory for summary.json and summary.md (optional).")

LAST = 5  # the target sums the last LAST inputs


def make_data(n: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-1.0, 1.0, size=(n, length, 1)).astype("float32")
    y = x[:, -LAST:, 0].sum(axis=1, keepdims=True).astype("float32")
    return x, y


def make_model(length: int, units: int, gain: float, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    recurrent_init = keras.initializers.RandomNormal(stddev=gain / math.sqrt(units), seed=seed)
    return keras.Sequential(
        [
            keras.Input((length, 1)),
            keras.layers.SimpleRNN(units, activation="tanh", recurrent_initializer=recurrent_init),
            keras.layers.Dense(1),
        ]
    )


class StepRecorder(keras.callbacks.Callback):
    """Keeps the first steps' logs and the first step with a non-finite gradient norm or loss
    (ClippingStats must come before it in the callbacks)."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep, self.steps, self.seen = keep, [], 0
        self.first_nonfinite_grad_norm = self.first_nonfinite_loss = None

    def on_train_batch_end(self, batch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.seen += 1
        if len(self.steps) < self.keep:
            self.steps.append(logs)
        if self.first_nonfinite_grad_norm is None and not math.isfinite(logs["grad_norm"]):
            self.first_nonfinite_grad_norm = self.seen
        if self.first_nonfinite_loss is None and not math.isfinite(logs["loss"]):
            self.first_nonfinite_loss = self.seen


def train(name: str, optimizer: ClippingOptimizer, data: dict, progress: _cli.Progress) -> dict:
    progress.start(f"training with {name} ({FLAGS.epochs} epochs)")
    model = make_model(FLAGS.length, FLAGS.units, FLAGS.gain, FLAGS.seed)
    model.compile(optimizer, "mse", jit_compile=FLAGS.jit_compile)
    recorder = StepRecorder(FLAGS.show_steps)
    start = time.time()
    history = model.fit(
        data["x_train"],
        data["y_train"],
        batch_size=FLAGS.batch_size,
        epochs=FLAGS.epochs,
        verbose=0,
        callbacks=[ClippingStats(), recorder],
    )
    seconds = time.time() - start
    test_mse = float(model.evaluate(data["x_test"], data["y_test"], verbose=0))
    weights_finite = all(np.all(np.isfinite(w)) for w in model.get_weights())
    stats = optimizer.stats()
    progress.finish(f"{name}: {seconds:.1f} s, test MSE {test_mse:.4g}, weights finite: "
                    f"{weights_finite}")
    return {
        "first_nonfinite_grad_norm_step": recorder.first_nonfinite_grad_norm,
        "first_nonfinite_loss_step": recorder.first_nonfinite_loss,
        "steps": recorder.seen,
        "name": name,
        "seconds": round(seconds, 2),
        "test_mse": test_mse,
        "weights_finite": weights_finite,
        "first_steps": recorder.steps,
        "epochs": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "final_stats": stats,
    }


def nonfinite_report(run: dict) -> str:
    """The step at which a run's gradient norm and loss first became non-finite, or that they
    never did (the first-step fields are None then: a mild --gain, a short --length or few steps
    do not make plain SGD diverge)."""
    steps = run["steps"]
    first = {"gradient norm": run["first_nonfinite_grad_norm_step"],
             "loss": run["first_nonfinite_loss_step"]}
    if all(step is None for step in first.values()):
        return f"no non-finite gradient norm or loss in {steps} steps"
    return ", ".join(f"first non-finite {what} at step {step} of {steps}" if step is not None
                     else f"{what} finite in all {steps} steps" for what, step in first.items())


def fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def markdown(summary: dict) -> str:
    plain, clipped = summary["plain"], summary["clipped"]
    lines = [
        f"Exploding gradients: tanh SimpleRNN({FLAGS.units}), T={FLAGS.length}, recurrent gain "
        f"{FLAGS.gain}, SGD lr={FLAGS.learning_rate}; clipped run: method={FLAGS.clip_method}, "
        f"threshold={clipped['threshold']}. Baseline test MSE (predict the mean) "
        f"{summary['baseline_mse']:.4g}.",
        "",
        f"Norm of the full-training-set gradient at initialisation: "
        f"{summary['initial_grad_norm']:.4g}.",
        "",
        "First steps (grad_norm before clipping / loss so far):",
        "",
        "| step | plain SGD grad_norm | plain SGD loss | clipped grad_norm | clipped loss |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, (p, c) in enumerate(zip(plain["first_steps"], clipped["first_steps"], strict=False)):
        lines.append(
            f"| {i + 1} | {fmt(p['grad_norm'])} | {fmt(p['loss'])} | {fmt(c['grad_norm'])} | "
            f"{fmt(c['loss'])} |"
        )
    lines += [
        "",
        "| epoch | plain SGD loss | clipped loss | grad_norm (last step) | clip_rate | "
        "skipped_steps |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    ce = clipped["epochs"]
    for e in range(len(ce["loss"])):
        lines.append(
            f"| {e + 1} | {fmt(plain['epochs']['loss'][e])} | {fmt(ce['loss'][e])} | "
            f"{fmt(ce['grad_norm'][e])} | {ce['clip_rate'][e]:.3f} | "
            f"{int(ce['skipped_steps'][e])} |"
        )
    lines += [
        "",
        f"Plain SGD: {nonfinite_report(plain)}. Clipped: "
        f"{clipped['final_stats']['clipped_steps']} of {clipped['final_stats']['applied_steps']} "
        f"steps clipped, {clipped['final_stats']['skipped_steps']} skipped.",
        "",
        f"Test MSE: plain SGD {fmt(plain['test_mse'])}, clipped {fmt(clipped['test_mse'])} "
        f"(baseline {summary['baseline_mse']:.4g}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    x_train, y_train = make_data(FLAGS.num_train, FLAGS.length, rng)
    x_test, y_test = make_data(FLAGS.num_test, FLAGS.length, rng)
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    baseline = float(np.mean((y_test - y_train.mean()) ** 2))

    probe = make_model(FLAGS.length, FLAGS.units, FLAGS.gain, FLAGS.seed)
    probe_opt = ClippingOptimizer(keras.optimizers.SGD(0.0), threshold=1e38)
    probe.compile(probe_opt, "mse")
    probe.fit(x_train, y_train, batch_size=len(x_train), verbose=0)  # one full-batch step
    initial_norm = probe_opt.stats()["grad_norm"]
    print(f"baseline test MSE {baseline:.4g}; gradient norm at initialisation {initial_norm:.4g}")

    progress = _cli.Progress(2)  # the plain and the clipped run
    plain = train(
        "plain SGD",
        ClippingOptimizer(
            keras.optimizers.SGD(FLAGS.learning_rate), threshold=1e38, skip_nonfinite=False
        ),
        data,
        progress,
    )
    clipping = ClippingOptimizer(
        keras.optimizers.SGD(FLAGS.learning_rate), method=FLAGS.clip_method,
        threshold=FLAGS.clip_threshold,
    )
    clipped = train(f"ClippingOptimizer({FLAGS.clip_method})", clipping, data, progress)
    clipped["threshold"] = clipping.threshold

    summary = {
        "flags": {
            name: FLAGS[name].value
            for name in (
                "length",
                "units",
                "gain",
                "learning_rate",
                "clip_method",
                "clip_threshold",
                "epochs",
                "num_train",
                "num_test",
                "batch_size",
                "seed",
                "jit_compile",
            )
        },
        "baseline_mse": baseline,
        "initial_grad_norm": initial_norm,
        "plain": plain,
        "clipped": clipped,
    }
    text = markdown(summary)
    print()
    print(text)
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "summary.json"), "w") as f:
            json.dump(json_safe(summary), f, indent=2)
        with open(os.path.join(FLAGS.out, "summary.md"), "w") as f:
            f.write(text)
        print(f"wrote {FLAGS.out}/summary.json and summary.md")


if __name__ == "__main__":
    app.run(main)
