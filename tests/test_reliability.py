"""Reliability: the bad-input catalogue (each input -> a clear error naming the argument, raised
early), NaN handling, determinism, one device vs MirroredStrategy and vs two
MultiWorkerMirroredStrategy worker processes, and very long sequences."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from gradcheck import assert_gradients_match_finite_differences

import keras_fancyrnn as fr
from keras_fancyrnn import datasets

B, T, D, H = 4, 6, 3, 5
X = np.random.default_rng(0).normal(size=(B, T, D)).astype("float32")
Y = np.zeros((B, 1), "float32")


def small_model(layer=None):
    model = keras.Sequential([keras.Input((T, D)), layer or fr.LSTM(H), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    return model


def call_built(layer, x):
    layer(X)
    return layer(x)


def fit_with_monitor(**kwargs):
    model = small_model()
    monitor = fr.GradientNormMonitor(**kwargs)
    model.fit(X, Y, epochs=1, verbose=0, callbacks=[monitor])


def stateful_changed_batch():
    model = keras.Sequential([keras.Input((T, D), batch_size=B), fr.GRU(H, stateful=True)])
    model(X)
    model(np.zeros((B + 1, T, D), "float32"))


def example_config(name, **flags):
    """The example's flag validation (its Config, built from the flags before any work)."""
    from test_examples import load_example

    module, _ = load_example(name)
    return module.Config(**flags)


