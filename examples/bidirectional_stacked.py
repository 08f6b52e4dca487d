"""Trains a 3-layer bidirectional stacked LSTM on a task that needs the future; saves the curve.

Task ("neighbour sum"): inputs x_t ~ U(−1, 1), target at every step y_t = x_(t−1) + x_(t+1)
(0 outside the sequence). Predicting the mean scores the variance of y (about 0.58 for 8 steps:
the baseline). A unidirectional stack never sees x_(t+1), so its error cannot fall below
Var(x_(t+1)) = 1/3 (less at the last step); the bidirectional stack can reach 0.

    python examples/bidirectional_stacked.py --out /tmp/bistack

Writes loss_curve.csv (epoch, model, train_loss, val_loss) and summary.json to --out and prints
both. Runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
import os
import time

import _cli

_cli.quiet_startup()  # before TensorFlow loads

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_fancyrnn as fr  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Folder for loss_curve.csv and summary.json (none: print only).")
flags.DEFINE_enum("cell", "lstm", ["lstm", "gru", "simple_rnn"], "Recurrent layer type.")
flags.DEFINE_integer("layers", 3, "Number of stacked bidirectional layers.", lower_bound=1)
flags.DEFINE_integer("units", 8, "Units per direction.", lower_bound=1)
flags.DEFINE_integer("length", 8, "Sequence length T.", lower_bound=2)
flags.DEFINE_integer("num_train", 512, "Training sequences.", lower_bound=1)
flags.DEFINE_integer("num_val", 256, "Validation sequences.", lower_bound=1)
flags.DEFINE_integer("epochs", 8, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", 0.02, "Adam learning rate.")
flags.DEFINE_float("dropout", 0.0, "StackedRNN dropout between layers.")
flags.DEFINE_bool("residual", False, "StackedRNN residual connections (layers 2..n).")
flags.DEFINE_bool("compare_unidirectional", True,
                  "Also train the same stack without the backward direction.")
flags.DEFINE_integer("seed", 0, "Random seed (data and weights).")

LAYERS = {"lstm": fr.LSTM, "gru": fr.GRU, "simple_rnn": fr.SimpleRNN}


def neighbour_sum(n: int, length: int, rng: np.random.Generator):
    """``x`` ``(n, length, 1)`` uniform in [-1, 1); ``y_t = x_{t-1} + x_{t+1}``."""
    x = rng.uniform(-1, 1, size=(n, length, 1)).astype("float32")
    padded = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    return x, padded[:, :-2] + padded[:, 2:]


def build_model(bidirectional: bool) -> keras.Model:
    cls = LAYERS[FLAGS.cell]
    # The unidirectional stack gets 2 x units, the width of the bidirectional concat, so it is
    # not the smaller model: what it lacks is only the view of the future.
    units = FLAGS.units if bidirectional else 2 * FLAGS.units
    layers = [
        fr.Bidirectional(cls(FLAGS.units, return_sequences=True)) if bidirectional
        else cls(units, return_sequences=True)
        for _ in range(FLAGS.layers)
    ]
    model = keras.Sequential([
        keras.Input((FLAGS.length, 1)),
        fr.StackedRNN(layers, dropout=FLAGS.dropout, residual=FLAGS.residual, seed=FLAGS.seed),
        keras.layers.Dense(1),
    ])
    model.compile(keras.optimizers.Adam(FLAGS.learning_rate), "mse", jit_compile=False)
    return model


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    x, y = neighbour_sum(FLAGS.num_train, FLAGS.length, rng)
    x_val, y_val = neighbour_sum(FLAGS.num_val, FLAGS.length, rng)
    baseline = float(np.mean((y_val - y.mean()) ** 2))
    print(f"baseline (predict the mean) val MSE: {baseline:.4f}")

    ours = ("cell", "layers", "units", "length", "num_train", "num_val", "epochs", "batch_size",
            "learning_rate", "dropout", "residual", "seed")
    rows = []
    summary = {"baseline_val_mse": baseline, "flags": {k: FLAGS[k].value for k in ours}}
    variants = [("bidirectional", True)]
    if FLAGS.compare_unidirectional:
        variants.append(("unidirectional", False))
    progress = _cli.Progress(len(variants))
    for name, bidirectional in variants:
        progress.start(f"training the {name} stack")
        keras.utils.set_random_seed(FLAGS.seed)
        model = build_model(bidirectional)
        start = time.perf_counter()
        history = model.fit(x, y, validation_data=(x_val, y_val), batch_size=FLAGS.batch_size,
                            epochs=FLAGS.epochs, verbose=0)
        seconds = time.perf_counter() - start
        train, val = history.history["loss"], history.history["val_loss"]
        for epoch, (tr, va) in enumerate(zip(train, val, strict=True), start=1):
            rows.append({"epoch": epoch, "model": name, "train_loss": tr, "val_loss": va})
            print(f"{name:>14} epoch {epoch:2d}  train {tr:.4f}  val {va:.4f}")
        summary[name] = {
            "final_val_mse": val[-1],
            "final_val_over_baseline": val[-1] / baseline,
            "params": model.count_params(),
            "seconds": seconds,
        }
        progress.finish(f"{name} final val MSE {val[-1]:.4f} = {val[-1] / baseline:.1%} of "
                        f"baseline ({model.count_params()} params, {seconds:.1f} s)")

    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "loss_curve.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, ["epoch", "model", "train_loss", "val_loss"])
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(FLAGS.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {FLAGS.out}/loss_curve.csv and summary.json")


if __name__ == "__main__":
    app.run(main)
