"""The weight gradient ops (``keras_fancyrnn/ops/kernels/outer_sum.h``) against what they
replace: TensorFlow's transpose of ``x`` and matmul for the projection's
``dW = sum_t x_t^T dz_t``, and its matmuls for a recurrence's ``dU = sum_t h_{t-1}^T dz_t``
(``keras_fancyrnn.ops.gradients``' ``*_reference`` functions). Each is one ``tf.function`` call
(its inputs captured), timed in one process, alternating, medians; the table gives us per call
(less an empty function's), GFLOP/s, and the largest difference between the two results
relative to the largest value. Points are an LSTM's (``N = 4 H``); ``--gates=3`` gives a GRU's,
``--gates=1`` a SimpleRNN's.

    python benchmarks/weight_grad.py
    python benchmarks/weight_grad.py --points=16x50x128x256 --repeats=11
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _timing import cpu_name, emit, time_alternating  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("points", ["16x50x128x64", "16x50x128x256", "64x50x128x256", "64x100x128x128"],
                  "BxTxDxH: batch, steps, input features, units.")
flags.DEFINE_integer("gates", 4, "Gates per unit: N = gates x H columns.")
flags.DEFINE_integer("repeats", 7, "Timed rounds per variant (median reported).")
flags.DEFINE_integer("steps", 20, "Calls per timed round.")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")


def main(argv):
    del argv
    from keras_fancyrnn._tf import tf
    from keras_fancyrnn.ops import gradients, native

    library = native.library()
    if library is None:
        raise SystemExit(f"no kernel library: {native.load_error()}")
    rng = np.random.default_rng(0)
    rows = ["| B | T | D | H | N | gradient | ops us | TensorFlow us | ops GFLOP/s | "
            "TensorFlow GFLOP/s | TensorFlow/ops | max difference |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows))
    for point in FLAGS.points:
        B, T, D, H = (int(v) for v in point.split("x"))
        N = FLAGS.gates * H

        def tensor(*shape):
            return tf.constant(rng.normal(size=shape).astype("float32"))

        x, dz, h0, h = tensor(B, T, D), tensor(T, B, N), tensor(B, H), tensor(T, B, H)
        pairs = _pairs(tf, library, gradients, x, dz, h0, h)
        runners = {"empty": _runner(tf.function(lambda: tf.zeros([1])))}
        for name, (ours, theirs, _) in pairs.items():
            runners[name + " ops"], runners[name + " tf"] = _runner(ours), _runner(theirs)
        rate = time_alternating(runners, FLAGS.repeats, FLAGS.steps)
        base = 1 / rate["empty"]
        for name, (ours, theirs, K) in pairs.items():
            a, b = ours().numpy(), theirs().numpy()
            diff = np.abs(a - b).max() / np.abs(b).max()
            t_ours, t_tf = 1 / rate[name + " ops"] - base, 1 / rate[name + " tf"] - base
            flops = 2 * B * T * K * N
            row = (f"| {B} | {T} | {D} | {H} | {N} | {name} | {t_ours * 1e6:.0f} | "
                   f"{t_tf * 1e6:.0f} | {flops / t_ours / 1e9:.0f} | {flops / t_tf / 1e9:.0f} | "
                   f"{t_tf / t_ours:.2f} | {diff:.1e} |")
            rows.append(row)
            print(row)
    emit(rows, f"\n{os.cpu_count()} cores; an empty function took {base * 1e6:.0f} us a call. "
         f"CPU: {cpu_name()}.", FLAGS.out)


def _pairs(tf, library, gradients, x, dz, h0, h):
    """name: (the op, TensorFlow's ops, K), each a ``tf.function`` of no arguments: the inputs are
    captured, as a model's tensors are inside its step (arguments would add the cost of binding
    them in Python, about 200 us here, to every call)."""
    return {"dW": (tf.function(lambda: library.keras_fancyrnn_project_weight_grad(x, dz)),
                   tf.function(lambda: gradients.projection_weight_gradient_reference(x, dz)),
                   x.shape[-1]),
            "dU": (tf.function(lambda: library.keras_fancyrnn_recurrent_weight_grad(h0, h, dz)),
                   tf.function(lambda: gradients.recurrent_kernel_gradient_reference(h0, h, dz)),
                   h.shape[-1])}


def _runner(fn):
    def run(n):
        for _ in range(n):
            fn().numpy()
    return run


if __name__ == "__main__":
    app.run(main)
