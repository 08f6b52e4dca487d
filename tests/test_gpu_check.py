"""benchmarks/gpu_check.py, the check for a machine with a GPU and no TensorFlow, runs here end
to end on the CPU (``--allow_cpu``) on a small test selection, and without ``--allow_cpu`` it
refuses a machine whose backends see no GPU, saying so."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SMALL = ["--tests=tests/layers/test_initializers.py", "--nospeed"]
TINY_SPEED = ["--tests=tests/layers/test_initializers.py",
              "--speed_args=--cells=lstm,--modes=predict,--sizes=4x5,--hidden=4,--input_dim=3,"
              "--repeats=1,--steps=1"]


def _check(tmp_path, *args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), f"--out={tmp_path}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_without_a_gpu_it_checks_nothing_and_says_so(tmp_path):
    proc = _check(tmp_path, *SMALL)
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "Result: NOT passed" in summary
    for backend in ("jax", "torch"):
        assert f"No GPU visible to {backend}: not checked." in summary


@pytest.mark.parametrize("select,status,verdict", [("", 0, "passed"),
                                                   ("not_a_test_name", 1, "FAILED (exit 5)")])
def test_on_the_cpu_it_runs_the_tests_of_each_backend(tmp_path, select, status, verdict):
    """The passing run also times the backends (tiny sizes): the summary holds each table."""
    args = TINY_SPEED if status == 0 else SMALL
    proc = _check(tmp_path, *args, "--allow_cpu", f"--select={select}")
    assert proc.returncode == status, proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for backend in ("jax", "torch"):
        assert f"## {backend}" in summary
        assert (tmp_path / f"{backend}_tests.log").exists()
    assert summary.count(f"Tests (`pytest -m all_backends`, full float32 precision): "
                         f"{verdict}") == 2
    if status == 0:
        assert "4 passed" in (tmp_path / "jax_tests.log").read_text()
        for backend, native in (("jax", "flax"), ("torch", "torch.nn")):
            table = (tmp_path / f"{backend}_speed.md").read_text()
            assert f"| {backend} | lstm | predict | 4 | 5 |" in table
            assert f"fr/{native}" in table and table in summary
