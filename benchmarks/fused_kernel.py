"""Would TensorFlow's fused LSTM kernel (``BlockLSTMV2``) beat the engine's loop on a CPU?

``BlockLSTMV2`` runs a whole LSTM sequence in one op (and its gradient, ``BlockLSTMGradV2``, in
one more) with exactly ``LSTMCell.step``'s equations and Keras's weight layout (gates i, f, c, o;
``[x_t, h_{t-1}] [W; U] + b``), where the loop runs some 40 ops per step forward and 60 backward.
This script checks that it computes the same as ``fr.LSTM`` (outputs and gradients), shows that
the gradient TensorFlow registers for it is wrong (TF 2.21 maps ``BlockLSTMV2`` to the V1 kernel
``BlockLSTMGrad``, whose gate layout is i, c, f, o), and times it against ``fr.LSTM``'s loop
side by side, alternating, over a grid of batch and hidden sizes.

The answer on the 2-core test machine: the kernel wins for small layers, whose loop is per-op
overhead, and loses for bigger ones (its per-step products run in Eigen, slower than oneDNN's
MatMul); ``LSTMCell.block_lstm_batch_limit`` encodes where it won, and the last column says which
one ``fr.LSTM`` picks at each point (the loop runs here with the fused path switched off).

    python benchmarks/fused_kernel.py                          # B 8..256 x H 32..256, D=128
    python benchmarks/fused_kernel.py --batch=16 --hidden=64 --modes=train
"""

from __future__ import annotations

import itertools
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
from keras_fancyrnn.layers.lstm import _block_lstm  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("modes", ["train", "predict"], "train and/or predict.")
flags.DEFINE_list("batch", ["8", "16", "32", "64", "256"], "Batch sizes.")
flags.DEFINE_list("hidden", ["32", "64", "128", "256"], "Hidden sizes.")
flags.DEFINE_integer("time", 100, "Sequence length T.")
flags.DEFINE_integer("input_dim", 128, "Input features D.")
flags.DEFINE_integer("repeats", 5, "Timed rounds per variant (median reported).")
flags.DEFINE_float("round_seconds", 0.5, "Approximate length of one timed round.")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")


