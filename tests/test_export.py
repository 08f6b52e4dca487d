"""Export, serving and exact save/restore.

* ``model.export`` SavedModels of models with every fr layer (and the wrappers), variable batch
  and time and masking, served by ``tf.saved_model.load(path).serve(x)`` in a real subprocess in
  which ``import keras_fancyrnn`` fails; outputs equal the Keras model's.
* Portability: with the cuDNN decision forced to "eligible" on this CPU machine (every device
  query reports a GPU; ``use_cudnn=True`` and ``"auto"``), ``model.export`` and
  ``fr.export_saved_model`` write only ops with CPU kernels, no ``Cudnn*`` op and no GPU device
  pin, and the SavedModel serves on the CPU.
* Stateful layers: ``fr.export_saved_model`` makes every state an explicit input and output.
* ``.keras`` round trips (``safe_mode=True``) and ``BackupAndRestore`` resumes, bit for bit.
* TFLite conversion of an exported fr.LSTM (optional; skipped without ``tf.lite``).

All models are tiny; every SavedModel is served by one subprocess (module fixture ``served``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fancyrnn as fr
from keras_fancyrnn import export as fr_export
from keras_fancyrnn.engine import dispatch

D, U = 3, 4
ATOL = 1e-6  # served vs Keras: the same ops on the same CPU; the observed difference is 0

# Runs in a fresh interpreter (python -I, cwd outside the repository): keras_fancyrnn cannot be
# imported, also not through the editable install's finder, which this finder runs before.
SERVE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoFancyRNN(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "keras_fancyrnn":
                raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
            return None

    sys.meta_path.insert(0, NoFancyRNN())
    import numpy as np
    import tensorflow as tf

    try:
        import keras_fancyrnn  # noqa: F401
        sys.exit("keras_fancyrnn is importable in the serving process")
    except ImportError:
        pass

    report = {"signatures": {}, "variables": {}}
    def serve(job):
        loaded = tf.saved_model.load(job["path"])
        inputs = np.load(job["inputs"])
        out = {}
        if job["kind"] == "serve":  # loaded.serve(x), as a Python client would
            for case in inputs.files:
                ys = tf.nest.flatten(loaded.serve(tf.constant(inputs[case])))
                out.update({f"{case}__output_{i}": y.numpy() for i, y in enumerate(ys)})
        else:  # the serving_default signature with named tensors, as TF Serving would
            fn = loaded.signatures["serving_default"]
            specs = fn.structured_input_signature[1]
            names = job["state_names"]
            (x_name,) = [k for k in specs if k not in names]
            chunks = sorted(inputs.files)
            batch = inputs[chunks[0]].shape[0]
            states = {n: tf.zeros((batch, specs[n].shape[1]), specs[n].dtype) for n in names}
            for case in chunks:
                res = fn(**{x_name: tf.constant(inputs[case])}, **states)
                states = {n: res[n] for n in names}
                out.update({f"{case}__{k}": v.numpy() for k, v in res.items()})
        np.savez(job["result"], **out)
        report["signatures"][job["name"]] = str(loaded.signatures["serving_default"])
        report["variables"][job["name"]] = [v.name for v in loaded.variables]

    report["errors"] = {}
    for job in json.load(open(sys.argv[1])):
        try:
            serve(job)
        except Exception as err:  # reported per job, so one failure does not hide the others
            report["errors"][job["name"]] = f"{type(err).__name__}: {err}"[:3000]
    report["modules"] = sorted(k for k in sys.modules if k.split(".")[0] == "keras_fancyrnn")
    print("REPORT " + json.dumps(report))
    """
)


def serve_without_package(jobs, workdir):
    """Serves every job's SavedModel in one subprocess that cannot import keras_fancyrnn."""
    script = workdir / "serve.py"
    script.write_text(SERVE_SCRIPT)
    spec = workdir / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(spec)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    report = json.loads(line[len("REPORT "):])
    results = {job["name"]: dict(np.load(job["result"])) for job in jobs
               if job["name"] not in report["errors"]}
    return report, results


