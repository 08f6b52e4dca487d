"""fr.SimpleRNN / LSTM / GRU against keras.layers with copied weights (a reference nobody here
wrote): outputs, states and gradients for every option, plus the Keras contracts."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fancyrnn as fr

KINDS = {
    "simple_rnn": (keras.layers.SimpleRNN, fr.SimpleRNN, {}),
    "lstm": (keras.layers.LSTM, fr.LSTM, {}),
    "gru": (keras.layers.GRU, fr.GRU, {}),
    "gru_reset_before": (keras.layers.GRU, fr.GRU, {"reset_after": False}),
}
B, T, D, H = 3, 6, 4, 5
RTOL = ATOL = 1e-5


def make_pair(kind, **options):
    keras_cls, fr_cls, extra = KINDS[kind]
    kw = {**extra, **options}
    ref = keras_cls(H, seed=1, **kw)
    ours = fr_cls(H, seed=1, **kw)
    return ref, ours


def copy_weights(ref, ours, x, **call_kw):
    ref(x, **call_kw)
    ours(x, **call_kw)
    weights = ref.get_weights()
    # random biases, so that bias handling is exercised
    weights = [w + np.random.default_rng(7).normal(0, 0.3, w.shape).astype(w.dtype)
               for w in weights]
    ref.set_weights(weights)
    ours.set_weights(weights)


def outputs_and_grads(layer, x, **call_kw):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x, **call_kw)
        flat = tf.nest.flatten(out)
        loss = sum(tf.reduce_sum(tf.sin(o) * (i + 1)) for i, o in enumerate(flat))
    grads = tape.gradient(loss, [x] + layer.trainable_weights)
    return [o.numpy() for o in flat], [g.numpy() for g in grads]


def assert_same(ref, ours, x, **call_kw):
    out_r, grad_r = outputs_and_grads(ref, x, **call_kw)
    out_o, grad_o = outputs_and_grads(ours, x, **call_kw)
    assert len(out_r) == len(out_o)
    for a, b in zip(out_r, out_o):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    for a, b in zip(grad_r, grad_o):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


@pytest.fixture
def x(rng):
    return rng.normal(size=(B, T, D)).astype("float32")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"return_sequences": True},
        {"return_state": True},
        {"return_sequences": True, "return_state": True, "go_backwards": True},
        {"use_bias": False},
        {"activation": "relu", "return_sequences": True},
        {"unroll": True, "return_sequences": True},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_matches_keras(kind, options, x):
    ref, ours = make_pair(kind, **options)
    copy_weights(ref, ours, x)
    assert_same(ref, ours, x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("go_backwards", [False, True])
def test_matches_keras_with_mask(kind, go_backwards, x):
    mask = np.ones((B, T), bool)
    mask[0, 4:] = False  # right padded
    mask[1, :2] = False  # left padded
    mask[2, 3] = False  # a hole
    ref, ours = make_pair(kind, return_sequences=True, return_state=True,
                          go_backwards=go_backwards)
    copy_weights(ref, ours, x)
    assert_same(ref, ours, x, mask=mask)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_masking_layer_in_a_model(kind, x):
    x = x.copy()
    x[0, 3:] = 0.0
    ref, ours = make_pair(kind, return_sequences=True)
    models = [keras.Sequential([keras.Input((T, D)), keras.layers.Masking(0.0), layer])
              for layer in (ref, ours)]
    models[1].set_weights(models[0].get_weights())
    np.testing.assert_allclose(models[1](x), models[0](x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_initial_state(kind, x, rng):
    ref, ours = make_pair(kind, return_state=True)
    n_states = 2 if kind == "lstm" else 1
    init = [rng.normal(size=(B, H)).astype("float32") for _ in range(n_states)]
    copy_weights(ref, ours, x)
    for a, b in zip(ref(x, initial_state=init), ours(x, initial_state=init)):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["simple_rnn", "lstm"])
@pytest.mark.parametrize("options", [{"unit_forget_bias": False}, {"recurrent_activation": "tanh"},
                                     {"activation": "sigmoid"}])
def test_other_activations_and_bias_options(kind, options, x):
    if kind == "simple_rnn":
        options = {k: v for k, v in options.items() if k == "activation"}
    ref, ours = make_pair(kind, **options)
    copy_weights(ref, ours, x)
    assert_same(ref, ours, x)


def test_unit_forget_bias_visible_in_weights():
    layer = fr.LSTM(H)
    layer.build((None, T, D))
    bias = layer.cell.bias.numpy()
    np.testing.assert_array_equal(bias[H:2 * H], 1.0)
    np.testing.assert_array_equal(bias[:H], 0.0)
    np.testing.assert_array_equal(bias[2 * H:], 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_names_shapes_and_order(kind):
    ref, ours = make_pair(kind)
    ref.build((None, T, D))
    ours.build((None, T, D))
    assert [(w.name, tuple(w.shape)) for w in ours.weights] == [
        (w.name, tuple(w.shape)) for w in ref.weights
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_stateful_across_batches(kind, x):
    ref, ours = make_pair(kind, stateful=True, return_sequences=True)
    models = [keras.Sequential([keras.Input((T, D), batch_size=B), layer])
              for layer in (ref, ours)]
    models[1].set_weights(models[0].get_weights())
    for _ in range(3):  # the state carries over from call to call
        np.testing.assert_allclose(models[1](x), models[0](x), rtol=RTOL, atol=ATOL)
    first = models[1](x).numpy()
    ours.reset_state()
    ref.reset_state()
    np.testing.assert_allclose(models[1](x), models[0](x), rtol=RTOL, atol=ATOL)
    assert not np.allclose(first, models[1](x))  # the state did carry


@pytest.mark.parametrize("kind", KINDS)
def test_cell_inside_keras_rnn(kind, x):
    _, fr_cls, extra = KINDS[kind]
    ours = fr_cls(H, return_sequences=True, **extra)
    wrapped = keras.layers.RNN(ours.cell_class(H, **extra), return_sequences=True)
    ours(x)
    wrapped(x)
    wrapped.set_weights(ours.get_weights())
    np.testing.assert_allclose(wrapped(x), ours(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_layer_inside_keras_bidirectional(kind, x):
    ref, ours = make_pair(kind, return_sequences=True)
    bi_ref = keras.layers.Bidirectional(ref)
    bi_ours = keras.layers.Bidirectional(ours)
    bi_ref(x)
    bi_ours(x)
    bi_ours.set_weights(bi_ref.get_weights())
    mask = np.ones((B, T), bool)
    mask[0, 4:] = False
    np.testing.assert_allclose(bi_ours(x, mask=mask), bi_ref(x, mask=mask), rtol=RTOL,
                               atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_variable_time_length(kind, rng):
    ref, ours = make_pair(kind)
    models = [keras.Sequential([keras.Input((None, D)), layer]) for layer in (ref, ours)]
    models[1].set_weights(models[0].get_weights())
    for steps in (2, 9):
        x = rng.normal(size=(B, steps, D)).astype("float32")
        np.testing.assert_allclose(models[1].predict(x, verbose=0),
                                   models[0].predict(x, verbose=0), rtol=RTOL, atol=ATOL)


def test_dropout_masks_are_variational_and_scaled():
    # kernel = I, recurrent kernel = 0, linear: h_t = x_t * m with one mask m for all t
    layer = fr.SimpleRNN(D, activation=None, dropout=0.5, return_sequences=True,
                         kernel_initializer="identity", recurrent_initializer="zeros", seed=3)
    x = np.ones((64, T, D), "float32")
    out = layer(x, training=True).numpy()
    m = out[:, 0]
    np.testing.assert_array_equal(out, np.repeat(m[:, None], T, axis=1))  # same over time
    assert set(np.unique(m)) == {0.0, 2.0}  # kept units scaled by 1/(1-p)
    assert 0.3 < (m == 0).mean() < 0.7
    np.testing.assert_array_equal(layer(x, training=False), x)  # inference: no dropout
    # a new call draws a new mask
    assert not np.array_equal(layer(x, training=True).numpy()[:, 0], m)


@pytest.mark.parametrize("kind", ["simple_rnn", "lstm", "gru"])
def test_recurrent_dropout_mask_constant_over_time(kind):
    # with recurrent_dropout only and training=False the layer equals Keras; with training=True
    # a hand-unrolled step using the same cell call must give the same sequence when the masks
    # are fixed: the engine must draw one mask per sequence.
    _, fr_cls, extra = KINDS[kind]
    layer = fr_cls(H, recurrent_dropout=0.4, dropout=0.3, return_sequences=True, seed=5,
                   **extra)
    x = np.random.default_rng(1).normal(size=(B, T, D)).astype("float32")
    layer(x)
    cell = layer.cell
    # draw masks through the engine by seeding the same generator state twice
    state = cell.seed_generator.state.numpy()
    out = layer(x, training=True).numpy()
    cell.seed_generator.state.assign(state)
    dp = cell.get_dropout_mask(x[:, 0])
    rec = cell.get_recurrent_dropout_mask(np.zeros((B, H), "float32"))
    cell.reset_dropout_mask()
    cell.reset_recurrent_dropout_mask()
    states = cell.get_initial_state(B)
    manual = []
    for t in range(T):
        h, states = cell.step(cell.project_inputs(x[:, t], dp), states, rec)
        manual.append(h)
    np.testing.assert_allclose(out, np.stack(manual, 1), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("jit_compile", ["auto", False, True])
def test_trains_under_compile_modes(jit_compile, rng):
    x = rng.normal(size=(64, 8, 3)).astype("float32")
    y = x[:, :3, 0].sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((None, 3)), fr.LSTM(16, return_sequences=True),
                              fr.GRU(8), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.02), "mse", jit_compile=jit_compile)
    hist = model.fit(x, y, epochs=15, batch_size=16, verbose=0).history["loss"]
    assert hist[-1] < 0.5 * hist[0]


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trip(kind):
    _, fr_cls, extra = KINDS[kind]
    layer = fr_cls(H, dropout=0.1, return_sequences=True, bptt_truncate=3,
                   kernel_regularizer="l2", name="rnn_x", **extra)
    config = layer.get_config()
    clone = fr_cls.from_config(config)
    assert clone.get_config() == config
    assert keras.layers.deserialize(keras.layers.serialize(layer)).get_config() == config


@pytest.mark.parametrize("kind", KINDS)
def test_legacy_implementation_zero_round_trips_and_computes_as_keras(kind, x):
    """Keras accepts ``implementation=0`` (legacy configs) and computes as with 2; so do the fr
    layers and cells, and the value survives get_config/from_config. A Keras config with it loads
    into the fr layer (Keras's SimpleRNN has no such argument, so fr's alone carries it)."""
    keras_cls, fr_cls, extra = KINDS[kind]
    keras_config = keras_cls(H, return_sequences=True, **extra).get_config()
    if kind != "simple_rnn":
        keras_config["implementation"] = 0
    ref = keras_cls.from_config(keras_config)
    ours = fr_cls.from_config({**keras_config, "implementation": 0})
    copy_weights(ref, ours, x)
    np.testing.assert_allclose(ours(x), ref(x), rtol=RTOL, atol=ATOL)
    config = ours.get_config()
    assert config["implementation"] == 0 and ours.cell.implementation == 0
    clone = fr_cls.from_config(config)
    assert clone.get_config() == config
    clone(x)
    clone.set_weights(ours.get_weights())
    np.testing.assert_array_equal(clone(x), ours(x))
    cell = fr_cls.cell_class(H, implementation=0, **extra)
    assert fr_cls.cell_class.from_config(cell.get_config()).get_config() == cell.get_config()


def test_save_and_load_keras_file(tmp_path, x):
    model = keras.Sequential([keras.Input((T, D)), fr.LSTM(H, return_sequences=True),
                              fr.GRU(H, return_sequences=True), fr.SimpleRNN(H)])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded(x), model(x))
    assert isinstance(loaded.layers[0], fr.LSTM)


def integer_inputs(rng):
    """The same small integers as numpy int32/int64/uint8, bool-free, and as tf int tensors."""
    ints = rng.integers(-2, 3, size=(B, T, D))
    return ints, [ints.astype("int32"), ints, np.abs(ints).astype("uint8"),
                  tf.constant(ints, tf.int32), tf.constant(ints, tf.int64)]


@pytest.mark.parametrize("kind", KINDS)
def test_integer_inputs_are_cast_as_keras_does(kind, rng):
    """Keras's layers take integer inputs and compute in their compute dtype; so do ours (eager,
    and with the RNN base layer): same output dtype, values equal to Keras with copied weights."""
    ints, variants = integer_inputs(rng)
    ref, ours = make_pair(kind, return_sequences=True, return_state=True)
    copy_weights(ref, ours, ints.astype("float32"))
    for x in variants:
        expected, got = ref(x), ours(x)
        for a, b in zip(expected, got, strict=True):
            assert b.dtype == a.dtype == "float32"
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    _, fr_cls, extra = KINDS[kind]
    base = fr.RNN(fr_cls.cell_class(H, **extra))
    base(ints.astype("float32"))
    base.set_weights(ours.get_weights())
    np.testing.assert_allclose(base(variants[0]), ours(variants[0])[1], rtol=RTOL, atol=ATOL)


def test_integer_inputs_under_mixed_precision_give_keras_dtype(rng):
    ints, _ = integer_inputs(rng)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        ref, ours = make_pair("lstm")
        expected, got = ref(ints), ours(ints)
    finally:
        keras.config.set_dtype_policy(previous)
    assert got.dtype == expected.dtype == "float16"


@pytest.mark.parametrize("kind", ["lstm", "gru_reset_before"])
def test_integer_inputs_in_a_model_fit_equal_keras(kind, rng):
    """An int32 ``keras.Input`` feeding the layer: predictions, losses and trained weights of a
    few SGD steps equal the same model built with Keras's layer."""
    ints, _ = integer_inputs(rng)
    y = rng.normal(size=(B, 1)).astype("float32")
    models = []
    for layer in make_pair(kind):
        inp = keras.Input((T, D), dtype="int32")
        model = keras.Model(inp, keras.layers.Dense(1)(layer(inp)))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    x = ints.astype("int32")
    np.testing.assert_allclose(models[1].predict(x, verbose=0), models[0].predict(x, verbose=0),
                               rtol=RTOL, atol=ATOL)
    losses = [m.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0).history["loss"]
              for m in models]
    np.testing.assert_allclose(losses[1], losses[0], rtol=RTOL, atol=ATOL)
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)

