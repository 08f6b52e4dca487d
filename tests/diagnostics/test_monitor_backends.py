"""The monitor on every backend (TensorFlow, JAX, PyTorch), with nothing here importing TensorFlow.

References: a numpy forward pass of the cell equations of ../shared/SCIENCE.md (Keras's layouts)
with the zero probes added as the engine adds them (to h_t after each step, to the LSTM's c_t
inside it, to the input; a masked step keeps the previous states), differentiated by float64
central finite differences: ``∂ℓ_i/∂p_t``, i.e. ``∂ℓ_i/∂h_t``, per example. The curves are then
the mean of the per-example norms over the valid examples and the counts, computed here. The
diagnosis is compared against the same case run on TensorFlow in a subprocess.
"""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from tolerance import assert_close, rounding_chain

import keras_fancyrnn as fr
from keras_fancyrnn.diagnostics import GradientNormMonitor, gradient_norms
from keras_fancyrnn.errors import ProbeDataError

pytestmark = pytest.mark.all_backends

B, T, D, H, OUT = 4, 7, 3, 5, 2
LENGTHS = (7, 5, 2, 6)  # right-padded, behind Masking
GATES = {"simple": 1, "gru": 3, "lstm": 4}
LAYERS = {("fr", "simple"): fr.SimpleRNN, ("fr", "lstm"): fr.LSTM, ("fr", "gru"): fr.GRU,
          ("keras", "simple"): keras.layers.SimpleRNN, ("keras", "lstm"): keras.layers.LSTM,
          ("keras", "gru"): keras.layers.GRU}
EPS = 1e-6  # finite differences in float64: truncation ~EPS², rounding ~1e-16 / EPS


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_losses(kind, weights, x, mask, probes):
    """Per-example MSE losses ``[B]`` of Masking → RNN (last state) → Dense, in float64, with
    the probes ``{0: [B, T, H], 1: [B, T, H] (LSTM c), "input": [B, T, D]}`` added."""
    W, U, b, Wd, bd, y = weights
    h = np.zeros((x.shape[0], U.shape[0]))
    c = np.zeros_like(h)
    for t in range(x.shape[1]):
        xt = x[:, t] + probes["input"][:, t]
        c_new = c
        if kind == "simple":
            h_new = np.tanh(xt @ W + h @ U + b)
        elif kind == "lstm":
            i, f, g, o = np.split(xt @ W + h @ U + b, 4, axis=-1)
            c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g) + probes[1][:, t]
            h_new = sigmoid(o) * np.tanh(c_new)
        else:  # GRU, reset_after=True
            xz, xr, xh = np.split(xt @ W + b[0], 3, axis=-1)
            hz, hr, hh = np.split(h @ U + b[1], 3, axis=-1)
            z, r = sigmoid(xz + hz), sigmoid(xr + hr)
            h_new = z * h + (1 - z) * np.tanh(xh + r * hh)
        h_new = h_new + probes[0][:, t]
        valid = mask[:, t : t + 1]
        h, c = np.where(valid, h_new, h), np.where(valid, c_new, c)
    return ((h @ Wd + bd - y) ** 2).mean(axis=-1)


def reference_curves(kind, weights, x, mask):
    """``{series: (curve [T], per-example norms [B, T])}`` by central finite differences."""
    x = np.asarray(x, np.float64)
    weights = [np.asarray(w, np.float64) for w in weights]
    shapes = {0: (B, T, H), "input": x.shape}
    if kind == "lstm":
        shapes[1] = (B, T, H)
    zeros = {k: np.zeros(s) for k, s in shapes.items()}
    out = {}
    for key, shape in shapes.items():
        grads = np.zeros(shape)
        for t in range(shape[1]):
            for j in range(shape[2]):
                plus, minus = dict(zeros), dict(zeros)
                e = np.zeros(shape)
                e[:, t, j] = EPS
                plus[key], minus[key] = e, -e
                grads[:, t, j] = (numpy_losses(kind, weights, x, mask, plus)
                                  - numpy_losses(kind, weights, x, mask, minus)) / (2 * EPS)
        norms = np.linalg.norm(grads, axis=-1)
        out[{0: "rnn", 1: "rnn/cell", "input": "rnn/input"}[key]] = (
            (norms * mask).sum(0) / mask.sum(0), norms)
    return out


