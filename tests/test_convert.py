"""fr.from_keras against the Keras model it converts: the same outputs and gradients (weights and
input) on the same weights, for Keras's recurrent layers, RNN of cells, StackedRNNCells and
Bidirectional, in Sequential, functional and nested models; errors that name what cannot be
converted."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tolerance import assert_close, rounding_chain

import keras_fancyrnn as fr
from keras_fancyrnn.layers.base import RNN as FrRNN

B, T, D, H = 3, 9, 4, 5
K = keras.layers
CHAIN = rounding_chain(2 * T, B, D, 2 * H)  # two recurrences deep, LSTM-sized gates

LAYERS = {
    "simple_rnn": lambda: K.SimpleRNN(H, activation="relu", return_sequences=True),
    "lstm": lambda: K.LSTM(H, unit_forget_bias=False, go_backwards=True),
    "lstm_no_bias": lambda: K.LSTM(H, use_bias=False, return_sequences=True),
    "gru": lambda: K.GRU(H, return_sequences=True),
    "gru_reset_before": lambda: K.GRU(H, reset_after=False),
    "rnn_of_cell": lambda: K.RNN(K.LSTMCell(H), return_sequences=True),
    "stacked_cells": lambda: K.RNN(K.StackedRNNCells([K.GRUCell(H), K.LSTMCell(3)])),
    "bidirectional": lambda: K.Bidirectional(K.LSTM(H, return_sequences=True), merge_mode="sum"),
    "bidirectional_gru": lambda: K.Bidirectional(K.GRU(H)),
    "rnn_of_fr_cell": lambda: K.RNN(fr.GRUCell(H), return_sequences=True),
    "fr_stack_of_keras": lambda: fr.StackedRNN([K.LSTM(H, return_sequences=True),
                                                K.GRU(H, return_sequences=True)],
                                               residual=[False, True]),
    "fr_bidirectional_of_keras": lambda: fr.Bidirectional(K.SimpleRNN(H), merge_mode="mul"),
}


def randomize(model, seed=1, scale=0.5):
    r = np.random.default_rng(seed)
    model.set_weights([r.normal(0, scale, w.shape).astype(w.dtype) for w in model.get_weights()])


def keras_recurrent_layers(model):
    return [la for la in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(la, (K.RNN, K.Bidirectional)) and not isinstance(la, FrRNN)
            and not isinstance(la, fr.Bidirectional)]


def outputs_and_gradients(model, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x)
        loss = tf.reduce_sum(tf.sin(y))  # every output element weighted differently
    grads = tape.gradient(loss, [x, *model.trainable_variables])
    return [y.numpy(), *[g.numpy() for g in grads]]


def assert_equivalent(converted, model, x):
    assert keras_recurrent_layers(converted) == []
    want = outputs_and_gradients(model, x)
    got = outputs_and_gradients(converted, x)
    assert len(got) == len(want)  # the same weights, in the same order
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, CHAIN, name=f"output/gradient {i}")


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_functional_model_converts_to_equal_outputs_and_gradients(rng, kind):
    inp = keras.Input((T, D))
    model = keras.Model(inp, K.Dense(2, name="head")(LAYERS[kind]()(inp)))
    randomize(model)
    x = rng.normal(0, 1, (B, T, D)).astype("float32")
    assert_equivalent(fr.from_keras(model), model, x)


def test_sequential_and_nested_models_with_masks(rng):
    inner = keras.Sequential([keras.Input((T, D)), K.Masking(0.0), K.GRU(H, return_sequences=True),
                              K.SimpleRNN(H, return_sequences=True)], name="inner")
    inp = keras.Input((T, D))
    h = K.Bidirectional(K.LSTM(3), name="bi")(inner(inp))
    model = keras.Model(inp, K.Dense(2)(h))
    randomize(model)
    x = rng.normal(0, 1, (B, T, D)).astype("float32")
    x[0, 5:] = 0.0  # masked steps
    converted = fr.from_keras(model)
    assert_equivalent(converted, model, x)
    assert isinstance(converted.get_layer("inner"), keras.Sequential)
    assert isinstance(converted.get_layer("bi"), fr.Bidirectional)
    assert_equivalent(fr.from_keras(inner), inner, x)


def test_functional_model_with_masking_converts(rng):
    """Masking in a functional model puts Keras ops (NotEqual, Any) in its graph beside the
    layers; they carry no weights to copy."""
    inp = keras.Input((T, D))
    model = keras.Model(inp, K.Dense(2)(K.LSTM(H)(K.Masking(0.0)(inp))))
    randomize(model)
    x = rng.normal(0, 1, (B, T, D)).astype("float32")
    x[0, 5:] = 0.0
    assert_equivalent(fr.from_keras(model), model, x)


def test_copies_by_default_shares_on_request(rng):
    inp = keras.Input((T, D))
    model = keras.Model(inp, K.LSTM(H)(inp))
    copy, shared = fr.from_keras(model), fr.from_keras(model, share_weights=True)
    assert all(a is b for a, b in zip(shared.trainable_variables, model.trainable_variables))
    assert not any(a is b for a, b in zip(copy.trainable_variables, model.trainable_variables))
    x = rng.normal(0, 1, (B, T, D)).astype("float32")
    before = copy(x).numpy()
    randomize(model)
    np.testing.assert_array_equal(copy(x).numpy(), before)
    assert_close(shared(x).numpy(), model(x).numpy(), CHAIN, name="shared weights, new values")


def test_compiled_model_stays_compiled(rng):
    model = keras.Sequential([keras.Input((T, D)), K.GRU(H), K.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    converted = fr.from_keras(model)
    assert converted.compiled and converted.loss == "mse"


@keras.saving.register_keras_serializable(package="test_convert")
class MyLSTM(K.LSTM):
    pass


class MyCell(K.SimpleRNNCell):
    pass


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.rnn = K.LSTM(H)

    def call(self, x):
        return self.rnn(x)


@pytest.mark.parametrize("make,message", [
    (lambda: MyLSTM(H, name="mine"), r"'mine' \(MyLSTM\): a subclass of keras.layers.RNN"),
    (lambda: K.RNN(MyCell(H), name="rc"), r"'rc' \(RNN\): its cell MyCell"),
    (lambda: K.RNN(K.StackedRNNCells([K.GRUCell(H)]), go_backwards=True, name="st"),
     r"'st' \(RNN\): go_backwards=True with StackedRNNCells"),
    (lambda: K.RNN(K.StackedRNNCells([K.GRUCell(H)]), return_state=True, name="st"),
     r"'st' \(RNN\): return_state=True with StackedRNNCells"),
])
def test_what_cannot_convert_raises_naming_layer_and_option(make, message):
    inp = keras.Input((T, D))
    model = keras.Model(inp, make()(inp))
    with pytest.raises(fr.ConversionError, match=message):
        fr.from_keras(model)


def test_subclassed_model_and_non_model_are_refused():
    model = Subclassed()
    model(np.zeros((1, T, D), "float32"))
    with pytest.raises(fr.ConversionError, match="subclassed model's call is code"):
        fr.from_keras(model)
    with pytest.raises(fr.ConversionError, match="model must be a keras.Model"):
        fr.from_keras(K.LSTM(H))


def test_bidirectional_from_a_keras_config_converts_the_keras_layer(rng):
    theirs = K.Bidirectional(K.LSTM(H, return_sequences=True), merge_mode="ave")
    ours = fr.Bidirectional.from_config(theirs.get_config())
    for side in (ours.forward_layer, ours.backward_layer):
        assert isinstance(side, fr.LSTM)
    x = rng.normal(0, 1, (B, T, D)).astype("float32")
    theirs(x)
    ours(x)
    ours.set_weights(theirs.get_weights())
    assert_close(ours(x).numpy(), theirs(x).numpy(), CHAIN, name="outputs")
    with pytest.raises(fr.ConversionError, match="MyLSTM"):
        fr.Bidirectional.from_config(K.Bidirectional(MyLSTM(H)).get_config())


def test_an_option_without_counterpart_is_named():
    """A Keras layer whose config holds an option the fr layer does not take (a future Keras
    option, say) is refused by name rather than dropped."""
    from keras_fancyrnn import convert

    layer = K.LSTM(H, name="future")
    with pytest.raises(fr.ConversionError, match=r"'future' \(LSTM\).*\['peephole'\]"):
        convert._make(fr.LSTM, layer, {**layer.get_config(), "peephole": True})
