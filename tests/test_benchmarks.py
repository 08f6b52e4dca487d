"""The benchmark scripts run (tiny sizes, in a subprocess, as the README invokes them) and write
the tables the README quotes. Their numbers are not checked here: timings belong to the scripts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "rnn_speed.py": ["--cells=lstm,gru", "--modes=train,predict", "--batch=4", "--time=5",
                     "--hidden=4", "--input_dim=3", "--repeats=1", "--steps=1", "--torch=false"],
    "fused_kernel.py": ["--batch=4", "--hidden=4", "--input_dim=3", "--time=5", "--repeats=1",
                        "--round_seconds=0.01"],
    "unused_features.py": ["--cells=lstm", "--batch=4", "--time=5", "--input_dim=3",
                           "--units=4", "--truncate=2", "--repeats=1", "--steps=1"],
    "native_gates.py": ["--modes=train", "--batch=4", "--hidden=4", "--input_dim=3", "--time=5",
                        "--repeats=1", "--steps=1", "--torch=false"],
    "sequence_kernels.py": ["--cells=simple_rnn", "--batch=4", "--hidden=4", "--input_dim=3",
                            "--time=5", "--repeats=1", "--steps=1", "--torch=false"],
    "masked_speed.py": ["--cells=lstm,gru", "--modes=train,predict", "--batch=4", "--time=6",
                        "--hidden=4", "--input_dim=3", "--repeats=1", "--steps=1"],
    "backend_speed.py": ["--sizes=4x5", "--hidden=4", "--input_dim=3", "--repeats=1",
                         "--steps=1"],
    # odd shapes: partial row blocks (1 to 8 rows) and column panels (the AVX-512 block's
    # 48-column panels whole, and with one, two or three vectors in the last; its 32-column
    # ones; the AVX2 block's 24- and 16-column ones likewise, 24-column ones streamed from L2
    # at K = 180 and 200), each product checked in double (every variant, both panel widths
    # of each block)
    "small_gemm.py": ["--rounds=1", "--shapes=7x37x53,13x5x16,3x130x170,9x100x112,8x40x96,"
                      "1x37x40,2x100x87,6x200x44,4x180x23"],
    "shard_start.py": ["--work_us=5", "--calls=5"],
    "gate_rows.py": ["--rounds=1", "--hidden=5,37"],
    # 3 x 45 = 135 pairs: two chunks; 37 and 13 rows, 52 columns: partial blocks and panels
    "weight_grad.py": ["--points=3x45x37x13", "--repeats=1", "--steps=1"],
}
ROWS = {"rnn_speed.py": 4, "fused_kernel.py": 2, "unused_features.py": 4, "native_gates.py": 2,
        "sequence_kernels.py": 2, "small_gemm.py": 18, "masked_speed.py": 4, "backend_speed.py": 4,
        "shard_start.py": 2, "gate_rows.py": 4, "weight_grad.py": 2}


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_and_writes_its_table(script, tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *TINY[script], f"--out={out}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    body = [ln for ln in lines[2:] if ln.startswith("| ")]
    assert lines[0].startswith("| ") and set(lines[1]) <= set("|-")
    assert len(body) == ROWS[script]
    if script == "gate_rows.py":  # the backward rows' packets compute the expressions' values
        assert all(ln.split("|")[-2].strip() == "0" for ln in body if "backward" in ln), body
    if script == "weight_grad.py":  # the ops' results against TensorFlow's matmuls
        # float32 sums of 135 normal products, relative to the largest: each within
        # 135 u sum |a||b| (about 135 u 0.64 x 135) of the exact sum, the largest about 2 x 135^0.5
        assert all(float(ln.split("|")[-2]) < 2 * 135 * 2**-24 * 0.64 * 135 / 23 for ln in body)
    if script == "fused_kernel.py":  # the equality check it prints: the V2 kernel matches
        assert "Equality: outputs" in lines[-1]
        equal = lines[-1].split("Equality: outputs ")[1]
        assert float(equal.split(",")[0]) < 1e-5


def test_narrow_isa_reaches_every_library(monkeypatch):
    """KERAS_FANCYRNN_BENCH_ISA=avx2 limits this package's build, oneDNN, torch's kernels and MKL
    (torch's matmuls) alike; an unknown value is an error that names the variable."""
    monkeypatch.delenv("KERAS_FANCYRNN_BENCH_ISA", raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _isa

    env = {"KERAS_FANCYRNN_BENCH_ISA": "AVX2", "KERAS_FANCYRNN_CXXFLAGS": "-O2 '-DX=a b'"}
    assert _isa.apply(env) == "avx2"
    assert _isa.apply(env) == "avx2"  # twice: the flag is not appended again
    assert env == {"KERAS_FANCYRNN_BENCH_ISA": "AVX2",
                   "KERAS_FANCYRNN_CXXFLAGS": "-O2 '-DX=a b' -mno-avx512f",
                   "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                   "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert _isa.apply({"KERAS_FANCYRNN_BENCH_ISA": ""}) is None
    with pytest.raises(ValueError, match="KERAS_FANCYRNN_BENCH_ISA='SSE2'"):
        _isa.apply({"KERAS_FANCYRNN_BENCH_ISA": "SSE2"})
    assert "widest" in _isa.describe()
    monkeypatch.setenv("KERAS_FANCYRNN_BENCH_ISA", "avx2")
    assert _isa.describe() == "everything at AVX2 (KERAS_FANCYRNN_BENCH_ISA=avx2)"