def case(source, kind, seed=0):
    """A compiled Masking → RNN → Dense model with contractive random weights, its padded batch
    ``(x, y)`` and mask ``[B, T]``."""
    rng = np.random.default_rng(seed)
    mask = np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]
    x = (rng.normal(0, 1, (B, T, D)) * mask[..., None]).astype("float32")
    y = rng.normal(0, 1, (B, OUT)).astype("float32")
    inp = keras.Input((T, D))
    hidden = LAYERS[source, kind](H, name="rnn")(keras.layers.Masking()(inp))
    model = keras.Model(inp, keras.layers.Dense(OUT, name="head")(hidden))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32")
                       for w in model.get_weights()])
    return model, x, y, mask


def assert_matches_reference(curves, kind, model, x, y, mask, dtype="float32"):
    want = reference_curves(kind, [*model.get_weights(), y], x, mask)
    assert set(curves) == {*want, "rnn/count"}
    np.testing.assert_array_equal(curves["rnn/count"], mask.sum(0))
    chain = rounding_chain(T, B, D, H, GATES[kind])
    for key, (curve, _) in want.items():
        assert_close(curves[key], curve, chain, dtype, name=key)


@pytest.mark.parametrize("source", ["fr", "keras"])
@pytest.mark.parametrize("kind", ["simple", "lstm", "gru"])
def test_curves_equal_finite_differences(source, kind):
    """‖∂ℓ/∂h_t‖ (and ∂ℓ/∂c_t, ∂ℓ/∂x_t): the mean over each step's valid examples, and the
    counts, for fr layers and Keras's own (run as fr layers in the probe model)."""
    model, x, y, mask = case(source, kind)
    assert_matches_reference(gradient_norms(model, x, y), kind, model, x, y, mask)


def float64_checks(source, kind) -> None:
    """The float64 pass's curves as in float32 (the per-example losses stay float32, ``losses``,
    so float32's rounding bounds them), and a gradient that vanishes far below float32's range
    (1e-45) stays positive in it."""
    model, x, y, mask = case(source, kind)
    curves = gradient_norms(model, x, y, probe_dtype="float64")
    assert curves["rnn"].dtype == np.float64
    assert_matches_reference(curves, kind, model, x, y, mask)
    steps = 40  # ‖∂ℓ/∂h_0‖ about 0.01^39 of ‖∂ℓ/∂h_39‖: no float32 number is that small
    rnn = fr.SimpleRNN(H, name="rnn")
    deep = keras.Sequential([keras.Input((steps, D)), rnn, keras.layers.Dense(OUT)])
    deep.compile(loss="mse")
    rnn.set_weights([w if w.ndim != 2 or w.shape[0] != H else 0.01 * np.eye(H, dtype=w.dtype)
                     for w in rnn.get_weights()])
    x_deep = np.random.default_rng(2).normal(0, 1, (B, steps, D)).astype("float32")
    low = gradient_norms(deep, x_deep, y)["rnn"]
    high = gradient_norms(deep, x_deep, y, probe_dtype="float64")["rnn"]
    assert low[0] == 0 and high[0] > 0 and np.all(np.diff(high) > 0)


@pytest.mark.parametrize("source,kind", [("fr", "lstm"), ("keras", "gru")])
def test_float64_probe_pass(source, kind):
    """``probe_dtype="float64"`` on TensorFlow; elsewhere a ValueError says why not: JAX without
    ``jax_enable_x64`` computes in float32, and Keras's ops on PyTorch (matmul) and on JAX
    (tanh, even with x64) return float32 for float64 operands."""
    if keras.backend.backend() == "tensorflow":
        float64_checks(source, kind)
        return
    model, x, y, _ = case(source, kind)
    refusal = "jax_enable_x64" if keras.backend.backend() == "jax" and not _x64() else (
        "computes float64 operands in float32")
    with pytest.raises(ValueError, match=refusal):
        gradient_norms(model, x, y, probe_dtype="float64")
    with pytest.raises(ValueError, match=refusal):
        GradientNormMonitor((x, y), probe_dtype="float64")


