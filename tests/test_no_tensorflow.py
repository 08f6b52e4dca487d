"""The package without TensorFlow: in a subprocess on JAX or PyTorch where ``import tensorflow``
fails (its meta-path finder, replaced by a ``sitecustomize`` on ``PYTHONPATH``), ``import
keras_fancyrnn`` works, fr.LSTM's outputs and gradients equal keras.layers.LSTM's with copied
weights, and the TensorFlow-only features raise an ImportError that says how to install it."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest

pytestmark = pytest.mark.all_backends

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = '''
import importlib.machinery
import sys


class _PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    """The path finder, except that no ``tensorflow`` module is found: ``import tensorflow``
    raises ModuleNotFoundError and ``importlib.util.find_spec`` returns None, as where TensorFlow
    is not installed."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_PathFinderWithoutTensorFlow if finder is importlib.machinery.PathFinder
                    else finder for finder in sys.meta_path]
'''

SCRIPT = '''
import sys

import keras
import numpy as np
from backend_grad import layer_grads
from tolerance import assert_close, rounding_chain

import keras_fancyrnn as fr

x = np.random.default_rng(0).normal(size=(3, 6, 4)).astype("float32")
ref, ours = keras.layers.LSTM(5, return_sequences=True), fr.LSTM(5, return_sequences=True)
ref.build(x.shape), ours.build(x.shape)
ours.set_weights(ref.get_weights())
(out_r, grad_r), (out_o, grad_o) = layer_grads(ref, [x]), layer_grads(ours, [x])
for a, b in zip(out_o + grad_o, out_r + grad_r):
    assert_close(a, b, rounding_chain(6, 3, 4, 5))
assert len(grad_o) == 4 and all(np.abs(g).max() > 0 for g in grad_o)

model = keras.Sequential([keras.Input((6, 4)), fr.LSTM(5)])
features = [
    ("keras_fancyrnn.export_saved_model", lambda: fr.export_saved_model(model, "unused")),
    ("keras_fancyrnn.datasets.load_numpy",
     lambda: fr.datasets.load_numpy("adding_problem", 50, "test", n=2, data_dir="unused")),
]
for feature, use in features:
    try:
        use()
    except ImportError as err:
        message = str(err)
        assert feature in message and "pip install keras_fancyrnn[cpu]" in message, message
    else:
        raise AssertionError(f"{feature} ran without TensorFlow")
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
try:
    import tensorflow  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("the blocker let TensorFlow import")
print("ok", keras.config.backend())
'''


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_package_works_without_tensorflow(backend, tmp_path):
    if keras.config.backend() not in ("tensorflow", backend):
        pytest.skip(f"run in the {backend} and tensorflow legs of the matrix")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT))
    path = os.pathsep.join([str(tmp_path), str(ROOT), str(ROOT / "tests")])
    proc = subprocess.run([sys.executable, str(tmp_path / "script.py")], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(f"ok {backend}")
