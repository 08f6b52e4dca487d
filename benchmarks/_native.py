"""Builds the benchmarks' C++ sources (``small_gemm.cc``, ``gate_rows.cc``, ``shard_start.cc``)
against the package's kernel headers and TensorFlow's copy of Eigen."""

from __future__ import annotations

import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, os.pardir, "keras_fancyrnn", "ops", "kernels")


def build(source: str, directory: str, op_library: bool = False) -> str:
    """Compiles ``benchmarks/<source>`` into ``directory``: a program with the flags the
    package's kernels are built with (``-O3`` for this CPU), or with ``op_library`` a
    TensorFlow op library (``tf.load_op_library``). Returns its path."""
    import tensorflow as tf

    from keras_fancyrnn.ops.build import compiler, target_flags

    command = compiler()
    if not command:
        raise SystemExit("no C++ compiler (g++ or $CXX) on PATH")
    target = os.path.join(directory, os.path.splitext(source)[0] + (".so" if op_library else ""))
    flags = (["-shared", "-fPIC", *tf.sysconfig.get_compile_flags(),
              *tf.sysconfig.get_link_flags()] if op_library
             else ["-I", tf.sysconfig.get_include()])
    subprocess.run([*command, "-std=c++17", "-O3", *target_flags(tuple(command)), "-w", "-I",
                    KERNELS, os.path.join(HERE, source), "-o", target, *flags], check=True)
    return target


def run(source: str, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Builds the program ``benchmarks/<source>`` in a temporary directory and runs it with
    ``args``; its output as text."""
    with tempfile.TemporaryDirectory() as directory:
        return subprocess.run([build(source, directory), *args], capture_output=True, text=True,
                              check=check)
