"""The monitor on models built with Keras's own recurrent layers: the curves against Keras's cells
stepped by hand under a GradientTape (gradients w.r.t. every state tensor, the total derivative),
the probe model sharing the variables (training unchanged), one warning for a layer it cannot
reach, and selection by any key the monitor reports."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from tolerance import assert_close, rounding_chain

import keras_fancyrnn as fr
from keras_fancyrnn.diagnostics import GradientNormMonitor, gradient_norms

B, T, D, H, OUT = 4, 7, 3, 5, 2
K = keras.layers


def data(rng, b=B):
    return (rng.normal(0, 1, (b, T, D)).astype("float32"),
            rng.normal(0, 1, (b, OUT)).astype("float32"))


def compiled(inp, out):
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="mse")
    r = np.random.default_rng(3)
    model.set_weights([r.normal(0, 0.6, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def step_by_hand(cell, x, backwards=False):
    """Keras's ``cell`` over ``x`` [B, T, D]: the last output and, per input timestep, the state
    tensors the step returned (the tensors the loss depends on through the recurrence)."""
    states = [tf.zeros((x.shape[0], s)) for s in np.atleast_1d(cell.state_size)]
    per_step: dict = {}
    order = range(x.shape[1] - 1, -1, -1) if backwards else range(x.shape[1])
    for t in order:
        out, states = cell(x[:, t], states)
        states = list(states) if isinstance(states, (list, tuple)) else [states]
        per_step[t] = states
    return out, [[per_step[t][i] for t in range(x.shape[1])] for i in range(len(states))]


def mean_norms(grads):
    g = np.stack([np.asarray(a, np.float64) for a in grads], 1)  # [B, T, S]
    return np.linalg.norm(g, axis=-1).mean(0)


def chain(gates):
    return rounding_chain(T, B, D, H, gates)


@pytest.mark.parametrize("make,gates", [(lambda: K.LSTM(H, name="k"), 4),
                                        (lambda: K.GRU(H, name="k"), 3),
                                        (lambda: K.SimpleRNN(H, name="k"), 1),
                                        (lambda: K.RNN(K.LSTMCell(H), name="k"), 4)])
def test_keras_layer_curves_equal_its_cell_stepped_by_hand(rng, make, gates):
    inp = keras.Input((T, D))
    model = compiled(inp, K.Dense(OUT, name="head")(make()(inp)))
    x, y = data(rng)
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        last, states = step_by_hand(model.get_layer("k").cell, xt)
        total = tf.reduce_sum(tf.reduce_mean((model.get_layer("head")(last) - y) ** 2, -1))
    curves = gradient_norms(model, x, y)
    keys = ["k", "k/cell"][: len(states)]
    assert list(curves) == [*keys, "k/input"]
    for key, tensors in zip(keys, states):
        assert_close(curves[key], mean_norms(tape.gradient(total, tensors)), chain(gates),
                     name=key)
    assert_close(curves["k/input"], mean_norms(tf.unstack(tape.gradient(total, xt), axis=1)),
                 chain(gates), name="k/input")


def test_keras_bidirectional_directions_equal_cells_stepped_by_hand(rng):
    inp = keras.Input((T, D))
    model = compiled(inp, K.Dense(OUT, name="head")(K.Bidirectional(K.LSTM(H), name="kbi")(inp)))
    x, y = data(rng)
    xt = tf.constant(x)
    bi = model.get_layer("kbi")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        last_f, fwd = step_by_hand(bi.forward_layer.cell, xt)
        last_b, bwd = step_by_hand(bi.backward_layer.cell, xt, backwards=True)
        pred = model.get_layer("head")(tf.concat([last_f, last_b], -1))
        total = tf.reduce_sum(tf.reduce_mean((pred - y) ** 2, -1))
    curves = gradient_norms(model, x, y)
    assert list(curves) == ["kbi/input", "kbi/forward", "kbi/forward/cell", "kbi/backward",
                            "kbi/backward/cell"]
    for side, states in (("forward", fwd), ("backward", bwd)):
        for key, tensors in zip((f"kbi/{side}", f"kbi/{side}/cell"), states):
            assert_close(curves[key], mean_norms(tape.gradient(total, tensors)), chain(4),
                         name=key)
    assert_close(curves["kbi/input"], mean_norms(tf.unstack(tape.gradient(total, xt), axis=1)),
                 chain(4), name="kbi/input")


def test_stacked_cells_give_one_series_per_cell_as_the_converted_model(rng):
    inp = keras.Input((T, D))
    cells = [K.GRUCell(H, name="c1"), K.LSTMCell(H, name="c2")]
    model = compiled(inp, K.Dense(OUT)(K.RNN(K.StackedRNNCells(cells), name="st")(inp)))
    x, y = data(rng)
    curves = gradient_norms(model, x, y)
    assert list(curves) == ["c1", "c2", "c2/cell", "st/input"]
    converted = fr.from_keras(model)  # checked against Keras in tests/test_convert.py
    want = gradient_norms(converted, x, y)
    for key in ("c1", "c2", "c2/cell"):
        assert_close(curves[key], want[key], chain(4), name=key)
    assert_close(curves["st/input"], want["c1/input"], chain(4), name="st/input")


def test_probe_model_shares_the_variables_and_training_is_unchanged(rng):
    x, y = data(rng, b=16)

    def train(with_monitor):
        keras.utils.set_random_seed(0)
        inp = keras.Input((T, D))
        model = compiled(inp, K.Dense(OUT)(K.GRU(H, name="g")(inp)))
        monitor = GradientNormMonitor((x[:8], y[:8]), every_n_batches=1)
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False,
                  callbacks=[monitor] if with_monitor else [])
        return model, monitor

    model, monitor = train(True)
    plan = monitor._probe._plan
    assert plan.model is not model
    assert all(a is b for a, b in zip(plan.model.trainable_variables, model.trainable_variables))
    assert monitor.history["g"].shape == (5, T)
    # the last record was taken on the trained weights: a fresh pass on them agrees
    np.testing.assert_allclose(monitor.history["g"][-1], monitor.compute(x[:8], y[:8])["g"])
    plain, _ = train(False)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_stateful_keras_layer_keeps_its_states(rng):
    x, y = data(rng)
    inp = keras.Input(batch_shape=(B, T, D))
    model = compiled(inp, K.Dense(OUT)(K.LSTM(H, stateful=True, name="s")(inp)))
    model.predict(x, verbose=0)
    before = [v.numpy() for v in model.get_layer("s").states]
    curves = gradient_norms(model, x, y)
    assert list(curves) == ["s", "s/cell", "s/input"]
    for v, b in zip(model.get_layer("s").states, before):
        np.testing.assert_array_equal(v.numpy(), b)


class Wrapped(keras.Model):
    def __init__(self):
        super().__init__()
        self.frl = fr.GRU(H, return_sequences=True, name="frl")
        self.kl = K.LSTM(H, name="kl")
        self.head = K.Dense(OUT)

    def call(self, x):
        return self.head(self.kl(self.frl(x)))


@keras.saving.register_keras_serializable(package="test_keras_layers")
class OwnLSTM(K.LSTM):
    pass


def recorded_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if "GradientNormMonitor" in str(w.message)]


def test_a_layer_it_cannot_reach_gets_one_warning_naming_it(rng):
    x, y = data(rng)
    model = Wrapped()
    model.compile(loss="mse")
    model(x)
    monitor = GradientNormMonitor((x, y), every_n_batches=1)
    monitor.set_model(model)
    _, caught = recorded_warnings(lambda: (monitor.record(), monitor.record()))
    assert len(caught) == 1 and "'kl'" in caught[0] and "subclassed" in caught[0]
    assert list(monitor.history) == ["frl", "frl/input"]

    inp = keras.Input((T, D))
    model = compiled(inp, K.Dense(OUT)(OwnLSTM(H, name="own")(inp)))
    curves, caught = recorded_warnings(lambda: gradient_norms(model, x, y))
    assert len(caught) == 1 and "'own'" in caught[0] and "subclass of keras.layers.RNN" in caught[0]
    assert list(curves) == ["own/input"]  # its input still, through an input probe
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        total = tf.reduce_sum(tf.reduce_mean((model(xt) - y) ** 2, -1))
    assert_close(curves["own/input"], mean_norms(tf.unstack(tape.gradient(total, xt), axis=1)),
                 chain(4), name="own/input")


def test_selection_accepts_every_reported_key(rng):
    def branch(name):
        inp = keras.Input((T, D))
        return keras.Model(inp, fr.LSTM(H, return_sequences=True, name="top")(inp), name=name)

    inp = keras.Input((T, D))
    h = K.Concatenate()([branch("branch_a")(inp), branch("branch_b")(inp)])
    h = K.Bidirectional(K.GRU(H), name="bi")(h)
    model = compiled(inp, K.Dense(OUT)(h))
    x, y = data(rng)
    everything = gradient_norms(model, x, y)
    assert {"branch_a/top", "branch_b/top", "bi/forward", "bi/backward/input"} - set(
        everything) == {"bi/backward/input"}
    for key in ("branch_a/top", "branch_b/top/cell", "bi/forward", "bi/input"):
        curves = gradient_norms(model, x, y, layers=key)
        assert key in curves
        np.testing.assert_allclose(curves[key], everything[key], rtol=1e-6)
    monitor = GradientNormMonitor((x, y), layers=["branch_a/top", "bi/backward"])
    monitor.set_model(model)
    assert list(monitor.record()) == ["branch_a/top", "branch_a/top/cell", "branch_a/top/input",
                                      "bi/backward"]


def test_probe_model_is_not_compiled_so_any_loss_and_optimizer_work(rng):
    """The probe model needs no compile config: an unregistered loss function and an fr
    ClippingOptimizer (which do not round-trip through a config) leave the monitor working."""
    def own_mse(y_true, y_pred):
        return keras.ops.mean((y_true - y_pred) ** 2, axis=-1)

    x, y = data(rng)
    inp = keras.Input((T, D))
    model = keras.Model(inp, K.Dense(OUT)(K.LSTM(H, name="k")(inp)))
    model.compile(optimizer=fr.ClippingOptimizer(keras.optimizers.Adam(1e-2)), loss=own_mse)
    monitor = GradientNormMonitor((x, y), every_n_batches=1)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[monitor])
    assert list(monitor.history) == ["k", "k/cell", "k/input"]
    assert monitor.history["k"].shape == (3, T) and np.all(monitor.history["k"] > 0)
    assert not monitor._probe._plan.model.compiled


def test_input_probe_refuses_an_integer_sequence_by_name(rng):
    ints = rng.integers(-2, 3, size=(B, T, D)).astype("int32")
    _, y = data(rng)
    inp = keras.Input((T, D), dtype="int32")
    model = compiled(inp, K.Dense(OUT)(fr.LSTM(H)(K.Identity(name="ident")(inp))))
    with pytest.raises(fr.LayerSelectionError,
                       match="the input of 'ident' is int32, not a float sequence"):
        gradient_norms(model, ints, y, layers="ident")
