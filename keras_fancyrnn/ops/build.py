"""The C++ library of keras_fancyrnn's kernels: its build for this CPU, its load, and what it runs.

The kernels are compiled against the installed TensorFlow the first time a layer needs them
(about 30 s, once: the library is cached under ``$KERAS_FANCYRNN_CACHE`` or
``~/.cache/keras_fancyrnn``, keyed by the sources, TensorFlow's version, this CPU and
``$KERAS_FANCYRNN_CXXFLAGS``). A build that fails is reported (``load_error``) and not retried in
the process; the layers then run their plain TensorFlow ops.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

from keras_fancyrnn import config
from keras_fancyrnn.errors import ConfigError

_KERNELS = os.path.join(os.path.dirname(__file__), "kernels")
_SOURCES = [os.path.join(_KERNELS, name)
            for name in ("gates.cc", "norms.cc", "sequence.cc")]
_HEADERS = [os.path.join(_KERNELS, name) for name in ("gate_math.h", "kernel_util.h",
                                                      "outer_sum.h", "shard_pool.h",
                                                      "small_gemm.h")]
_log = logging.getLogger("keras_fancyrnn")
_lock = threading.Lock()
_state = {"tried": False, "library": None, "error": None, "products": None}


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _private_dir(path: str) -> bool:
    """Whether ``path`` is a directory that only this user can write (libraries are loaded from
    it, so a directory another user could write into is not used)."""
    info = os.lstat(path)
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _default_cache() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "keras_fancyrnn")


def _cache_dir() -> str:
    root = os.environ.get("KERAS_FANCYRNN_CACHE") or _default_cache()
    try:
        os.makedirs(root, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    root = os.path.join(tempfile.gettempdir(), f"keras_fancyrnn-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    if not _private_dir(root):
        raise RuntimeError(f"{root} is writable by other users or not ours; set "
                           "KERAS_FANCYRNN_CACHE to a private directory")
    return root


def compiler() -> list[str] | None:
    """The C++ compiler command: ``$CXX`` (may hold arguments, e.g. ``ccache g++``), else
    ``g++`` or ``c++`` on the PATH; ``None`` if there is none."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("g++") or shutil.which("c++")
    return [found] if found else None


def _extra_flags() -> list[str]:
    """``$KERAS_FANCYRNN_CXXFLAGS``: compiler flags added after ours, e.g. ``-mno-avx512f`` to
    build on an AVX-512 CPU what an AVX2 CPU builds."""
    return shlex.split(os.environ.get("KERAS_FANCYRNN_CXXFLAGS", ""))


def target_flags(command: tuple[str, ...]) -> list[str]:
    """``-march=native``, and ``-mno-avx512fp16`` where that enables AVX512-FP16: TensorFlow's
    copy of Eigen does not compile with it (its half-precision packet code), and the kernels use
    no half precision. Then ``$KERAS_FANCYRNN_CXXFLAGS`` (read now: it is in the cache key)."""
    flags = ["-march=native"]
    if _native_has_fp16(command):
        flags.append("-mno-avx512fp16")
    return flags + _extra_flags()


@functools.cache
def _native_has_fp16(command: tuple[str, ...]) -> bool:
    """Whether ``-march=native`` enables AVX512-FP16 for this compiler on this CPU."""
    probe = subprocess.run([*command, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                           capture_output=True, text=True, timeout=60)
    return "__AVX512FP16__" in probe.stdout


def _compile(tf, target: str) -> None:
    command = compiler()
    if not command:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    command += ["-shared", "-fPIC", "-O3", *target_flags(tuple(command)), "-w", *_SOURCES, "-o",
                target, *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        raise RuntimeError(f"{' '.join(command)} failed:\n" + "\n".join(errors[:5]
                           or done.stderr.splitlines()[-20:]))


def library():
    """The loaded kernel library (compiled on first use), or ``None`` where it cannot be had;
    ``load_error()`` then says why."""
    with _lock:
        if _state["tried"]:
            return _state["library"]
        _state["tried"] = True
        try:
            _state["library"] = _load()
        except KeyboardInterrupt:
            _state["tried"] = False  # interrupted, not failed: the next use tries again
            raise
        except Exception as error:  # noqa: BLE001 - any failure means: use the plain ops
            _state["error"] = f"{type(error).__name__}: {error}"
            _log.warning("keras_fancyrnn: fused gate kernels unavailable, using plain "
                         "TensorFlow ops (same results, slower on a CPU): %s", _state["error"])
        return _state["library"]


def load_error() -> str | None:
    """Why ``library()`` returned ``None`` (``None`` if it loaded or was not tried)."""
    return _state["error"]


def _load():
    import fcntl

    from keras_fancyrnn._tf import tf

    sources = []
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            sources.append(f.read())
    key = hashlib.sha256(b"\0".join([
        *sources, tf.__version__.encode(), " ".join(tf.sysconfig.get_compile_flags()).encode(),
        sys.version.encode(), _cpu_id().encode(), " ".join(_extra_flags()).encode()]
    )).hexdigest()[:16]
    built = os.path.join(os.environ.get("KERAS_FANCYRNN_CACHE") or _default_cache(),
                         f"gates-{key}.so")
    if os.path.exists(built):  # also where the cache is read-only
        return tf.load_op_library(built)
    directory = _cache_dir()
    target = os.path.join(directory, f"gates-{key}.so")
    with open(os.path.join(directory, f"gates-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process compiles, the others wait and load
        if not os.path.exists(target):
            _log.warning("keras_fancyrnn: compiling the fused gate kernels (once, ~15 s) into %s",
                         target)
            partial = f"{target}.{os.getpid()}.tmp"
            try:
                _compile(tf, partial)
                os.replace(partial, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(partial)
    return tf.load_op_library(target)


def usable(dtype) -> bool:
    """Whether a cell's step may call the kernels now (``dispatch.native_blocker``: enabled,
    TensorFlow backend, float32 or float64, no GPU, not inside a portable or XLA trace, and the
    library loads)."""
    from keras_fancyrnn.engine import dispatch

    return dispatch.native_blocker(dtype) is None


def products() -> list[str]:
    """The recurrent products (``keras_fancyrnn.config``'s ``recurrent_product``) the sequence
    kernels of this build run on this CPU, widest first, e.g. ``["avx512", "avx2", "eigen"]``;
    empty where the kernels cannot be had."""
    if _state.get("products") is None:
        lib = library()
        if lib is None:
            return []
        from keras_fancyrnn._tf import tf

        with tf.init_scope():  # eagerly, also while a function is traced
            names = lib.keras_fancyrnn_products().numpy().decode()
        _state["products"] = names.split(", ")
    return list(_state["products"])


def product() -> str:
    """The ``product`` attr for the sequence ops now: the ``recurrent_product`` setting, checked
    against what this CPU runs."""
    name = config.get("recurrent_product")
    if name != "auto" and name not in products():
        raise ConfigError(
            f"recurrent_product={name!r} is not available on this CPU: it runs "
            f"{', '.join(map(repr, products())) or 'none (the kernels are unavailable)'} "
            "(set keras_fancyrnn.config recurrent_product or "
            "$KERAS_FANCYRNN_RECURRENT_PRODUCT to one of them, or 'auto')")
    return name
