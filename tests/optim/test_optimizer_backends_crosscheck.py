"""ClippingOptimizer across backends and devices, each check in a subprocess: this backend's step
(the JAX trainer's jitted ``stateless_apply``, torch's ``apply``) against the TensorFlow backend's
on the same weights and gradients; Keras's DataParallel on two JAX CPU devices against one device
and numpy; the ``optim`` subpackage imported and stepping without TensorFlow. This module does
not import TensorFlow (the TensorFlow step runs in its own process, if TensorFlow is installed).

Tolerance: one float32 step rounds each value a few times, each by at most 2^-24 relative, so
1e-5 relative (1e-6 absolute near 0) bounds it with a margin; a few steps stay within it.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from clip_reference import (
    LINEAR_B0,
    LINEAR_W0,
    NumpyClipper,
    gradient_steps,
    linear_clean,
    linear_gradient,
    np_clip_global,
    np_fit_linear,
)
from keras import ops

import keras_fancyrnn as fr

pytestmark = pytest.mark.all_backends

BACKEND = keras.backend.backend()
ROOT = Path(__file__).resolve().parents[2]
STEP = {"rtol": 1e-5, "atol": 1e-6}  # float32 steps (module docstring)


def tensor(a):
    return ops.convert_to_tensor(np.asarray(a, np.float32))


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


# --------------------------------------------------------------------------------------------------
# this backend's step against TensorFlow's, computed in a subprocess
# --------------------------------------------------------------------------------------------------

_TF_STEP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import numpy as np, keras
    import keras_fancyrnn as fr

    spec = json.loads(sys.argv[1])
    data = np.load(sys.argv[2])
    out = {}
    for name, kwargs in spec.items():
        variables = [keras.Variable(data["w0"]), keras.Variable(data["b0"])]
        opt = fr.ClippingOptimizer(keras.optimizers.Adam(0.1), **kwargs)
        for step in range(int(data["steps"])):
            opt.apply([data[f"g{step}_kernel"], data[f"g{step}_bias"]], variables)
        for i, v in enumerate(variables + opt.variables):
            out[f"{name}/{i}"] = np.asarray(v.numpy(), np.float64)
    np.savez(sys.argv[3], **out)
    """
)

STEP_CASES = {
    "global_norm": {"threshold": 2.0},
    "norm": {"method": "norm", "threshold": 2.0},
    "value": {"method": "value", "threshold": 1.0},
    "adaptive": {"method": "adaptive", "threshold": 0.3},
    "auto": {"method": "auto", "percentile": 50, "history_size": 2},
}


@pytest.fixture(scope="module")
def tensorflow_steps(tmp_path_factory):
    """Each case's model and optimizer variables after the four steps of ``_gradient_steps``
    on the TensorFlow backend, in a subprocess."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed: no TensorFlow step to compare with")
    w0, steps = gradient_steps()
    arrays = {"w0": w0[0], "b0": w0[1], "steps": len(steps)}
    for i, (gk, gb) in enumerate(steps):
        arrays[f"g{i}_kernel"], arrays[f"g{i}_bias"] = gk, gb
    tmp = tmp_path_factory.mktemp("tf_step")
    np.savez(tmp / "in.npz", **arrays)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", _TF_STEP_SCRIPT, json.dumps(STEP_CASES), str(tmp / "in.npz"),
         str(tmp / "out.npz")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(tmp / "out.npz"))


def _this_backends_steps(opt, variables, steps):
    """The steps as this backend's trainer takes them: JAX's jitted stateless_apply, torch's
    apply (in torch.no_grad, as its trainer calls it), TensorFlow's apply."""
    if BACKEND == "jax":
        import jax

        opt.build(variables)
        step = jax.jit(opt.stateless_apply)
        model_values = [v.value for v in variables]
        opt_values = [v.value for v in opt.variables]
        for grads in steps:
            model_values, opt_values = step(opt_values, [tensor(g) for g in grads], model_values)
        return [numpy(v) for v in model_values + opt_values]
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            for grads in steps:
                opt.apply([tensor(g) for g in grads], variables)
    else:
        for grads in steps:
            opt.apply([tensor(g) for g in grads], variables)
    return [numpy(v.value) for v in variables + opt.variables]


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_step_equals_the_tensorflow_step(case, request):
    if BACKEND == "tensorflow":
        pytest.skip("the reference is the TensorFlow backend's step itself")
    reference = request.getfixturevalue("tensorflow_steps")
    w0, steps = gradient_steps()
    variables = [keras.Variable(w) for w in w0]
    opt = fr.ClippingOptimizer(keras.optimizers.Adam(0.1), **STEP_CASES[case])
    got = _this_backends_steps(opt, variables, steps)
    assert len(got) == len([k for k in reference if k.startswith(case + "/")])
    for i, value in enumerate(got):
        np.testing.assert_allclose(
            np.asarray(value, np.float64), reference[f"{case}/{i}"], **STEP, err_msg=f"{i}")
    tracked = variables + opt.variables
    counts = [next(int(got[i]) for i, v in enumerate(tracked) if v is counter)
              for counter in (opt.applied_steps, opt.skipped_steps, opt.iterations)]
    assert counts == [3, 1, 3]


# --------------------------------------------------------------------------------------------------
# subprocesses: Keras's DataParallel on two JAX CPU devices; the package without TensorFlow
# --------------------------------------------------------------------------------------------------