# (what is wrong, the call, the exception, a regex the message must match)
CATALOGUE = [
    ("units <= 0", lambda: fr.LSTM(0), ValueError, "units must be a positive integer, got 0"),
    ("units not an int", lambda: fr.GRU("8"), ValueError, "units must be a positive integer"),
    ("unknown activation", lambda: fr.SimpleRNN(4, activation="swishy"), ValueError,
     "activation must be a Keras activation"),
    ("unknown recurrent_activation", lambda: fr.LSTM(4, recurrent_activation="x"), ValueError,
     "recurrent_activation must be a Keras activation"),
    ("dropout = 1", lambda: fr.GRU(4, dropout=1.0), ValueError,
     r"dropout must be a float in \[0, 1\)"),
    ("dropout < 0", lambda: fr.LSTM(4, dropout=-0.1), ValueError, "dropout must be a float"),
    ("recurrent_dropout > 1", lambda: fr.SimpleRNN(4, recurrent_dropout=1.5), ValueError,
     "recurrent_dropout must be a float"),
    ("bptt_truncate = 0", lambda: fr.LSTM(4, bptt_truncate=0), ValueError,
     "bptt_truncate must be None .* or a positive integer, got 0"),
    ("bptt_truncate < 0", lambda: fr.GRU(4, bptt_truncate=-2), ValueError, "bptt_truncate must be"),
    ("use_cudnn not auto/bool", lambda: fr.LSTM(4, use_cudnn="always"), ValueError,
     "use_cudnn must be 'auto', True or False"),
    ("ChronoBias max_timescale <= 2", lambda: fr.initializers.ChronoBias(2), ValueError,
     "max_timescale must be a number > 2"),
    ("2-D input", lambda: fr.LSTM(H)(X[:, 0]), ValueError, "expected ndim=3"),
    ("complex input", lambda: fr.GRU(H)(X.astype("complex64")), TypeError,
     r"expects real-valued inputs \(float, int or bool\), got dtype complex64"),
    ("feature dim changed after build", lambda: call_built(fr.LSTM(H), X[..., :2]), ValueError,
     "expected axis -1 of input shape to have value 3"),
    ("T = 0", lambda: fr.SimpleRNN(H)(X[:, :0]), ValueError, "0 timesteps, expected at least 1"),
    ("mask of wrong shape", lambda: fr.GRU(H)(X, mask=np.ones((B, T + 2), bool)), ValueError,
     r"mask must have shape \(batch, timesteps\)"),
    ("initial_state count", lambda: fr.LSTM(H)(X, initial_state=[np.zeros((B, H), "float32")]),
     ValueError, "initial_state to be a list of 2 tensor"),
    ("initial_state shape", lambda: fr.GRU(H)(X, initial_state=[np.zeros((B, H + 1), "float32")]),
     ValueError, r"initial_state\[0\] must have shape"),
    ("stateful without fixed batch",
     lambda: keras.Sequential([keras.Input((T, D)), fr.LSTM(H, stateful=True)]), ValueError,
     "batch size must be static"),
    ("stateful with a changed batch", stateful_changed_batch, ValueError,
     "stateful and was built for batch size 4, got a batch of 5"),
    ("unroll with unknown T", lambda: keras.Sequential([keras.Input((None, D)),
                                                        fr.GRU(H, unroll=True)]),
     ValueError, "unroll=True needs a static number of timesteps"),
    ("Bidirectional merge_mode", lambda: fr.Bidirectional(fr.LSTM(H), merge_mode="max"),
     ValueError, "merge_mode"),
    ("StackedRNN middle layer not returning sequences",
     lambda: fr.StackedRNN([fr.LSTM(H), fr.GRU(H)]), ValueError, "return_sequences"),
    ("StackedRNN dropout = 1", lambda: fr.StackedRNN([fr.LSTM(H)], dropout=1.0), ValueError,
     "dropout"),
    ("unknown clip method", lambda: fr.ClippingOptimizer(keras.optimizers.SGD(), method="l3"),
     ValueError, "method must be one of"),
    ("negative threshold", lambda: fr.ClippingOptimizer(keras.optimizers.SGD(), threshold=-1.0),
     ValueError, "threshold must be a positive number"),
    ("percentile > 100", lambda: fr.ClippingOptimizer(keras.optimizers.SGD(), method="auto",
                                                      percentile=150), ValueError,
     r"percentile must be a number in \(0, 100\]"),
    ("percentile = 0", lambda: fr.ClippingOptimizer(keras.optimizers.SGD(), method="auto",
                                                    percentile=0), ValueError, "percentile"),
    ("percentile with global_norm", lambda: fr.ClippingOptimizer(keras.optimizers.SGD(),
                                                                 percentile=50), ValueError,
     "percentile applies only to method='auto'"),
    ("inner optimizer not an optimizer", lambda: fr.ClippingOptimizer(42), ValueError,
     "inner_optimizer must be a keras.optimizers.Optimizer"),
    ("monitor every_n_batches = 0", lambda: fr.GradientNormMonitor(data=(X, Y),
                                                                  every_n_batches=0),
     ValueError, "every_n_batches must be None or a positive integer"),
    ("monitor layer name that does not exist",
     lambda: fit_with_monitor(data=(X, Y), layers=["nope"]), ValueError, "nope"),
    ("monitor data that does not match the model",
     lambda: fit_with_monitor(data=(np.zeros((2, T, D + 4), "float32"), Y[:2])), ValueError,
     "data"),
    ("monitor data without targets", lambda: fit_with_monitor(data=(X,)), ValueError, "data"),
    ("unknown TFDS length", lambda: datasets.load_numpy("adding_problem", length=42),
     ValueError, r"length must be one of \[50, 100"),
    ("unknown task name", lambda: datasets.load_numpy("adding", length=100), ValueError,
     "name must be one of"),
    ("n <= 0 examples", lambda: datasets.adding_problem(0, 10), ValueError,
     "must be a positive integer"),
    ("unknown split", lambda: datasets.load_numpy("copy_memory", length=50, split="dev"),
     ValueError, "split must be one of"),
    ("example: vanishing_gradients --length=1", lambda: example_config("vanishing_gradients",
     length=1), ValueError, "length must be >= 2, got 1"),
    ("example: vanishing_gradients --cells=transformer", lambda: example_config(
        "vanishing_gradients", cells=["transformer"]), ValueError,
     "cells must be a non-empty subset of"),
    ("example: adding_problem --lengths=2", lambda: example_config("adding_problem",
     lengths=[2]), ValueError, "lengths must be integers >= 4"),
    ("example: adding_problem --data=web", lambda: example_config("adding_problem", data="web"),
     ValueError, "data must be 'memory' or 'tfds'"),
    ("example: char_rnn --temperature=0", lambda: example_config("char_rnn", temperature=0.0),
     ValueError, "temperature must be > 0"),
    ("example: char_rnn --cell=rnn", lambda: example_config("char_rnn", cell="rnn"), ValueError,
     "cell must be one of"),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_catalogue(case):
    _, make, error, message = case
    with pytest.raises(error, match=message):
        make()


def test_catalogue_is_large():
    assert len(CATALOGUE) >= 30


@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_all_masked_rows_follow_keras(name):
    """A row whose every step is masked is not an error (the Keras convention): its output is
    the initial state (zeros), equal to keras.layers with the same weights, and its gradients
    are finite (zero)."""
    ours_cls = {"simple_rnn": fr.SimpleRNN, "lstm": fr.LSTM, "gru": fr.GRU}[name]
    ref_cls = {"simple_rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM,
               "gru": keras.layers.GRU}[name]
    mask = np.ones((B, T), bool)
    mask[1] = False  # row 1: everything masked
    mask[2, 3:] = False
    ours, ref = ours_cls(H, return_sequences=True), ref_cls(H, return_sequences=True)
    ours(X, mask=mask)
    ref(X, mask=mask)
    ref.set_weights(ours.get_weights())
    x = tf.constant(X)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        out, want = ours(x, mask=mask), ref(x, mask=mask)
        loss_ours, loss_ref = tf.reduce_sum(out ** 2 + out), tf.reduce_sum(want ** 2 + want)
    np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-6)
    np.testing.assert_array_equal(out.numpy()[1], 0.0)
    grads = tape.gradient(loss_ours, [x] + ours.trainable_weights)
    grads_ref = tape.gradient(loss_ref, [x] + ref.trainable_weights)
    for g, r in zip(grads, grads_ref):
        assert np.all(np.isfinite(g.numpy()))
        np.testing.assert_allclose(g.numpy(), r.numpy(), atol=1e-5)
    np.testing.assert_array_equal(grads[0].numpy()[1], 0.0)


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises((ValueError, OSError), match="csv_path|file|directory|Not a directory"):
        fit_with_monitor(data=(X, Y), csv_path=str(blocker / "sub" / "g.csv"))