def results_of(served, name):
    """What the serving process computed for ``name``; fails with its error if serving failed."""
    error = served["info"].get(f"{name}_export_error")
    assert error is None, f"exporting {name!r} failed where cuDNN was eligible: {error}"
    error = served["report"]["errors"].get(name)
    assert error is None, f"serving the {name!r} SavedModel on the CPU failed: {error}"
    return served["results"][name]


def flat(outputs):
    return [np.asarray(y) for y in tf.nest.flatten(outputs)]


# -- models ----------------------------------------------------------------------------------
def zoo_model():
    """Every fr layer (and wrapper), masking, return_state, variable batch and time."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((None, D), name="x")
    x = keras.layers.Masking(0.0)(inp)
    x = fr.SimpleRNN(U, return_sequences=True, bptt_truncate=2)(x)
    x = fr.GRU(U, return_sequences=True, reset_after=False)(x)
    seq, h, c = fr.LSTM(
        U, return_sequences=True, return_state=True, unit_forget_bias=False,
        bias_initializer=fr.initializers.ChronoBias(8, seed=3),
    )(x)
    seq = fr.Bidirectional(fr.GRU(3, return_sequences=True))(seq)
    last = fr.StackedRNN(
        [fr.LSTM(U, return_sequences=True), fr.Bidirectional(fr.SimpleRNN(3), "sum")],
        dropout=0.2, seed=4,
    )(seq)
    y = keras.layers.Dense(2)(last)
    return keras.Model(inp, [y, seq, h, c])


def cudnn_model():
    """fr.LSTM/GRU with use_cudnn=True (raises unless cuDNN is eligible) and "auto"."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((None, D))
    x = keras.layers.Masking(0.0)(inp)
    x = fr.LSTM(U, return_sequences=True, use_cudnn=True)(x)
    x = fr.GRU(U, return_sequences=True)(x)
    x = fr.Bidirectional(fr.LSTM(3, return_sequences=True))(x)
    x = fr.StackedRNN([fr.GRU(3, return_sequences=True), fr.LSTM(3)])(x)
    return keras.Model(inp, keras.layers.Dense(2)(x))


def stateful_model(batch=2):
    keras.utils.set_random_seed(3)
    inp = keras.Input((None, D), batch_size=batch)
    x = fr.LSTM(U, stateful=True, return_sequences=True)(inp)
    x = fr.Bidirectional(fr.SimpleRNN(3, stateful=True, return_sequences=True))(x)
    x = fr.GRU(3, stateful=True)(x)
    return keras.Model(inp, keras.layers.Dense(2)(x))


def fake_gpu(monkeypatch):
    """Makes every device query report a GPU, so cuDNN's eligibility rule says yes on a CPU."""
    for name in ("list_logical_devices", "list_physical_devices"):
        real = getattr(tf.config, name)

        def fake(device_type=None, _real=real):
            if device_type == "GPU":
                return [tf.config.LogicalDevice("/device:GPU:0", "GPU")]
            return _real(device_type)

        monkeypatch.setattr(tf.config, name, fake)


