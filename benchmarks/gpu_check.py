"""The GPU check: on a machine with an NVIDIA GPU and JAX or PyTorch (CUDA builds), with or
without TensorFlow and without a network, runs on the GPU

1. the backend-independent tests (``pytest -m all_backends``: the layers against
   ``keras.layers``, the gradient monitor against hand-unrolled cells, ``ClippingOptimizer``),
   under ``KERAS_BACKEND=jax`` and ``KERAS_BACKEND=torch``, float32 products at full precision
   (``JAX_DEFAULT_MATMUL_PRECISION=highest``, TF32 off in torch), since the references are;
2. the speed comparison ``benchmarks/backend_speed.py`` (fr against ``keras.layers``,
   ``torch.nn`` and flax where installed), at the backends' default precision;

and writes ``summary.md`` (devices, versions, test results, the speed tables) to ``--out``.

Keras and its small dependencies can travel as wheels: where ``import keras`` fails and the
folder ``--wheels`` holds ``*.whl`` files, they are installed into a temporary folder first
(``pip install --no-index --no-deps --target``). Make them, on a machine with a network, for the
GPU machine's Python (3.12 here):

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
        keras==3.15.1 namex==0.1.0 optree==0.20.0

Without a GPU the check stops, saying so (``--allow_cpu`` runs it on the CPU, for trying it).
Exit status: 0 when every test passed on every backend that ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

flags.DEFINE_string("out", "gpu_check", "Folder for summary.md and the logs.")
flags.DEFINE_list("backends", ["jax", "torch"], "Keras backends to check.")
flags.DEFINE_list("tests", ["tests"], "Test paths, run with -m all_backends.")
flags.DEFINE_string("select", "", "An extra pytest -k expression (empty: all).")
flags.DEFINE_bool("speed", True, "Run benchmarks/backend_speed.py after the tests.")
flags.DEFINE_list("speed_args", [], "Extra flags for backend_speed.py (comma-separated).")
flags.DEFINE_string("wheels", ".whl", "Folder of wheels to install where keras is missing.")
flags.DEFINE_bool("allow_cpu", False, "Run where the backend sees no GPU (for trying it).")
flags.DEFINE_integer("timeout", 1500, "Seconds per test or benchmark run.")
FLAGS = flags.FLAGS

_PROBE = """
import json, os, platform, keras
backend = keras.config.backend()
info = {"backend": backend, "keras": keras.__version__, "python": platform.python_version()}
if backend == "jax":
    import jax
    info["version"] = jax.__version__
    info["devices"] = [f"{d.platform}:{getattr(d, 'device_kind', d)}" for d in jax.devices()]
    info["gpu"] = any(d.platform == "gpu" for d in jax.devices())
else:
    import torch
    info["version"] = torch.__version__
    info["gpu"] = torch.cuda.is_available()
    info["devices"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                       or ["cpu"])
print(json.dumps(info))
"""

# torch: TF32 off for float32 products and convolutions, before any test imports torch
_TORCH_FULL_PRECISION = ("import torch\ntorch.backends.cuda.matmul.allow_tf32 = False\n"
                         "torch.backends.cudnn.allow_tf32 = False\n")


def _environment(work: Path) -> dict:
    """The children's environment: the repository and the carried wheels on the path."""
    paths = [str(ROOT)]
    try:
        import keras  # noqa: F401
    except ImportError:
        wheels = sorted((ROOT / FLAGS.wheels).glob("*.whl"))
        if not wheels:
            raise SystemExit(f"keras is not installed and {FLAGS.wheels}/ holds no wheels "
                             f"(see this script's docstring)") from None
        site = work / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--target", str(site), *map(str, wheels)], check=True)
        paths.insert(0, str(site))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(command: list[str], env: dict, log: Path) -> tuple[int, str]:
    """Runs ``command`` from the repository root, its output to ``log``; ``(status, tail)``."""
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=FLAGS.timeout)
        status, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        status = 124
        output = f"{err.stdout or ''}{err.stderr or ''}\n(timed out after {FLAGS.timeout} s)"
    log.write_text(output)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return status, "\n".join(lines[-3:])


def _check_backend(backend: str, env: dict, out: Path) -> tuple[bool, list[str]]:
    """Tests and speed on one backend: ``(passed, summary lines)``."""
    env = {**env, "KERAS_BACKEND": backend}
    status, tail = _run([sys.executable, "-c", _PROBE], env, out / f"{backend}_probe.log")
    if status != 0:
        return False, [f"## {backend}", "", f"Could not start: `{tail}`", ""]
    info = json.loads(tail.splitlines()[-1])
    lines = [f"## {backend}", "", f"Keras {info['keras']}, {backend} {info['version']}, "
             f"Python {info['python']}; devices: {', '.join(info['devices'])}", ""]
    if not info["gpu"] and not FLAGS.allow_cpu:
        return False, lines + [f"No GPU visible to {backend}: not checked.", ""]
    precise = {**env, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    pytest_args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "all_backends"]
    if FLAGS.select:
        pytest_args += ["-k", FLAGS.select]
    if backend == "torch":  # TF32 off in the test process, before the tests import torch
        command = [sys.executable, "-c", _TORCH_FULL_PRECISION
                   + "import sys, pytest\nsys.exit(pytest.main(sys.argv[1:]))",
                   *pytest_args[2:], *FLAGS.tests]
    else:
        command = [sys.executable, *pytest_args, *FLAGS.tests]
    status, tail = _run(command, precise, out / f"{backend}_tests.log")
    passed = status == 0
    lines += ["Tests (`pytest -m all_backends`, full float32 precision): "
              + ("passed" if passed else f"FAILED (exit {status})"), "", "```", tail, "```", ""]
    if FLAGS.speed:
        table = out / f"{backend}_speed.md"
        status, tail = _run([sys.executable, str(ROOT / "benchmarks" / "backend_speed.py"),
                             f"--out={table}", *FLAGS.speed_args],
                            env, out / f"{backend}_speed.log")
        lines += (["Speed (`benchmarks/backend_speed.py`):", "", table.read_text(), ""]
                  if status == 0 and table.exists()
                  else [f"Speed run failed (exit {status}):", "", "```", tail, "```", ""])
        passed = passed and status == 0
    return passed, lines


def main(argv):
    del argv
    out = Path(FLAGS.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        env = _environment(Path(work))
        results = [_check_backend(b, env, out) for b in FLAGS.backends]
    ok = all(passed for passed, _ in results)
    summary = ["# GPU check", "", f"Result: {'passed' if ok else 'NOT passed'}", ""]
    for _, lines in results:
        summary += lines
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    app.run(main)
