"""Train briefly, export a SavedModel, and serve it where keras_fancyrnn cannot be imported.

    python examples/export_savedmodel.py --out=/tmp/fr_export
    python examples/export_savedmodel.py --out=/tmp/fr_export --streaming

1. Trains a small model (Masking -> fr.Bidirectional(fr.LSTM) -> fr.GRU -> Dense) for a few
   seconds on a toy task: the mean of a right-padded sequence of numbers.
2. Exports it with model.export(path) (format tf_saved_model). With --streaming the model is
   unidirectional and is exported with fr.export_saved_model(..., state_layers="all"): every
   recurrent state becomes an input and an output of serve, so the sequence can be served chunk
   by chunk (a model with stateful=True layers is exported the same way by default).
3. Starts a fresh Python (-I, outside the repository) in which a meta-path finder makes
   "import keras_fancyrnn" fail, loads the SavedModel with tf.saved_model.load, serves inputs
   with a batch size and lengths never seen in training, and prints the serving signature.
4. Compares the served outputs with the Keras model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import _cli

_cli.quiet_startup()  # before TensorFlow loads

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import keras_fancyrnn as fr  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Directory for the SavedModel and the serving files "
                    "(default: a new temporary directory).")
flags.DEFINE_integer("units", 16, "Units per recurrent layer.")
flags.DEFINE_integer("length", 20, "Sequence length T of the longest training sequence.")
flags.DEFINE_integer("num_train", 512, "Training sequences.")
flags.DEFINE_integer("epochs", 2, "Training epochs.")
flags.DEFINE_bool("streaming", False, "Export explicit states and serve the test sequences in "
                  "chunks (unidirectional model).")
flags.DEFINE_integer("seed", 0, "Seed for data and weights.")

SERVE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoFancyRNN(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "keras_fancyrnn":
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NoFancyRNN())
    import numpy as np
    import tensorflow as tf

    try:
        import keras_fancyrnn  # noqa: F401
        sys.exit("keras_fancyrnn is importable here; this demo needs a process without it")
    except ImportError:
        print("serving process: `import keras_fancyrnn` fails, as intended")

    path, inputs, outputs, names = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    loaded = tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]
    for kind, specs in (("inputs", fn.structured_input_signature[1]),
                        ("outputs", fn.structured_outputs)):
        print(f"serving_default {kind}:")
        for key, spec in sorted(specs.items()):
            print(f"  {key}: {spec.dtype.name} {tuple(spec.shape)}")
    x = np.load(inputs)["x"]
    if not names:
        y = loaded.serve(tf.constant(x)).numpy()
    else:  # chunk by chunk, feeding the returned states back in
        specs = loaded.signatures["serving_default"].structured_input_signature[1]
        state = {n: tf.zeros((x.shape[0], specs[n].shape[1])) for n in names}
        for start in range(0, x.shape[1], 4):
            out = loaded.serve(tf.constant(x[:, start:start + 4]), state)
            state = {n: out[n] for n in names}
        y = out["output_0"].numpy()
    np.savez(outputs, y=y)
    """
)


def toy_data(rng, n, max_length, min_length=1):
    """Right-padded sequences of numbers in [0, 1); the target is the mean of the real ones."""
    lengths = rng.integers(min_length, max_length + 1, size=n)
    x = rng.uniform(0.05, 1.0, size=(n, max_length, 1)).astype("float32")
    x[np.arange(max_length)[None, :] >= lengths[:, None]] = 0.0  # padding, masked by Masking(0)
    y = x.sum(axis=(1, 2)) / lengths
    return x, y.astype("float32")[:, None]


def build_model(units: int, streaming: bool) -> keras.Model:
    inputs = keras.Input((None, 1), name="x")
    h = keras.layers.Masking(0.0)(inputs)
    if streaming or not hasattr(fr, "Bidirectional"):
        h = fr.LSTM(units, return_sequences=True)(h)
    else:
        h = fr.Bidirectional(fr.LSTM(units, return_sequences=True))(h)
    h = fr.GRU(units)(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def serve_elsewhere(path: str, x: np.ndarray, names: list[str], workdir: str) -> np.ndarray:
    """Serves ``x`` in a fresh interpreter that cannot import keras_fancyrnn."""
    script = os.path.join(workdir, "serve_without_fr.py")
    with open(script, "w") as f:
        f.write(SERVE)
    inputs, outputs = os.path.join(workdir, "inputs.npz"), os.path.join(workdir, "outputs.npz")
    np.savez(inputs, x=x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", script, path, inputs, outputs, json.dumps(names)], cwd=workdir,
        env=env, stderr=subprocess.PIPE, text=True,
    )
    sys.stderr.write(_cli.drop_startup_noise(proc.stderr))  # its TensorFlow starts up too
    if proc.returncode != 0:
        raise SystemExit(f"the serving process ({script}) exited with {proc.returncode}; its "
                         "error is above")
    return np.load(outputs)["y"]


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TensorFlow's export INFO lines
    # Absolute: the serving process runs in `out`, where a relative path would point elsewhere.
    out = os.path.abspath(FLAGS.out or tempfile.mkdtemp(prefix="fr_export_"))
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed)

    model = build_model(FLAGS.units, FLAGS.streaming)
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    x, y = toy_data(rng, FLAGS.num_train, FLAGS.length)
    history = model.fit(x, y, batch_size=64, epochs=FLAGS.epochs, verbose=2)
    print(f"trained: mse {history.history['loss'][-1]:.4f}")

    path = os.path.join(out, "saved_model")
    if FLAGS.streaming:
        names = fr.export_saved_model(model, path, state_layers="all")
        print("state inputs/outputs:", names)
    else:
        model.export(path, format="tf_saved_model", verbose=False)
        names = []

    # New batch size and lengths; padded rows test the exported masking. Streaming serves chunks
    # of 4 steps and no padding: a chunk in which a row is all padding outputs zeros for that row
    # (Keras's rule for masked steps; its state still carries over).
    if FLAGS.streaming:
        x_test, y_test = toy_data(rng, 7, 2 * FLAGS.length, min_length=2 * FLAGS.length)
    else:
        x_test, y_test = toy_data(rng, 7, FLAGS.length + 5)
    served = serve_elsewhere(path, x_test, names, out)
    expected = np.asarray(model(x_test))
    diff = float(np.max(np.abs(served - expected)))
    print(f"served vs Keras: max |difference| = {diff:.3g} over {served.size} outputs")
    print(f"served predictions {np.round(served[:, 0], 3)}\ntargets            "
          f"{np.round(y_test[:, 0], 3)}")
    if diff > 1e-5:
        raise SystemExit(f"served outputs differ from the Keras model's by {diff}")
    print(f"SavedModel written to {path}")


if __name__ == "__main__":
    app.run(main)