def _run(script, *args, backend):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT"):])


_DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # before jax is imported
    import numpy as np, jax, keras
    import keras_fancyrnn as fr

    data = np.load(sys.argv[1])
    x, y = data["x"], data["y"]

    def train(distribution):
        keras.distribution.set_distribution(distribution)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.set_weights([data["w0"], data["b0"]])
        opt = fr.ClippingOptimizer(keras.optimizers.SGD(0.1), threshold=float(data["tau"]))
        model.compile(opt, "mse")
        model.fit(x, y, batch_size=len(x) // 3, epochs=1, shuffle=False, verbose=0,
                  callbacks=[fr.ClippingStats()])
        devices = len(model.layers[0].kernel.value.sharding.device_set)
        keras.distribution.set_distribution(None)
        return {"kernel": model.layers[0].kernel.numpy().tolist(),
                "bias": model.layers[0].bias.numpy().tolist(), "stats": opt.stats(),
                "variable_devices": devices}

    out = {"devices": len(jax.devices()),
           "parallel": train(keras.distribution.DataParallel(devices=jax.devices())),
           "single": train(None)}
    print("RESULT" + json.dumps(out))
    """
)


def test_data_parallel_on_two_jax_devices_clips_the_global_gradient(tmp_path):
    """Three steps of fit with DataParallel over two CPU devices equal one device on the same
    batches, and numpy's clipping of the whole batch's gradient; clipping each device's half and
    averaging (per-device clipping) would give other weights."""
    if BACKEND != "jax":
        pytest.skip("a JAX subprocess: run once, in the JAX leg of the backend matrix")
    x, y = linear_clean()
    tau, lr, batch = 1.0, 0.1, 8
    np.savez(tmp_path / "in.npz", x=x, y=y, w0=LINEAR_W0, b0=LINEAR_B0, tau=tau)
    out = _run(_DATA_PARALLEL_SCRIPT, str(tmp_path / "in.npz"), backend="jax")
    assert out["devices"] == 2 and out["parallel"]["variable_devices"] == 2
    assert out["single"]["variable_devices"] == 1

    clipper = NumpyClipper("global_norm", tau)
    w, b, ref = np_fit_linear(x, y, batch, 1, lr, clipper, LINEAR_W0, LINEAR_B0)
    per_device_w, per_device_b = LINEAR_W0.astype(np.float64), LINEAR_B0.astype(np.float64)
    for i in range(0, len(x), batch):
        halves = [linear_gradient(x[j : j + batch // 2].astype(np.float64),
                                  y[j : j + batch // 2].astype(np.float64),
                                  per_device_w, per_device_b) for j in (i, i + batch // 2)]
        clipped = [np_clip_global(h, tau) for h in halves]
        per_device_w = per_device_w - lr * (clipped[0][0] + clipped[1][0]) / 2
        per_device_b = per_device_b - lr * (clipped[0][1] + clipped[1][1]) / 2
    assert ref["clipped"] == ref["applied"] == 3 and min(ref["norms"]) > 1.5 * tau
    assert np.max(np.abs(per_device_w - w)) > 1e-2  # the two rules differ on these batches

    for run in ("parallel", "single"):
        np.testing.assert_allclose(out[run]["kernel"], w, **STEP, err_msg=run)
        np.testing.assert_allclose(out[run]["bias"], b, **STEP, err_msg=run)
        stats = out[run]["stats"]
        assert stats["applied_steps"] == stats["clipped_steps"] == 3
        np.testing.assert_allclose(stats["grad_norm"], ref["norms"][-1], rtol=1e-5)
        np.testing.assert_allclose(stats["clipped_grad_norm"], tau, rtol=1e-5)
    np.testing.assert_allclose(out["parallel"]["kernel"], out["single"]["kernel"], **STEP)


_WITHOUT_TENSORFLOW_SCRIPT = textwrap.dedent(
    """
    import json, sys, types

    sys.modules["tensorflow"] = None  # as if not installed: importing it raises ImportError
    import numpy as np, keras

    # the optim subpackage alone: keras_fancyrnn's own __init__ imports the layers too
    package = types.ModuleType("keras_fancyrnn")
    package.__path__ = [sys.argv[1]]
    sys.modules["keras_fancyrnn"] = package
    from keras_fancyrnn.optim import ClippingOptimizer, ClippingStats  # noqa: F401

    w = keras.Variable(np.array([1.0, 2.0], np.float32))
    opt = ClippingOptimizer(keras.optimizers.SGD(0.1))
    opt.apply([keras.ops.convert_to_tensor(np.array([30.0, 40.0], np.float32))], [w])
    out = {"w": keras.ops.convert_to_numpy(w.value).tolist(),
           "tensorflow": sys.modules.get("tensorflow") is not None}
    print("RESULT" + json.dumps(out))
    """
)


def test_optim_imports_and_steps_without_tensorflow():
    if BACKEND == "tensorflow":
        pytest.skip("the TensorFlow backend needs TensorFlow")
    out = _run(_WITHOUT_TENSORFLOW_SCRIPT, str(ROOT / "keras_fancyrnn"), backend=BACKEND)
    assert not out["tensorflow"]
    np.testing.assert_allclose(out["w"], [1.0 - 0.1 * 0.6, 2.0 - 0.1 * 0.8], **STEP)  # norm 50 -> 1