def test_nan_in_data_is_counted_not_a_crash():
    x = X.copy()
    x[1, 2, 0] = np.nan
    model = keras.Sequential([keras.Input((T, D)), fr.LSTM(H), keras.layers.Dense(1)])
    opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.1))
    model.compile(opt, "mse")
    before = [w.copy() for w in model.get_weights()]
    monitor = fr.GradientNormMonitor(data=(x, Y), every_n_batches=1)
    model.fit(x, Y, batch_size=B, epochs=2, verbose=0, callbacks=[monitor])
    assert int(opt.skipped_steps.numpy()) == 2
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert np.isnan(monitor.history[model.layers[0].name]).any()


def fit_once(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((T, D)),
                              fr.LSTM(H, dropout=0.2, seed=1, return_sequences=True, name="lstm"),
                              fr.GRU(H, recurrent_dropout=0.2, seed=2, name="gru"),
                              keras.layers.Dense(1)])
    model.compile(fr.ClippingOptimizer(keras.optimizers.Adam(0.01)), "mse")
    monitor = fr.GradientNormMonitor(data=(X, Y), every_n_batches=1)
    y = np.random.default_rng(1).normal(size=(B * 4, 1)).astype("float32")
    x = np.concatenate([X] * 4)
    model.fit(x, y, batch_size=B, epochs=2, verbose=0, callbacks=[monitor], shuffle=True)
    return model.get_weights(), {k: np.array(v) for k, v in monitor.history.items()}


def test_determinism():
    tf.config.experimental.enable_op_determinism()
    try:
        w1, h1 = fit_once(3)
        w2, h2 = fit_once(3)
    finally:  # keep the rest of this process as it was
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    assert h1.keys() == h2.keys()
    for k in h1:
        np.testing.assert_array_equal(h1[k], h2[k])


MIRRORED = textwrap.dedent("""
    import os, sys, json
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, keras_fancyrnn as fr
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")

    def run(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((6, 3)),
                                      fr.LSTM(5, return_sequences=True, name="lstm"),
                                      fr.Bidirectional(fr.GRU(4), name="bi"),
                                      keras.layers.Dense(1)])
            opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.5), threshold=0.05)
            model.compile(opt, "mse")
        monitor = fr.GradientNormMonitor(data=(x[:8], y[:8]), every_n_batches=1)
        model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False, callbacks=[monitor])
        return model.get_weights(), monitor.history, float(opt.clipped_steps.numpy())

    one = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
    two = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(one[0], two[0])]
    hist = {k: float(np.max(np.abs(np.array(one[1][k]) - np.array(two[1][k])))) for k in one[1]}
    clipped = [one[2], two[2]]
    print("RESULT", json.dumps({"weights": max(diffs), "history": hist, "clipped": clipped}))
""")