def _x64() -> bool:
    import jax

    return bool(jax.config.jax_enable_x64)


class _Weights(keras.callbacks.Callback):
    """The model's weights at the start of fit and after each training step."""

    def __init__(self):
        super().__init__()
        self.at = {}

    def on_train_begin(self, logs=None):
        self.at[0] = self.model.get_weights()

    def on_train_batch_end(self, batch, logs=None):
        self.at[len(self.at)] = self.model.get_weights()


def test_monitor_in_fit_records_the_weights_of_its_step():
    """Inside fit, each record is taken at its step with that step's weights (a compiled pass
    never keeps the weights it was first run with), and the grad_ratio reaches the fit logs."""
    model, x, y, mask = case("fr", "simple")
    rng = np.random.default_rng(1)
    x_train = rng.normal(0, 1, (24, T, D)).astype("float32")
    y_train = rng.normal(0, 1, (24, OUT)).astype("float32")
    weights = _Weights()
    monitor = GradientNormMonitor((x, y), every_n_batches=2)
    history = model.fit(x_train, y_train, batch_size=4, epochs=1, shuffle=False, verbose=0,
                        callbacks=[weights, monitor])
    assert monitor.steps.tolist() == [0, 2, 4, 6]
    for row, step in enumerate(monitor.steps):
        model.set_weights(weights.at[int(step)])
        curves = {k: v[row] for k, v in monitor.history.items()}
        assert_matches_reference(curves, "simple", model, x, y, mask)
    assert not np.allclose(monitor.history["rnn"][0], monitor.history["rnn"][-1], rtol=1e-3)
    np.testing.assert_allclose(history.history["rnn/grad_ratio"],
                               monitor.scalars["rnn/grad_ratio"][-1:], rtol=1e-6)


def test_compute_after_training_reflects_the_new_weights():
    model, x, y, mask = case("keras", "lstm")
    monitor = GradientNormMonitor((x, y), every_n_batches=1000, record_at_train_begin=False)
    monitor.set_model(model)
    before = monitor.compute(x, y)
    model.fit(x, y, epochs=3, verbose=0)
    after = monitor.compute(x, y)
    assert not np.allclose(before["rnn"], after["rnn"], rtol=1e-3)
    assert_matches_reference(after, "lstm", model, x, y, mask)


def _batches():
    first, x1, y1, _ = case("fr", "gru", seed=0)
    _, x2, y2, _ = case("fr", "gru", seed=1)
    return first, [(x1, y1), (x2, y2)]


class _TwoBatches(keras.utils.PyDataset):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


@pytest.mark.parametrize("kind", ["generator", "py_dataset"])
def test_data_from_generators_and_py_datasets(kind):
    """One batch per record, in order; a PyDataset cycles, an exhausted generator is an error."""
    model, batches = _batches()
    data = iter(batches) if kind == "generator" else _TwoBatches(batches)
    monitor = GradientNormMonitor(data)
    monitor.set_model(model)
    mask = np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]
    for i in range(2):
        assert_matches_reference(monitor.record(), "gru", model, *batches[i], mask)
    if kind == "generator":
        with pytest.raises(ProbeDataError, match="exhausted"):
            monitor.record()
    else:
        np.testing.assert_allclose(monitor.record()["rnn"], monitor.history["rnn"][0], rtol=1e-6)


