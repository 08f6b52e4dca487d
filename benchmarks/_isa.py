"""The narrower instruction set for every library a benchmark times, set before any is loaded.

With ``KERAS_FANCYRNN_BENCH_ISA=avx2`` on an AVX-512 CPU, a benchmark runs as it would on an
AVX2 CPU:

- this package's kernels are built without AVX-512 (``KERAS_FANCYRNN_CXXFLAGS=-mno-avx512f``,
  appended);
- oneDNN, in TensorFlow and in torch, stops at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``);
- torch's own vectorised kernels too (``ATEN_CPU_CAPABILITY=avx2``);
- and MKL, torch's BLAS, whose matmuls the two above leave at AVX-512
  (``MKL_ENABLE_INSTRUCTIONS=AVX2``; without it torch's GRU and SimpleRNN ran their products at
  AVX-512 in a run meant to be all AVX2).

Keras's own layers, where Keras compiles them with XLA, run code XLA generates for the CPU's
widest instruction set, which this setting does not reach: at AVX2 the ``fr/keras`` columns
compare against that.
``describe()`` says which setting a run used, for the scripts' footers."""

from __future__ import annotations

import os
import shlex

_SETTINGS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                      "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
_FLAGS = {"avx2": "-mno-avx512f"}


def apply(environ=os.environ) -> str | None:
    """Sets ``environ`` for ``KERAS_FANCYRNN_BENCH_ISA`` (unset or empty: leaves it alone);
    returns the ISA. Must run before torch, TensorFlow or this package's kernels load."""
    given = environ.get("KERAS_FANCYRNN_BENCH_ISA", "")
    if not given:
        return None
    isa = given.lower()
    if isa not in _SETTINGS:
        raise ValueError(f"KERAS_FANCYRNN_BENCH_ISA={given!r}: expected one of "
                         f"{sorted(_SETTINGS)}")
    environ.update(_SETTINGS[isa])
    # appended to the flags as given (the build splits them as a shell would)
    flags = environ.get("KERAS_FANCYRNN_CXXFLAGS", "")
    if _FLAGS[isa] not in shlex.split(flags):
        environ["KERAS_FANCYRNN_CXXFLAGS"] = f"{flags} {_FLAGS[isa]}".strip()
    return isa


def describe() -> str:
    """The footer's words for the instruction set this run used."""
    isa = os.environ.get("KERAS_FANCYRNN_BENCH_ISA", "").lower()
    if not isa:
        return "every library at its widest instruction set"
    return f"everything at {isa.upper()} (KERAS_FANCYRNN_BENCH_ISA={isa})"


ISA = apply()