def block_lstm(x, h_prev, c_prev, kernel, bias, registered_gradient=False):
    """``BlockLSTMV2`` over time-major ``x``: ``(h [T,B,H], c [T,B,H])``, with the engine's
    gradient (``BlockLSTMGradV2``), or with TensorFlow's registered one (wrong: the V1 kernel)."""
    if not registered_gradient:
        return _block_lstm(x, h_prev, c_prev, kernel, bias)
    no_peephole = tf.zeros([kernel.shape[1] // 4], kernel.dtype)
    out = tf.raw_ops.BlockLSTMV2(
        seq_len_max=tf.cast(tf.shape(x)[0], tf.int64), x=x, cs_prev=c_prev, h_prev=h_prev,
        w=kernel, wci=no_peephole, wcf=no_peephole, wco=no_peephole, b=bias, cell_clip=-1.0,
        use_peephole=False)
    return out.h, out.cs


class BlockLSTM(keras.layers.Layer):
    """An LSTM layer (last output) on ``BlockLSTMV2`` with an ``fr.LSTMCell``'s weights."""

    def __init__(self, units, registered_gradient=False, **kwargs):
        super().__init__(**kwargs)
        self.units, self.registered_gradient = units, registered_gradient

    def build(self, input_shape):
        self.cell = fr.LSTMCell(self.units)
        self.cell.build((input_shape[0], input_shape[-1]))

    def call(self, x):
        cell = self.cell
        zeros = tf.zeros(tf.stack([tf.shape(x)[0], self.units]))
        kernel = tf.concat([cell.kernel, cell.recurrent_kernel], axis=0)
        h, _ = block_lstm(tf.transpose(x, [1, 0, 2]), zeros, zeros, kernel,
                          tf.convert_to_tensor(cell.bias), self.registered_gradient)
        return h[-1]


def check_equal():
    """Max |difference| to fr.LSTM's loop: outputs, gradients (V2 kernel), gradients (TF's)."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, 9, 4)).astype("float32"))
    ours = fr.LSTM(5)
    ours(x)
    ours.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in ours.get_weights()])
    result = []
    for registered in (False, True):
        block = BlockLSTM(5, registered_gradient=registered)
        block(x)
        block.cell.set_weights(ours.get_weights())
        with fr.config.scope(fused_on_cpu=False):  # fr.LSTM runs its loop here: the reference
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(x)
                a, b = ours(x), block(x)
                loss_a, loss_b = tf.reduce_sum(a ** 2 + a), tf.reduce_sum(b ** 2 + b)
            grads_a = tape.gradient(loss_a, [x] + ours.trainable_weights)
            grads_b = tape.gradient(loss_b, [x] + block.trainable_weights)
        if not registered:
            result.append(float(np.max(np.abs(a - b))))
        result.append(max(float(np.max(np.abs(p - q))) for p, q in zip(grads_a, grads_b)))
    return result


def runner(layer, mode, batch, fused=True):
    rng = np.random.default_rng(0)
    xs = [tf.constant(rng.normal(size=(batch, FLAGS.time, FLAGS.input_dim)).astype("float32"))
          for _ in range(2)]
    y = tf.zeros((batch, 1))
    model = keras.Sequential([keras.Input((FLAGS.time, FLAGS.input_dim)), layer,
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    if mode == "train":
        run = lambda n: [model.train_on_batch(xs[i % 2], y) for i in range(n)]  # noqa: E731
    else:
        run = lambda n: [model.predict_on_batch(xs[i % 2]) for i in range(n)]  # noqa: E731
    with fr.config.scope(fused_on_cpu=fused):  # read when the step is traced: the first call
        run(1)
    return run


def main(argv):
    del argv
    # This script is about BlockLSTMV2, the fused path where the native sequence kernels are
    # off or unavailable (benchmarks/sequence_kernels.py measures those).
    fr.config.set(sequence_kernels=False)
    out_diff, grad_diff, registered_diff = check_equal()
    print(f"BlockLSTMV2 vs fr.LSTM: outputs {out_diff:.1e}, gradients {grad_diff:.1e}; with "
          f"TensorFlow's registered gradient {registered_diff:.1e}")
    rows = ["| mode | B | H | fr loop steps/s | BlockLSTMV2 steps/s | fused/loop | fr.LSTM uses |",
            "|---|---|---|---|---|---|---|"]
    for mode, batch, units in itertools.product(FLAGS.modes, map(int, FLAGS.batch),
                                                map(int, FLAGS.hidden)):
        runners = {"loop": runner(fr.LSTM(units), mode, batch, fused=False),
                   "fused": runner(BlockLSTM(units), mode, batch)}
        chosen = 0 < batch <= fr.LSTMCell(units).block_lstm_batch_limit(FLAGS.input_dim, "float32")
        rate = time_alternating(runners, FLAGS.repeats, 10**6, FLAGS.round_seconds)
        rows.append(f"| {mode} | {batch} | {units} | {rate['loop']:.1f} | {rate['fused']:.1f} | "
                    f"{rate['fused'] / rate['loop']:.2f} | {'fused' if chosen else 'loop'} |")
        print(rows[-1], flush=True)
    footer = (f"\nT={FLAGS.time} D={FLAGS.input_dim}; {platform.machine()}, {os.cpu_count()} "
              f"cores; TF {tf.__version__}, Keras {keras.__version__}; "
              f"{time.strftime('%Y-%m-%d')}. Equality: outputs {out_diff:.1e}, gradients "
              f"{grad_diff:.1e} (registered gradient: {registered_diff:.1e}).")
    emit(rows, footer, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
