"""When the second of an op's two shards starts: through TensorFlow's intra-op pool (whose idle
threads block, and a woken one often waits for the CPU of the thread that woke it) and through
the sequence kernels' spinning workers (``keras_fancyrnn/ops/kernels/shard_pool.h``). Each
point: ``--calls`` calls of a ``tf.function`` running one op of two shards of busy work, back to
back as a model's steps are; medians and 90th percentiles of when each shard started and when
the op's work ended, in us after the op began.

    python benchmarks/shard_start.py
    python benchmarks/shard_start.py --work_us=10,50,200 --calls=500

Needs a C++ compiler (the op is built against the installed TensorFlow).
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _native import build  # noqa: E402
from _timing import cpu_name, emit  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("work_us", ["10", "50", "200"], "Busy work per shard, us.")
flags.DEFINE_integer("calls", 300, "Calls per point (after 50 untimed).")
flags.DEFINE_string("out", None, "Write the Markdown table here too.")


def main(argv):
    del argv
    import tensorflow as tf

    rows = ["| shards run by | work per shard (us) | shard 0 starts | shard 1 starts "
            "(median, p90) | both done (median) |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as directory:
        op = tf.load_op_library(build("shard_start.cc", directory, op_library=True)).shard_start
        x = tf.zeros([1])
        for us in (int(u) for u in FLAGS.work_us):
            for spinning in (False, True):
                call = tf.function(lambda x, us=us, spinning=spinning: op(x, us=us,
                                                                          spinning=spinning))
                for _ in range(50):
                    call(x)
                t = np.array([call(x).numpy() for _ in range(FLAGS.calls)])
                name = "spinning workers" if spinning else "TensorFlow's intra-op pool"
                rows.append(f"| {name} | {us} | {np.median(t[:, 0]):.1f} | "
                            f"{np.median(t[:, 1]):.1f}, {np.percentile(t[:, 1], 90):.1f} | "
                            f"{np.median(t[:, 2:].max(axis=1)):.1f} |")
                print(rows[-1], flush=True)
    emit(rows, f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; TF {tf.__version__}.", FLAGS.out)

if __name__ == "__main__":
    app.run(main)
