"""The gradient-norm monitor in a custom training loop (tf.GradientTape), without model.fit.

A tanh SimpleRNN learns the adding problem (keras_fancyrnn.datasets: two marked numbers out of
a sequence of length --length, the target is their sum) in a hand-written loop: a GradientTape,
the gradients, ClippingOptimizer.apply. The GradientNormMonitor is used as a plain object:

    monitor = fr.GradientNormMonitor((x_probe, y_probe), loss=per_example_loss)
    monitor.set_model(model)              # instead of fit's callbacks=[monitor]
    ...
    monitor.record(step, clip_stats=optimizer.stats())   # every --record_every steps

loss= gives the per-example losses (the model is not compiled), clip_stats= the optimizer's
clipping statistics (fit reads them from model.optimizer, which a custom loop does not set).
fr.gradient_norms(model, x, y, loss=...) gives one curve without a monitor.

    python examples/custom_loop_monitor.py --out /tmp/custom_loop

prints the ratio of the gradient norm at the first and the last step, the clip rate and the
monitor's findings, and writes gradient_norms.csv, gradient_norms.png and summary.json to --out.
The defaults run in a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os

import _cli

_cli.quiet_startup()  # before TensorFlow loads

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_fancyrnn as fr  # noqa: E402
from keras_fancyrnn.diagnostics import json_safe  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("length", 20, "Sequence length T of the adding problem.")
flags.DEFINE_integer("units", 16, "Hidden units of the tanh SimpleRNN.")
flags.DEFINE_integer("steps", 40, "Training steps of the custom loop.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("probe_size", 16, "Examples in the monitor's probe batch.")
flags.DEFINE_integer("record_every", 10, "Record the gradient-norm curve every this many steps.")
flags.DEFINE_float("learning_rate", 0.05, "SGD learning rate.")
flags.DEFINE_float("clip_threshold", 1.0, "Global-norm clip threshold of the ClippingOptimizer.")
flags.DEFINE_integer("seed", 0, "Seed for data and initialisation.")
flags.DEFINE_string("out", None, "Directory for the CSV, the plot and summary.json (optional).")


def per_example_loss(y_true, y_pred):
    """Squared error per example, ``[batch]``: what the monitor differentiates example by
    example (a compiled model's loss would be used without it)."""
    return tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)


def make_model(length: int, units: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((length, 2)), fr.SimpleRNN(units, name="rnn"),
                             keras.layers.Dense(1, name="head")])


def train(model, optimizer, monitor, x, y) -> list[float]:
    """The custom loop: a tape, the gradients, the optimizer; a record every --record_every
    steps with the optimizer's clipping statistics."""
    rng = np.random.default_rng(FLAGS.seed)
    losses = []
    for step in range(FLAGS.steps):
        idx = rng.integers(0, len(x), FLAGS.batch_size)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(y[idx], model(x[idx], training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        losses.append(float(loss))
        if step % FLAGS.record_every == 0 or step == FLAGS.steps - 1:
            monitor.record(step, clip_stats=optimizer.stats())
    return losses


def main(argv):
    del argv
    x, y = fr.datasets.adding_problem(FLAGS.batch_size * 8 + FLAGS.probe_size, FLAGS.length,
                                      seed=FLAGS.seed)
    y = y[:, None]  # [n, 1], like the model's output
    x_probe, y_probe = x[: FLAGS.probe_size], y[: FLAGS.probe_size]
    x, y = x[FLAGS.probe_size:], y[FLAGS.probe_size:]
    model = make_model(FLAGS.length, FLAGS.units, FLAGS.seed)
    optimizer = fr.ClippingOptimizer(keras.optimizers.SGD(FLAGS.learning_rate),
                                     threshold=FLAGS.clip_threshold)
    at_init = fr.gradient_norms(model, x_probe, y_probe, loss=per_example_loss)["rnn"]
    csv_path = os.path.join(FLAGS.out, "gradient_norms.csv") if FLAGS.out else None
    monitor = fr.GradientNormMonitor((x_probe, y_probe), loss=per_example_loss,
                                     csv_path=csv_path)
    monitor.set_model(model)
    losses = train(model, optimizer, monitor, x, y)
    ratios = monitor.scalars["rnn/grad_ratio"]
    stats = optimizer.stats()
    print(f"loss: {losses[0]:.4g} at step 0, {losses[-1]:.4g} at step {len(losses) - 1}")
    print(f"|dl/dh_1| / |dl/dh_T| per record (steps {monitor.steps.tolist()}): "
          + ", ".join(f"{r:.3g}" for r in ratios))
    print(f"clip rate {stats['clip_rate']:.2f} over {stats['applied_steps']} steps")
    findings = monitor.summary()
    for finding in findings:
        print(finding.text)
    summary = {"steps": monitor.steps, "grad_ratio": ratios, "clip_stats": stats,
               "losses": losses, "curve_at_init": at_init,
               "findings": [f.as_dict() for f in findings]}
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        monitor.plot(os.path.join(FLAGS.out, "gradient_norms.png"))
        with open(os.path.join(FLAGS.out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(json_safe(summary), f, indent=1)
        print(f"wrote {FLAGS.out}/summary.json, gradient_norms.csv, gradient_norms.png")


if __name__ == "__main__":
    app.run(main)
