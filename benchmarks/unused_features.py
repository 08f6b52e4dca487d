"""Do the diagnostics probe and ``bptt_truncate`` cost anything when they are not used?

The reference is a bare time loop written here, in this script: a ``tf.while_loop`` that calls
the same cell's ``project_inputs`` and ``step`` and keeps nothing but the states, with none of the
engine's features (no probe, no truncation copies, no mask, no output sequence). In one process,
alternating after a warm-up, it trains side by side with

* ``fr.X(units)``: the engine with the probe and truncation unused (the default);
* ``fr.X(units)`` with the probe fed (what the monitor's probe pass runs), for scale;
* ``fr.X(units, bptt_truncate=k)``, for scale (``k + 1`` state copies, see ``engine``).

"Free when unused" means the default's ratio to the bare loop is 1 within the noise, and its
graph has the same number of ops per loop iteration (counted in the traced training step: the
forward loop body and the gradient loop body).

    python benchmarks/unused_features.py                      # LSTM, B=64 T=100 D=H=128
    python benchmarks/unused_features.py --cells=simple_rnn,lstm,gru --out=unused.md
"""

from __future__ import annotations

import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import emit, time_alternating  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_fancyrnn as fr  # noqa: E402
from keras_fancyrnn._tf import tf  # noqa: E402
from keras_fancyrnn.engine import probes  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cells", ["lstm"], "Cells: simple_rnn, lstm, gru.")
flags.DEFINE_integer("batch", 64, "Batch size B.")
flags.DEFINE_integer("time", 100, "Sequence length T.")
flags.DEFINE_integer("input_dim", 128, "Input features D.")
flags.DEFINE_integer("units", 128, "Hidden units H.")
flags.DEFINE_integer("truncate", 10, "k of the bptt_truncate=k row.")
flags.DEFINE_integer("repeats", 9, "Timed rounds per variant (median reported).")
flags.DEFINE_integer("steps", 10, "Training steps per timed round.")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")

FR = {"simple_rnn": fr.SimpleRNN, "lstm": fr.LSTM, "gru": fr.GRU}


class BareLoop(keras.layers.Layer):
    """The reference: the cell's own projection and step in a plain while loop, last h out."""

    def __init__(self, cell, **kwargs):
        super().__init__(**kwargs)
        self.cell = cell

    def build(self, input_shape):
        self.cell.build((input_shape[0], input_shape[-1]))

    def call(self, x):
        xs = tf.transpose(x, [1, 0, 2])
        steps = tf.shape(xs)[0]
        xs_ta = tf.TensorArray(xs.dtype, size=steps, element_shape=xs.shape[1:]).unstack(xs)
        states = self.cell.get_initial_state(tf.shape(x)[0])
        states = states if isinstance(states, list) else [states]

        def body(t, *states):
            _, new = self.cell.step(self.cell.project_inputs(xs_ta.read(t)), list(states))
            return (t + 1, *(new if isinstance(new, (list, tuple)) else [new]))

        with self.cell.weights_read_once():  # as the engine does: one read per call
            out = tf.while_loop(lambda t, *_: t < steps, body, (tf.constant(0), *states),
                                maximum_iterations=steps, parallel_iterations=32,
                                swap_memory=True)
        return out[1]


class Probed(keras.layers.Layer):
    """``fr.X`` with zero probes fed for every state (what GradientNormMonitor does)."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.rnn = layer

    def call(self, x):
        sizes = self.rnn.cell.state_size
        sizes = sizes if isinstance(sizes, (list, tuple)) else [sizes]
        zeros = {i: tf.zeros(tf.concat([tf.shape(x)[:2], [s]], 0)) for i, s in enumerate(sizes)}
        with probes.scope({self.rnn: zeros}):
            return self.rnn(x)


def make_model(layer):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((FLAGS.time, FLAGS.input_dim)), layer,
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    return model


def loop_ops(model, x, y):
    """Ops in the traced training step's loop bodies: (forward body, gradient body)."""

    @tf.function
    def train(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    graph_def = train.get_concrete_function(x, y).graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    counts = []
    for fn in library.values():  # every while op's body, wherever it is nested
        for node in fn.node_def:
            if node.op in ("While", "StatelessWhile"):
                body = library[node.attr["body"].func.name]
                counts.append(len(body.node_def))
    for node in graph_def.node:
        if node.op in ("While", "StatelessWhile"):
            counts.append(len(library[node.attr["body"].func.name].node_def))
    counts = sorted(set(counts))
    return counts[0], counts[-1]  # the forward body is the smaller, its gradient the larger


def main(argv):
    del argv
    # This is about the engine's loop: keep the LSTM's fused kernel (small layers) out of it.
    fr.config.set(fused_on_cpu=False)
    b, t, d, h = FLAGS.batch, FLAGS.time, FLAGS.input_dim, FLAGS.units
    rng = np.random.default_rng(0)
    xs = [tf.constant(rng.normal(size=(b, t, d)).astype("float32")) for _ in range(FLAGS.steps)]
    y = tf.zeros((b, 1))
    rows = ["| cell | variant | steps/s | vs bare loop | ops in forward loop body | "
            "ops in gradient loop body |", "|---|---|---|---|---|---|"]
    for cell in FLAGS.cells:
        layer_cls = FR[cell]
        variants = {
            "bare loop (this script)": make_model(BareLoop(layer_cls(h).cell)),
            "fr default (probe, truncation unused)": make_model(layer_cls(h)),
            "fr with probe fed": make_model(Probed(layer_cls(h))),
            f"fr bptt_truncate={FLAGS.truncate}": make_model(
                layer_cls(h, bptt_truncate=FLAGS.truncate)),
        }
        ops = {name: loop_ops(m, xs[0], y) for name, m in variants.items()}
        def runner(model):
            return lambda n: [model.train_on_batch(xs[i % len(xs)], y) for i in range(n)]

        rate = time_alternating({name: runner(m) for name, m in variants.items()},
                                FLAGS.repeats, FLAGS.steps)
        bare = rate["bare loop (this script)"]
        for name in variants:
            rows.append(f"| {cell} | {name} | {rate[name]:.1f} | {rate[name] / bare:.2f} | "
                        f"{ops[name][0]} | {ops[name][1]} |")
            print(rows[-1], flush=True)
    footer = (f"\nB={b} T={t} D={d} H={h}, training steps (train_on_batch, Adam), medians of "
              f"{FLAGS.repeats} alternating rounds. {platform.machine()}, {os.cpu_count()} "
              f"cores; TF {tf.__version__}, Keras {keras.__version__}; "
              f"{time.strftime('%Y-%m-%d')}.")
    emit(rows, footer, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