def test_tensorboard_files_need_tensorflow(tmp_path):
    """TensorBoard event files are written with TensorFlow's writer where TensorFlow is
    installed (whatever the backend); without it, asking for them fails at construction."""
    model, x, y, _ = case("fr", "simple")
    if importlib.util.find_spec("tensorflow") is None:
        with pytest.raises(ImportError, match="log_dir"):
            GradientNormMonitor((x, y), log_dir=str(tmp_path))
        return
    monitor = GradientNormMonitor((x, y), log_dir=str(tmp_path))
    monitor.set_model(model)
    monitor.record()
    files = os.listdir(tmp_path / "gradient_norms")
    assert any(f.startswith("events.out.tfevents") for f in files)


# -- the diagnosis, against TensorFlow's ---------------------------------------------------------
DIAG_T = 24


def diagnosis_case() -> list[dict]:
    """Findings of a fixed case on this backend: a contracting tanh RNN (vanishing) beside an
    expanding ReLU RNN (exploding), every weight from a seeded numpy generator, three records."""
    rng = np.random.default_rng(7)
    x = rng.uniform(-0.1, 0.1, (6, DIAG_T, 2)).astype("float32")
    y = rng.normal(0, 1, (6, 1)).astype("float32")
    inp = keras.Input((DIAG_T, 2))
    small = fr.SimpleRNN(8, name="small")
    large = fr.SimpleRNN(8, activation="relu", name="large")
    out = keras.layers.Add()([keras.layers.Dense(1, name="ds")(small(inp)),
                              keras.layers.Dense(1, name="dl")(large(inp))])
    model = keras.Model(inp, out)
    model.compile(loss="mse")
    # tanh, U = 0.2 Q (Q orthogonal): ‖J‖ ≤ 0.2; ReLU, U = 1.5 I and a positive bias keeping
    # every unit active: J = 1.5 I, so ‖∂ℓ/∂h_0‖ = 1.5^23 ‖∂ℓ/∂h_23‖
    for layer, recurrent in ((small, 0.2 * np.linalg.qr(rng.normal(size=(8, 8)))[0]),
                             (large, 1.5 * np.eye(8))):
        layer.set_weights([rng.normal(0, 0.5, (2, 8)).astype("float32"),
                           recurrent.astype("float32"), np.full(8, 0.1, "float32")])
    for name in ("ds", "dl"):
        model.get_layer(name).set_weights([rng.normal(0, 0.3, (8, 1)).astype("float32"),
                                           np.zeros(1, "float32")])
    monitor = GradientNormMonitor((x, y))
    monitor.set_model(model)
    for step in range(3):
        monitor.record(step)
    return [f.as_dict() for f in monitor.summary()]


def _run_test_module(expression: str, **env) -> str:
    """The last line that ``print(expression)`` (with this module imported as
    ``test_monitor_backends``) writes in a new Python process with ``env`` set."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env,
           "PYTHONPATH": os.pathsep.join([root, os.path.dirname(here), here])}
    code = f"import json, test_monitor_backends; print('RESULT' + json.dumps({expression}))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [s for s in done.stdout.splitlines() if s.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_diagnosis_as_on_tensorflow():
    found = diagnosis_case()
    assert [(f["kind"], f["series"]) for f in found][:1] == [("vanishing", "small")]
    assert ("exploding", "large") in [(f["kind"], f["series"]) for f in found]
    if keras.backend.backend() == "tensorflow":
        return  # the reference itself
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed: the findings are not compared with its own")
    want = _run_test_module("test_monitor_backends.diagnosis_case()", KERAS_BACKEND="tensorflow")
    assert [(f["kind"], f["series"], f["step"]) for f in found] == [
        (f["kind"], f["series"], f["step"]) for f in want]
    for got, ref in zip(found, want):
        assert got["evidence"].keys() == ref["evidence"].keys()
        for name, value in ref["evidence"].items():
            if isinstance(value, float):
                np.testing.assert_allclose(got["evidence"][name], value, rtol=1e-4,
                                           err_msg=f"{ref['kind']} {ref['series']} {name}")
            else:
                assert got["evidence"][name] == value, (ref["kind"], name)