def zoo_inputs(rng):
    a = rng.normal(size=(5, 7, D)).astype("float32")
    a[1, 5:] = 0.0  # right-padded
    a[3, 2:] = 0.0
    a[4, 3] = 0.0  # a masked step in the middle
    b = rng.normal(size=(2, 11, D)).astype("float32")
    b[0, 6:] = 0.0
    return {"a": a, "b": b, "a3_trimmed": a[3:4, :2].copy(), "b0_trimmed": b[0:1, :6].copy()}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Exports the zoo, the cuDNN-forced and the stateful model, serves all in one subprocess."""
    work = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    jobs, keras_out, info = [], {}, {}

    def job(name, kind, inputs, **extra):
        np.savez(work / f"{name}_in.npz", **inputs)
        jobs.append({"name": name, "kind": kind, "path": str(work / name),
                     "inputs": str(work / f"{name}_in.npz"),
                     "result": str(work / f"{name}_out.npz"), **extra})

    zoo = zoo_model()
    xs = zoo_inputs(rng)
    keras_out["zoo"] = {case: flat(zoo(x)) for case, x in xs.items()}
    zoo.export(str(work / "zoo"), format="tf_saved_model", verbose=False)
    job("zoo", "serve", xs)

    # "Trained on a GPU, served on a CPU": everything runs while every device query reports a
    # GPU, so each LSTM/GRU judges cuDNN eligible (checked below) and whatever a layer does with
    # that decision ends up in the exported graph. The reference runs the loop (fr.portable()),
    # as this CPU has no cuDNN kernel.
    x = rng.normal(size=(3, 6, D)).astype("float32")
    x[0, 4:] = 0.0
    with pytest.MonkeyPatch.context() as mp:
        fake_gpu(mp)
        model = cudnn_model()
        with fr.portable():
            keras_out["cudnn"] = {"a": flat(model(x))}
        info["cudnn_eligible"] = [
            (layer.name, dispatch.cudnn_blocker(layer, training=False))
            for layer in fr_export.recurrent_layers(model, stateful_only=False)
        ]
        exports = {
            "cudnn": lambda p: model.export(p, format="tf_saved_model", verbose=False),
            "cudnn_helper": lambda p: fr_export.export_saved_model(model, p),
        }
        for name, export in exports.items():
            try:
                export(str(work / name))
            except Exception as err:  # reported by the cuDNN tests; the other models still run
                info[f"{name}_export_error"] = f"{type(err).__name__}: {err}"[:3000]
            else:
                job(name, "serve", {"a": x})

    model = stateful_model()
    chunks = {f"chunk_{i}": rng.normal(size=(2, t, D)).astype("float32")
              for i, t in enumerate((5, 4, 6))}
    keras_out["stateful"] = {case: flat(model(c)) for case, c in sorted(chunks.items())}
    layers = fr_export.recurrent_layers(model)
    info["stateful_final"] = [np.asarray(v) for layer in layers for v in layer.states]
    names = fr_export.export_saved_model(model, str(work / "stateful"))
    info["stateful_names"] = names
    info["stateful_vars_after_export"] = [np.asarray(v) for layer in layers for v in layer.states]
    job("stateful", "chain", chunks, state_names=names)

    report, results = serve_without_package(jobs, work)
    return {"work": work, "report": report, "results": results, "keras": keras_out,
            "inputs": xs, "info": info}


# -- 1. model.export serves without the package --------------------------------------------------
def test_serving_process_could_not_import_the_package(served):
    assert served["report"]["modules"] == []


@pytest.mark.parametrize("case", ["a", "b"])
def test_export_serves_every_layer_equal_to_keras(served, case):
    results = results_of(served, "zoo")
    for i, expected in enumerate(served["keras"]["zoo"][case]):
        got = results[f"{case}__output_{i}"]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_export_signature_has_free_batch_and_time(served):
    signature = served["report"]["signatures"]["zoo"]
    assert "shape=(None, None, 3)" in signature, signature


@pytest.mark.parametrize("case, row, trimmed", [("a", 3, "a3_trimmed"), ("b", 0, "b0_trimmed")])
def test_exported_masking_ignores_padding(served, case, row, trimmed):
    """A right-padded row serves like the same sequence without the padding (y, h and c)."""
    results = results_of(served, "zoo")
    for i in (0, 2, 3):  # final output, h, c
        np.testing.assert_allclose(results[f"{case}__output_{i}"][row],
                                   results[f"{trimmed}__output_{i}"][0], rtol=0, atol=ATOL)


def test_export_with_a_fixed_batch_signature(tmp_path):
    """TFLite (and some servers) need a static batch size: every layer must trace with one."""
    model = zoo_model()
    x = zoo_inputs(np.random.default_rng(0))["a"]
    spec = keras.InputSpec(shape=(x.shape[0], None, D), dtype="float32")
    model.export(str(tmp_path / "sm"), verbose=False, input_signature=[spec])
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    for expected, got in zip(flat(model(x)), flat(loaded.serve(x)), strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_wrappers_are_exported():
    layers = zoo_model().layers
    assert {"Bidirectional", "StackedRNN"} <= {type(layer).__name__ for layer in layers}


# -- 2. portability: no cuDNN-only op, even where cuDNN was eligible ------------------------------
def saved_model_ops(path):
    """(op types, device strings, library function names) of a SavedModel's graphs."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    ops, devices, functions = set(), set(), set()
    for graph in proto.meta_graphs:
        nodes = list(graph.graph_def.node)
        for function in graph.graph_def.library.function:
            functions.add(function.signature.name)
            nodes += list(function.node_def)
        ops |= {n.op for n in nodes}
        devices |= {n.device for n in nodes}
    return ops, devices, functions