@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: fr.LSTM(0), "units must be a positive integer, got 0"),
        (lambda: fr.GRU(-3), "units must be a positive integer"),
        (lambda: fr.SimpleRNN(2.5), "units must be a positive integer"),
        (lambda: fr.LSTM(4, activation="nope"), "activation must be a Keras activation"),
        (lambda: fr.GRU(4, recurrent_activation="nope"), "recurrent_activation must be"),
        (lambda: fr.LSTM(4, dropout=1.0), r"dropout must be a float in \[0, 1\), got 1.0"),
        (lambda: fr.GRU(4, recurrent_dropout=-0.1), "recurrent_dropout must be a float"),
        (lambda: fr.SimpleRNN(4, bptt_truncate=0), "bptt_truncate must be None"),
        (lambda: fr.LSTM(4, bptt_truncate=2.0), "bptt_truncate must be None"),
        (lambda: fr.LSTM(4, use_cudnn="yes"), "use_cudnn must be"),
        (lambda: fr.GRU(4, implementation=3), r"implementation must be 0, 1 or 2, got 3"),
    ],
)
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_inputs(x):
    layer = fr.LSTM(H)
    with pytest.raises(ValueError, match="expected ndim=3"):
        layer(x[:, 0])  # 2-D input
    layer(x)
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 4"):
        layer(np.zeros((B, T, D + 1), "float32"))  # feature dim changed after build
    with pytest.raises(TypeError, match="real-valued inputs .*got dtype complex64"):
        fr.GRU(H)(np.zeros((B, T, D), "complex64"))
    with pytest.raises(ValueError, match="0 timesteps"):
        fr.GRU(H)(np.zeros((B, 0, D), "float32"))
    with pytest.raises(ValueError, match="initial_state to be a list of 2"):
        fr.LSTM(H)(x, initial_state=[np.zeros((B, H), "float32")])
    with pytest.raises(ValueError, match=r"initial_state\[0\] must have shape \(3, 5\)"):
        fr.GRU(H)(x, initial_state=[np.zeros((B, H + 1), "float32")])
    with pytest.raises(ValueError, match="mask must have shape"):
        fr.GRU(H)(x, mask=np.ones((B, T + 1), bool))
    with pytest.raises(ValueError, match="unroll=True needs a static number of timesteps"):
        keras.Sequential([keras.Input((None, D)), fr.GRU(H, unroll=True)])
