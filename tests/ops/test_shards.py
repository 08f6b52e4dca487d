"""The sequence kernels' shards (kernels/shard_pool.h): ops called from several threads at once
(one holds the spinning workers, the others run their shards on TensorFlow's pool) give what
the same op gives alone, and the numpy LSTM's values."""

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
from kernel_kinds import needs_compiler

import keras_fancyrnn as fr
from keras_fancyrnn.ops import native

pytestmark = needs_compiler("the layers run their plain ops")


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
    def last_h():  # only the final state read: the op keeps a few steps of z, h and c
        return native.lstm_sequence(tf.constant(x), tf.constant(w), h0, c0, u, b)[1][0]

    alone = last_h().numpy()
    want = _lstm_numpy(np.swapaxes(x, 0, 1).astype(float) @ w, h0, c0, u, b)
    np.testing.assert_allclose(alone, want, atol=1e-5)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda _: last_h().numpy(), range(32)))
    for h in together:  # each shard's rows computed alike, whichever thread ran it
        np.testing.assert_array_equal(h, alone)


def test_kernels_without_spinning_workers_give_the_same_values(rng):
    """``spinning_workers=False`` (the ops' ``spin`` attr): every shard on TensorFlow's pool, the
    same rows per shard, so the same values to the bit, forward and backward."""
    x = tf.constant(rng.normal(size=(16, 9, 6)).astype("float32"))
    w = tf.constant(rng.normal(size=(6, 8)).astype("float32"))
    u = tf.constant(rng.normal(size=(2, 8)).astype("float32") / 2)
    h0 = tf.zeros((16, 2))

    def run():
        @tf.function
        def fn(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                h, _ = native.lstm_sequence(x, w, h0, h0, u)
                loss = tf.reduce_sum(tf.sin(h))
            return h, tape.gradient(loss, x)

        spins = {n.attr["spin"].b for n in fn.get_concrete_function(x).graph.as_graph_def().node
                 if n.op.startswith("KerasFancyrnn")}
        return spins, [t.numpy() for t in fn(x)]

    spins_on, on = run()
    with fr.config.scope(spinning_workers=False):
        spins_off, off = run()
    assert spins_on == {True} and spins_off == {False}
    for a, b in zip(on, off, strict=True):
        np.testing.assert_array_equal(a, b)


def _affinities():
    """Each thread of this process: the CPUs it may run on."""
    cpus = {}
    for task in map(int, os.listdir("/proc/self/task")):
        try:
            cpus[task] = os.sched_getaffinity(task)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return cpus


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="an op's thread steps aside from a worker's CPU only on Linux, with "
                    "two or more CPUs")
def test_ops_give_their_threads_back_the_cpus_they_may_run_on(library, rng):
    """An op's thread that finds itself on a worker's CPU leaves the workers' CPUs out of its
    affinity for the op's length (shard_pool.h's StepAside), then takes its own back: while many
    sharded ops run, some thread is seen without some of its CPUs; after them, every thread may
    run on the CPUs it could before (a new one: on the process's), and the values are the op's
    alone."""
    x = tf.constant(rng.normal(size=(16, 50, 64)).astype("float32"))
    w = tf.constant(rng.normal(size=(64, 256)).astype("float32") / 8)
    u = tf.constant(rng.normal(size=(64, 256)).astype("float32") / 8)
    h0 = tf.zeros((16, 64))

    @tf.function
    def last_h():
        return native.lstm_sequence(x, w, h0, h0, u)[1][0]

    first = last_h().numpy()  # the workers exist from here on
    before = _affinities()
    narrowed_meanwhile = threading.Event()

    def watch(done):
        while not done.is_set():
            now = _affinities()
            if any(now[t] < before[t] for t in now.keys() & before.keys()):
                narrowed_meanwhile.set()

    done = threading.Event()
    watcher = threading.Thread(target=watch, args=(done,))
    watcher.start()
    try:
        for _ in range(400):
            np.testing.assert_array_equal(last_h().numpy(), first)
    finally:
        done.set()
        watcher.join()
    after = _affinities()
    changed = {t: (before.get(t), cpus) for t, cpus in after.items()
               if cpus != before.get(t, os.sched_getaffinity(0))}
    assert not changed, f"threads' CPUs (before, after): {changed}"
    if not narrowed_meanwhile.is_set():
        pytest.skip("no op's thread was seen stepping aside (the scheduler never put one on a "
                    "worker's CPU, or the watcher missed it): nothing restored to check")