def test_cudnn_was_eligible_when_the_model_ran(served):
    decisions = served["info"]["cudnn_eligible"]
    assert len(decisions) >= 2 and all(d is None for _, d in decisions), decisions


@pytest.mark.parametrize("name", ["cudnn", "cudnn_helper", "zoo", "stateful"])
def test_export_contains_only_cpu_ops(served, name):
    """``cudnn``: ``model.export`` where every LSTM/GRU judged cuDNN eligible (tf.saved_model.save
    retraces in its save context, where the layers take the loop); ``cudnn_helper``: the same
    model through ``fr.export.export_saved_model`` (which traces under ``fr.portable()``)."""
    from tensorflow.python.framework import kernels

    results_of(served, name)  # fails (or xfails) if the export or the serving failed

    ops, devices, functions = saved_model_ops(served["work"] / name)
    # the engine's loop, not a fused kernel (stateless where the weights are read before it)
    assert ops & {"While", "StatelessWhile"}
    assert not [op for op in ops if "cudnn" in op.lower()]
    assert not [op for op in ops if op.startswith("KerasFancyrnn")]  # serves without our kernels
    assert not [d for d in devices if "GPU" in d.upper()]
    no_cpu_kernel = []
    for op in ops - functions:  # a node may call a library function by its name
        devices_with_kernel = {k.device_type for k in
                               kernels.get_registered_kernels_for_op(op).kernel}
        if not devices_with_kernel & {"CPU", "DEFAULT"}:
            no_cpu_kernel.append(op)
    assert not no_cpu_kernel


@pytest.mark.parametrize("name", ["cudnn", "cudnn_helper"])
def test_cudnn_eligible_export_serves_on_cpu(served, name):
    (expected,) = served["keras"]["cudnn"]["a"]
    np.testing.assert_allclose(results_of(served, name)["a__output_0"], expected, rtol=0,
                               atol=ATOL)


# -- 5. stateful layers: explicit state inputs and outputs ---------------------------------------
def test_stateful_export_carries_state_explicitly(served):
    """Serving chunk after chunk, feeding back the returned states, equals the stateful Keras
    model run on the same chunks; the last states equal the layers' state variables."""
    results, names = results_of(served, "stateful"), served["info"]["stateful_names"]
    for case, (expected,) in served["keras"]["stateful"].items():
        np.testing.assert_allclose(results[f"{case}__output_0"], expected, rtol=0, atol=ATOL)
    for name, state in zip(names, served["info"]["stateful_final"]):
        np.testing.assert_allclose(results[f"chunk_2__{name}"], state, rtol=0, atol=ATOL)


def test_stateful_export_names_every_state_and_holds_none(served):
    names = served["info"]["stateful_names"]
    expected = {"lstm", "gru", "forward", "backward"}
    assert len(names) == 5 and len(set(names)) == len(names)
    assert all(any(key in n for n in names) for key in expected), names
    assert not [v for v in served["report"]["variables"]["stateful"] if "rnn_state" in v]
    # exporting neither read nor reset the Keras model's own state
    for before, after in zip(served["info"]["stateful_final"],
                             served["info"]["stateful_vars_after_export"]):
        np.testing.assert_array_equal(before, after)


def test_stateful_export_takes_any_batch(tmp_path):
    model = stateful_model(batch=2)
    names = fr_export.export_saved_model(model, str(tmp_path / "sm"))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    x = np.random.default_rng(5).normal(size=(5, 4, D)).astype("float32")
    sizes = {n: loaded.signatures["serving_default"].structured_input_signature[1][n].shape[1]
             for n in names}
    zeros = {n: tf.zeros((5, s)) for n, s in sizes.items()}
    out = loaded.serve(x, zeros)
    again = loaded.serve(x, zeros)  # nothing carried over between calls
    np.testing.assert_array_equal(out["output_0"].numpy(), again["output_0"].numpy())
    keras_model = stateful_model(batch=5)
    keras_model.set_weights(model.get_weights())
    np.testing.assert_allclose(out["output_0"].numpy(), np.asarray(keras_model(x)), rtol=0,
                               atol=ATOL)