def test_mirrored_strategy_equals_one_device():
    import json

    proc = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][0]
    result = json.loads(line[len("RESULT "):])
    assert result["weights"] < 1e-5
    assert result["history"] and max(result["history"].values()) < 1e-5
    assert result["clipped"][0] == result["clipped"][1] > 0  # clipping fired, same on both



MULTI_WORKER = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    import keras, keras_fancyrnn as fr
    out = sys.argv[1]
    # TF_CONFIG set: two workers on localhost; unset: one process, the combined batch.
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ
                else tf.distribute.OneDeviceStrategy("/cpu:0"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    GLOBAL = 8
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6, 3)), fr.LSTM(5, return_sequences=True),
                                  fr.Bidirectional(fr.GRU(4)), keras.layers.Dense(1)])
        opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.5), threshold=0.05)
        opt.build(model.trainable_variables)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL).with_options(options)
    dist = strategy.experimental_distribute_dataset(ds)  # each worker: its 4 of every 8

    @tf.function
    def step(xb, yb):
        def replica(xb, yb):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_mean(tf.square(model(xb, training=True) - yb), axis=-1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL)
            opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        strategy.run(replica, args=(xb, yb))

    for epoch in range(3):
        for xb, yb in dist:
            step(xb, yb)
    np.savez(out, *[v.numpy() for v in model.trainable_variables],
             clipped=opt.clipped_steps.numpy(), replicas=strategy.num_replicas_in_sync)
""")


def free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_multi_worker_mirrored_equals_one_process(tmp_path):
    """Two worker processes on localhost (MultiWorkerMirroredStrategy, TF_CONFIG) in a custom
    training loop equal one process on the combined batch: the layers' gradients and the
    ClippingOptimizer's clip of the all-reduced gradient. (Keras 3.15's model.fit itself fails
    under this strategy even for keras.layers.GRU with SGD, keras-team/keras#20585.)"""
    import json

    script = tmp_path / "worker.py"
    script.write_text(MULTI_WORKER)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CONFIG", None)
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(2)]}
    workers = []
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        workers.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"worker{i}.npz")],
            env={**env, "TF_CONFIG": tf_config}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one.npz")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for w in workers:
        try:
            _, err = w.communicate(timeout=300)
        finally:
            w.kill()
        assert w.returncode == 0, err[-3000:]

    one = np.load(tmp_path / "one.npz")
    assert int(one["replicas"]) == 1
    for i in range(2):
        got = np.load(tmp_path / f"worker{i}.npz")
        assert int(got["replicas"]) == 2
        weights = [k for k in one.files if k.startswith("arr_")]
        assert len(weights) == 11
        for k in weights:
            np.testing.assert_allclose(got[k], one[k], atol=1e-6, rtol=0, err_msg=k)
        # clipping fired, on the same steps as with the whole batch in one process
        assert int(got["clipped"]) == int(one["clipped"]) > 0

def test_long_sequence_trains():
    steps = 10_000
    x = np.random.default_rng(0).normal(size=(2, steps, 2)).astype("float32")
    model = keras.Sequential([keras.Input((steps, 2)), fr.GRU(4), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    loss = model.fit(x, np.ones((2, 1), "float32"), epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss)


@pytest.mark.parametrize("wrapper", ["bidirectional", "stacked"])
def test_wrapper_finite_differences_float64_with_mask(wrapper):
    rng = np.random.default_rng(4)
    if wrapper == "bidirectional":
        layer = fr.Bidirectional(fr.LSTM(3, return_sequences=True, dtype="float64"),
                                 dtype="float64")
    else:
        layer = fr.StackedRNN([fr.GRU(3, return_sequences=True, dtype="float64"),
                               fr.LSTM(3, return_sequences=True, dtype="float64")],
                              residual=True, dtype="float64")
    x = rng.normal(size=(2, 5, 3))
    mask = np.array([[True] * 5, [True] * 3 + [False] * 2])
    layer(x, mask=mask)

    def loss_of(x_):
        return tf.reduce_sum(tf.sin(layer(x_, mask=mask)))

    assert_gradients_match_finite_differences(loss_of, x, layer.trainable_weights, rng)

