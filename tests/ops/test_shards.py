"""The sequence kernels' shards (kernels/shard_pool.h): ops called from several threads at once
(one holds the spinning workers, the others run their shards on TensorFlow's pool) give what
the same op gives alone, and the numpy LSTM's values."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf

from keras_fancyrnn.ops import native

pytestmark = pytest.mark.skipif(
    native.compiler() is None or shutil.which(native.compiler()[0]) is None,
    reason="no C++ compiler: the layers run their plain ops (tested everywhere else)")


def _lstm_numpy(xp, h, c, u, b):
    """Hochreiter & Schmidhuber with the forget gate of Gers et al.; gates i, f, c, o (Keras),
    in float64: the last h."""
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for x_t in xp:
        i, f, g, o = np.split(x_t + b + h @ u, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
    return h


def test_ops_on_many_threads_at_once_equal_the_op_alone(library, rng):
    T, B, D, H = 30, 16, 8, 24
    x = rng.normal(size=(B, T, D)).astype("float32")
    w = (rng.normal(size=(D, 4 * H)) / np.sqrt(D)).astype("float32")
    u = (rng.normal(size=(H, 4 * H)) / np.sqrt(H)).astype("float32")
    b = rng.normal(size=4 * H).astype("float32")
    h0, c0 = (rng.normal(size=(B, H)).astype("float32") for _ in range(2))

    @tf.function
    def last_h():
        xp = native.project(tf.constant(x), tf.constant(w))
        return native.lstm_sequence(xp, h0, c0, u, b)[1][0]

    alone = last_h().numpy()
    want = _lstm_numpy(np.swapaxes(x, 0, 1).astype(float) @ w, h0, c0, u, b)
    np.testing.assert_allclose(alone, want, atol=1e-5)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda _: last_h().numpy(), range(32)))
    for h in together:  # each shard's rows computed alike, whichever thread ran it
        np.testing.assert_array_equal(h, alone)


def test_kernels_without_spinning_workers_give_the_same_values():
    """``KERAS_FANCYRNN_SPIN=0``: every shard on TensorFlow's pool, the same rows per shard, so
    the same values to the bit."""
    code = ("import numpy as np, tensorflow as tf\n"
            "from keras_fancyrnn.ops import native\n"
            "r = np.random.default_rng(5)\n"
            "x = r.normal(size=(16, 9, 6)).astype('float32')\n"
            "w = r.normal(size=(6, 8)).astype('float32')\n"
            "print(native.project(tf.constant(x), tf.constant(w)).numpy().tobytes().hex())\n")
    outputs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "KERAS_FANCYRNN_SPIN": spin},
                              check=True).stdout.split()[-1] for spin in ("0", "1")]
    assert outputs[0] == outputs[1]