def test_stateful_export_starts_from_zero_states_when_they_are_omitted(tmp_path):
    """``serve(x)`` without the state dict equals ``serve(x, zeros)`` and the Keras model run from
    zero states; the signatures still take the states."""
    model = stateful_model(batch=2)
    names = fr_export.export_saved_model(model, str(tmp_path / "sm"))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    specs = loaded.signatures["serving_default"].structured_input_signature[1]
    assert set(names) < set(specs)
    x = np.random.default_rng(8).normal(size=(3, 4, D)).astype("float32")
    out = loaded.serve(x)
    explicit = loaded.serve(x, {n: tf.zeros((3, specs[n].shape[1])) for n in names})
    assert set(out) == set(explicit) == {"output_0", *names}
    for key in out:
        np.testing.assert_array_equal(out[key].numpy(), explicit[key].numpy())
    keras_model = stateful_model(batch=3)  # fresh: its states start at zero
    keras_model.set_weights(model.get_weights())
    np.testing.assert_allclose(out["output_0"].numpy(), np.asarray(keras_model(x)), rtol=0,
                               atol=ATOL)


def test_stateful_export_of_keras_own_layers(tmp_path):
    """Keras's own stateful LSTM and GRU get explicit states too: serving chunk after chunk,
    feeding back the returned states, equals the stateful Keras model run on the same chunks
    (from zero states: the export neither reads nor writes the model's state variables)."""
    keras.utils.set_random_seed(11)
    inp = keras.Input((None, D), batch_size=2)
    x = keras.layers.LSTM(U, stateful=True, return_sequences=True)(inp)
    model = keras.Model(inp, keras.layers.GRU(3, stateful=True)(x))
    names = fr_export.export_saved_model(model, str(tmp_path / "sm"))
    assert len(names) == 3
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    specs = loaded.signatures["serving_default"].structured_input_signature[1]
    state = {n: tf.zeros((2, specs[n].shape[1])) for n in names}
    x = np.random.default_rng(11).normal(size=(2, 7, D)).astype("float32")
    for chunk in (x[:, :3], x[:, 3:]):
        out = loaded.serve(chunk, state)
        state = {n: out[n] for n in names}
        np.testing.assert_allclose(out["output_0"].numpy(), np.asarray(model(chunk)), rtol=0,
                                   atol=ATOL)


def test_streaming_export_of_a_stateless_model(tmp_path):
    """state_layers="all": chunk by chunk equals the whole sequence at once."""
    keras.utils.set_random_seed(6)
    inp = keras.Input((None, D))
    x = fr.SimpleRNN(U, return_sequences=True)(inp)
    x = fr.GRU(U, return_sequences=True)(x)
    model = keras.Model(inp, fr.LSTM(U, return_sequences=True)(x))
    names = fr_export.export_saved_model(model, str(tmp_path / "sm"), state_layers="all")
    assert len(names) == 4
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    x = np.random.default_rng(6).normal(size=(2, 9, D)).astype("float32")
    state = {n: tf.zeros((2, U)) for n in names}
    pieces = []
    for chunk in (x[:, :4], x[:, 4:5], x[:, 5:]):
        out = loaded.serve(chunk, state)
        state = {n: out[n] for n in names}
        pieces.append(out["output_0"].numpy())
    np.testing.assert_allclose(np.concatenate(pieces, 1), np.asarray(model(x)), rtol=0,
                               atol=ATOL)


def test_export_saved_model_without_state_layers_is_model_export(tmp_path):
    keras.utils.set_random_seed(7)
    inp = keras.Input((None, D))
    model = keras.Model(inp, fr.GRU(U)(inp))
    assert fr.export_saved_model is fr_export.export_saved_model
    assert fr.export_saved_model(model, str(tmp_path / "sm")) == []
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    x = np.ones((2, 3, D), "float32")
    np.testing.assert_allclose(loaded.serve(x).numpy(), np.asarray(model(x)), rtol=0, atol=ATOL)


def test_export_saved_model_errors(tmp_path):
    inp = keras.Input((None, D))
    model = keras.Model(inp, fr.GRU(U)(inp))
    with pytest.raises(ValueError, match="state_layers must be 'stateful', 'all'"):
        fr_export.export_saved_model(model, str(tmp_path / "a"), state_layers="some")
    with pytest.raises(ValueError, match="recurrent layers .* of the model"):
        fr_export.export_saved_model(model, str(tmp_path / "b"), state_layers=[fr.GRU(U)])
    shared = fr.GRU(D, return_sequences=True)  # maps D features to D: callable twice
    model = keras.Model(inp, shared(shared(inp)))
    with pytest.raises(ValueError, match="called more than once"):
        fr_export.export_saved_model(model, str(tmp_path / "c"), state_layers="all")


# -- 3. .keras round trip ------------------------------------------------------------------------
def trainable_model(dropout=0.0, lean=False):
    """Every layer, wrapper, ChronoBias and (if present) ClippingOptimizer, tiny and compiled;
    ``lean``: fewer layers (dropout in a cell and between the layers of a StackedRNN)."""
    keras.utils.set_random_seed(8)
    inp = keras.Input((6, D))
    x = inp
    if not lean:
        x = fr.SimpleRNN(U, return_sequences=True, dropout=dropout, seed=1)(x)
    x = fr.LSTM(U, return_sequences=True, unit_forget_bias=False, dropout=dropout,
                recurrent_dropout=dropout, seed=2,
                bias_initializer=fr.initializers.ChronoBias(6, seed=3))(x)
    if not lean:
        x = fr.Bidirectional(fr.GRU(3, return_sequences=True, dropout=dropout, seed=4))(x)
    x = fr.StackedRNN([fr.LSTM(3, return_sequences=True, seed=5), fr.GRU(3, seed=6)],
                      dropout=dropout, seed=7)(x)
    model = keras.Model(inp, keras.layers.Dense(1)(x))
    optimizer = fr.ClippingOptimizer(keras.optimizers.Adam(1e-2), method="auto", history_size=8)
    model.compile(optimizer, "mse")
    return model


def toy_data(n=8):
    rng = np.random.default_rng(9)
    return rng.normal(size=(n, 6, D)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def json_config(model):
    return json.loads(json.dumps(model.get_config()))


def optimizer_state(model):
    return [np.asarray(v) for v in model.optimizer.variables]


def test_keras_file_round_trip_is_bit_exact(tmp_path):
    x, y = toy_data()
    model = trainable_model()
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)

    assert json_config(loaded) == json_config(model)  # as stored (tuples become lists)
    assert type(loaded.optimizer) is type(model.optimizer)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # By position: a wrapper's inner variables lose the wrapper's name from their paths when
    # rebuilt by load_model (so do keras.layers.Bidirectional's), and the optimizer's slot names
    # with them; the values are what matters.
    before, after = optimizer_state(model), optimizer_state(loaded)
    assert len(before) == len(after) > 10
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    # training goes on identically: the optimizer's (and clipping's) state came back whole
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_chrono_bias_round_trips():
    init = fr.initializers.ChronoBias(8, seed=3)
    again = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert type(again) is type(init) and again.get_config() == init.get_config()
    np.testing.assert_array_equal(np.asarray(init((16,))), np.asarray(again((16,))))


# -- 4. resume from a checkpoint -----------------------------------------------------------------
def seed_states(model):
    return [np.asarray(v) for v in model.variables if "seed_generator_state" in v.path]


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt


def resumed_and_uninterrupted(tmp_path, dropout):
    x, y = toy_data()
    fit = dict(batch_size=4, epochs=3, shuffle=False, verbose=0)
    model = trainable_model(dropout, lean=True)
    model.fit(x, y, **fit)
    uninterrupted = model.get_weights(), seed_states(model)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(KeyboardInterrupt):
        trainable_model(dropout, lean=True).fit(x, y, callbacks=[backup, _Interrupt()], **fit)
    model = trainable_model(dropout, lean=True)  # a fresh process would build it the same way
    model.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))], **fit)
    assert int(model.optimizer.iterations) == 6
    return uninterrupted, (model.get_weights(), seed_states(model))


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_resume_is_bit_identical(tmp_path, dropout):
    """BackupAndRestore, interrupted after epoch 2 of 3, then resumed by a fresh model: the
    weights equal the uninterrupted run's bit for bit (clipping optimizer state included)."""
    (weights, seeds), (resumed_weights, resumed_seeds) = resumed_and_uninterrupted(tmp_path,
                                                                                   dropout)
    for a, b in zip(seeds, resumed_seeds, strict=True):  # the dropout RNG state resumed too
        np.testing.assert_array_equal(a, b)
    for a, b in zip(weights, resumed_weights, strict=True):
        np.testing.assert_array_equal(a, b)


# -- 6. TFLite (optional) ------------------------------------------------------------------------
def test_tflite_conversion_of_exported_lstm(tmp_path):
    """Works with TFLite builtin ops when the batch size is fixed in the export's signature
    (the time axis stays free); a free batch size needs Select TF ops (Flex)."""
    if not hasattr(tf, "lite") or not hasattr(tf.lite, "Interpreter"):
        pytest.skip("tf.lite is not available in this TensorFlow")
    keras.utils.set_random_seed(10)
    inp = keras.Input((None, D))
    x = keras.layers.Masking(0.0)(inp)
    model = keras.Model(inp, keras.layers.Dense(2)(fr.LSTM(U, return_sequences=True)(x)))
    model.export(str(tmp_path / "sm"), verbose=False,
                 input_signature=[keras.InputSpec(shape=(2, None, D), dtype="float32")])
    blob = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm")).convert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_content=blob)
    (detail,) = interpreter.get_input_details()
    rng = np.random.default_rng(10)
    for steps in (5, 9):
        x = rng.normal(size=(2, steps, D)).astype("float32")
        x[1, 3:] = 0.0
        interpreter.resize_tensor_input(detail["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        np.testing.assert_allclose(got, np.asarray(model(x)), rtol=0, atol=1e-5)


JAX_EXPORT = textwrap.dedent("""
    import sys
    import numpy as np, keras
    import keras_fancyrnn as fr
    x = np.load(sys.argv[2])
    model = keras.Sequential([keras.Input((None, 3)), keras.layers.Masking(0.0),
                              fr.LSTM(4, return_sequences=True), fr.GRU(2)])
    model.set_weights(list(np.load(sys.argv[3]).values()))
    np.save(sys.argv[4], keras.ops.convert_to_numpy(model(x)))
    model.export(sys.argv[1], format="tf_saved_model", verbose=False)
""")


def test_model_export_on_the_jax_backend_serves_like_the_model(tmp_path, rng):
    """On JAX, Keras exports through jax2tf: the SavedModel of fr layers (the keras.ops loop)
    serves, here on TensorFlow, what the JAX model computed, padding masked; and equals the same
    model on TensorFlow."""
    x = rng.normal(size=(2, 6, 3)).astype("float32")
    x[0, 4:] = 0.0  # padding, masked
    model = keras.Sequential([keras.Input((None, 3)), keras.layers.Masking(0.0),
                              fr.LSTM(4, return_sequences=True), fr.GRU(2)])
    weights = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "w.npz", **weights)
    script = tmp_path / "export.py"
    script.write_text(JAX_EXPORT)
    env = {**os.environ, "KERAS_BACKEND": "jax", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "saved"),
                           str(tmp_path / "x.npy"), str(tmp_path / "w.npz"),
                           str(tmp_path / "y.npy")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_jax = np.load(tmp_path / "y.npy")
    loaded = tf.saved_model.load(str(tmp_path / "saved"))  # held: serve needs its variables
    served = loaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(served, on_jax, rtol=0, atol=1e-6)
    np.testing.assert_allclose(on_jax, model(x).numpy(), rtol=1e-5, atol=1e-6)
