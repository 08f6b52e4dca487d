"""C++ ops for the recurrences on a CPU: whole sequences, and the gate part of single steps.

Long (over 400 lines): the build and load of the library, the Python wrappers of its ops, and
the same equations in TensorFlow ops that serve as the ops' second derivatives, all keyed to one
list of ops; the build and load are the part that can leave for a module of their own.

On a CPU a recurrent step is a small matmul and 10–20 small element-wise ops, and at the sizes
people train (batch 64, 128 units) each op costs more in TensorFlow's per-op overhead than in
arithmetic. Two kinds of kernels remove that:

- ``kernels/sequence.cc``: every timestep of an LSTM, GRU (either ``reset_after``) or tanh or
  ReLU SimpleRNN in one op (``lstm_sequence``, ``gru_sequence``, ``gru_before_sequence``,
  ``rnn_sequence``), and the step-by-step part of its gradient in another, which also sums the
  bias gradient; ``project`` computes ``x W`` for all timesteps before it, and the weight
  gradients are large matmuls after it. The engine runs them where it would otherwise loop
  without a mask, probe, truncation or recurrent dropout (benchmarks/sequence_kernels.py).
- ``kernels/gates.cc``: the gate equations of ``LSTMCell.step`` and ``GRUCell.step`` in one op
  and their gradient in another, for the steps of the engine's loop (benchmarks/native_gates.py).

The kernels are compiled against the installed TensorFlow the first time a layer needs them
(about 30 s, once: the library is cached under ``$KERAS_FANCYRNN_CACHE`` or
``~/.cache/keras_fancyrnn``, keyed by the sources, TensorFlow's version and this CPU). Where that
is impossible (no C++ compiler, another backend, a GPU, a portable or XLA trace, float16) the
cells run their plain TensorFlow ops, which compute the same values; set
``keras_fancyrnn.config``'s ``native_kernels=False`` (or ``KERAS_FANCYRNN_NATIVE=0``) to always
do so, and ``sequence_kernels=False`` to keep the loop (with the gate kernels). The library is
built for this CPU (``-march=native``); ``$KERAS_FANCYRNN_CXXFLAGS`` adds compiler flags
(``-mno-avx512f`` builds on an AVX-512 CPU what an AVX2 CPU builds). The recurrent products of the
sequence kernels run a register block for this CPU's widest vectors; ``keras_fancyrnn.config``'s
``recurrent_product`` picks another one this CPU runs (``products()``).

Gradients: the backward kernels give first derivatives; their own gradients (second derivatives,
e.g. a gradient penalty) are the same equations written with TensorFlow ops, so every order is
exact.
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

import keras

from keras_fancyrnn import config
from keras_fancyrnn.errors import ConfigError

_KERNELS = os.path.join(os.path.dirname(__file__), "kernels")
_SOURCES = [os.path.join(_KERNELS, name) for name in ("gates.cc", "sequence.cc")]
_HEADERS = [os.path.join(_KERNELS, name) for name in ("gate_math.h", "kernel_util.h",
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


def _target_flags(command: tuple[str, ...]) -> list[str]:
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
    command += ["-shared", "-fPIC", "-O3", *_target_flags(tuple(command)), "-w", *_SOURCES, "-o",
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


def lstm_gates(z, c_prev, probe=None):
    """``(h, c)`` of an LSTM step from ``z = x W + b + h_{t-1} U`` (gates i, f, c, o); ``probe``
    (the diagnostics probe of ``c_t``) is added to ``c_t`` before it feeds ``h_t``."""
    if probe is None:
        return library().keras_fancyrnn_lstm_gates(z, c_prev)
    return library().keras_fancyrnn_lstm_gates_probed(z, c_prev, probe)


def gru_gates(xp, rec, h_prev):
    """``h`` of a GRU step (``reset_after=True``) from ``xp = x W + b_in`` and
    ``rec = h_{t-1} U + b_rec`` (blocks z, r, h)."""
    return library().keras_fancyrnn_gru_gates(xp, rec, h_prev)


def project(x, kernel):
    """``x W`` for time-major ``x`` ``[T, B, D]``: one matmul, with its gradient written here.
    (The bias is the sequence kernels' input: their gradient kernels sum its gradient.)

    TensorFlow's own gradient of a reshape keeps its input alive until the backward pass (for
    its shape, where the batch size is unknown), so the ``[T, B, n]`` product would be held twice
    and the sequence kernels could not write their output into it; this gradient needs only
    ``x`` and ``W``."""
    from keras_fancyrnn._tf import tf

    @tf.custom_gradient
    def projected(x, kernel):
        shape = tf.shape(x)
        flat = tf.reshape(x, [-1, x.shape[-1]])
        y = tf.matmul(flat, kernel)

        def grad(dy):
            dflat = tf.reshape(dy, [-1, kernel.shape[-1]])
            dx = tf.reshape(tf.matmul(dflat, kernel, transpose_b=True), shape)
            return dx, tf.matmul(flat, dflat, transpose_a=True)

        return tf.reshape(y, tf.concat([shape[:-1], tf.shape(kernel)[-1:]], axis=0)), grad

    # A value, not the variable (read here, outside the custom gradient), so that the gradient
    # reaches the variable through the read.
    kernel = tf.identity(kernel)
    y = projected(x, kernel)
    return tf.ensure_shape(y, x.shape[:-1].concatenate(kernel.shape[-1:]))


def _bias(bias, xp):
    """The bias input of a sequence kernel: ``bias``, or zeros as wide as ``xp``'s rows."""
    from keras_fancyrnn._tf import tf

    if bias is None:
        return tf.zeros(tf.shape(xp)[-1:], xp.dtype)
    return tf.convert_to_tensor(bias, xp.dtype)


def _extras(xp, mask, probes, states: int):
    """The mask and probe inputs every sequence kernel takes after its own: ``mask`` ``[T, B]``
    (bool) and ``probes[i]`` ``[T, B, H]`` for each of the first ``states`` states, each the empty
    marker where absent."""
    from keras_fancyrnn._tf import tf

    probes = probes or {}
    unknown = set(probes) - set(range(states))
    if unknown:
        raise ValueError(f"probes: state indices {sorted(unknown)} do not exist; this kernel "
                         f"has {states} state(s)")
    mask = tf.zeros([0], tf.bool) if mask is None else tf.cast(mask, tf.bool)
    return [mask] + [tf.zeros([0], xp.dtype) if probes.get(i) is None
                     else tf.convert_to_tensor(probes[i], xp.dtype) for i in range(states)]


def lstm_sequence(xp, h0, c0, u, b=None, mask=None, probes=None):
    """All steps of an LSTM: ``(h [T, B, H], [h_T, c_T])`` from ``xp = x W`` ``[T, B, 4H]``
    (time-major), the initial states ``h0``, ``c0``, the recurrent kernel ``u`` and the bias
    ``b`` (``None``: none). ``mask`` ``[T, B]``: at a false step a row keeps its states (the
    returned ``h`` is the state sequence; the layer makes the outputs). ``probes``:
    ``{0: [T, B, H], 1: [T, B, H]}`` added to ``h_t`` / ``c_t`` (before ``c_t`` feeds ``h_t``)
    at unmasked steps: their gradients are ``∂ℓ/∂h_t`` and ``∂ℓ/∂c_t``."""
    _, h, _, h_last, c_last = library().keras_fancyrnn_lstm_sequence(
        xp, h0, c0, u, _bias(b, xp), *_extras(xp, mask, probes, 2), product=product())
    return h, [h_last, c_last]


def gru_sequence(xp, h0, u, b_rec=None, b_in=None, mask=None, probes=None):
    """All steps of a GRU (``reset_after=True``): ``(h [T, B, H], [h_T])`` from
    ``xp = x W`` ``[T, B, 3H]``, ``h0``, the recurrent kernel ``u``, the recurrent bias ``b_rec``
    and the input bias ``b_in`` (``None``: none); ``mask`` and ``probes`` as ``lstm_sequence``."""
    h, _, h_last = library().keras_fancyrnn_gru_sequence(
        xp, h0, u, _bias(b_rec, xp), _bias(b_in, xp), *_extras(xp, mask, probes, 1),
        product=product())
    return h, [h_last]


def gru_before_sequence(xp, h0, u, b=None, mask=None, probes=None):
    """All steps of a GRU with ``reset_after=False`` (the reset gate before the product):
    ``(h [T, B, H], [h_T])`` from ``xp = x W`` ``[T, B, 3H]``, ``h0``, ``u`` and the bias ``b``
    (``None``: none); ``mask`` and ``probes`` as ``lstm_sequence``."""
    h, _, _, h_last = library().keras_fancyrnn_gru_before_sequence(
        xp, h0, u, _bias(b, xp), *_extras(xp, mask, probes, 1), product=product())
    return h, [h_last]


def rnn_sequence(xp, h0, u, activation="tanh", b=None, mask=None, probes=None):
    """All steps of a SimpleRNN with ``activation`` ``"tanh"`` or ``"relu"``:
    ``(h [T, B, H], [h_T])`` from ``xp = x W`` ``[T, B, H]`` and the bias ``b`` (``None``:
    none); ``mask`` and ``probes`` as ``lstm_sequence``."""
    h, h_last, _ = library().keras_fancyrnn_rnn_sequence(
        xp, h0, u, _bias(b, xp), *_extras(xp, mask, probes, 1), activation=activation,
        product=product())
    return h, [h_last]


# ----------------------------------------------------------------------------------------------
# Gradients. The kernels' backward equations, written again with TensorFlow ops, serve as the
# gradients of the backward kernels (second and higher derivatives).


def lstm_backward(dh, dc, z, c_prev, probe=None):
    """``(dz, dc_prev)`` of ``lstm_gates`` given the gradients ``dh``, ``dc`` of its outputs
    (and ``dprobe`` third, with a probe)."""
    from keras_fancyrnn._tf import tf

    z_i, z_f, z_c, z_o = tf.split(z, 4, axis=-1)
    i, f, g, o = tf.sigmoid(z_i), tf.sigmoid(z_f), tf.tanh(z_c), tf.sigmoid(z_o)
    c = f * c_prev + i * g
    tc = tf.tanh(c if probe is None else c + probe)
    dc_total = dc + dh * o * (1 - tc * tc)
    dz = tf.concat([dc_total * g * i * (1 - i), dc_total * c_prev * f * (1 - f),
                    dc_total * i * (1 - g * g), dh * tc * o * (1 - o)], axis=-1)
    return (dz, dc_total * f) + (() if probe is None else (dc_total,))


def gru_backward(dh, xp, rec, h_prev):
    """``(dxp, drec, dh_prev)`` of ``gru_gates`` (``dh_prev`` without the path through ``rec``)."""
    from keras_fancyrnn._tf import tf

    x_z, x_r, x_h = tf.split(xp, 3, axis=-1)
    r_z, r_r, r_h = tf.split(rec, 3, axis=-1)
    z, r = tf.sigmoid(x_z + r_z), tf.sigmoid(x_r + r_r)
    hh = tf.tanh(x_h + r * r_h)
    da = dh * (1 - z) * (1 - hh * hh)
    dz = dh * (h_prev - hh) * z * (1 - z)
    dr = da * r_h * r * (1 - r)
    return (tf.concat([dz, dr, da], axis=-1), tf.concat([dz, dr, da * r], axis=-1), dh * z)


def _previous(initial, sequence):
    """``[initial, s_0, ..., s_{T-2}]``: the state before each step."""
    from keras_fancyrnn._tf import tf

    return tf.concat([initial[None], sequence], axis=0)[:-1]


def _absent(grad):
    """Whether ``grad`` is the empty marker the sequence gradient kernels take for 'none'."""
    return grad.shape.rank == 1


def _present(grad, like):
    """``grad``, or zeros shaped as ``like`` where it is the empty marker."""
    from keras_fancyrnn._tf import tf

    return tf.zeros_like(like) if _absent(grad) else grad


def _scan_back(step, sequences, initializer):
    """``tf.scan`` from the last step to the first; returns the stacked outputs."""
    from keras_fancyrnn._tf import tf

    return tf.scan(step, sequences, initializer=initializer, reverse=True)


def _column_sums(grad):
    """The bias gradient of a ``[T, B, n]`` gradient: its sum over ``T`` and ``B``."""
    from keras_fancyrnn._tf import tf

    return tf.reduce_sum(grad, axis=[0, 1])


def _unmasked(mask, like):
    """``[T, B, 1]`` in ``like``'s dtype: 1 at unmasked steps, 0 at masked ones (all 1 where the
    mask is the empty marker)."""
    from keras_fancyrnn._tf import tf

    if _absent(mask):
        return tf.ones(tf.concat([tf.shape(like)[:2], [1]], axis=0), like.dtype)
    return tf.cast(mask, like.dtype)[..., None]


def _probe_output(grads, probe):
    """A probe's gradient output of a backward kernel: the stacked ``grads``, or the empty
    marker where there is no probe."""
    from keras_fancyrnn._tf import tf

    return tf.zeros([0], grads.dtype) if _absent(probe) else grads


def lstm_sequence_backward(dh, dc, dz_in, z, c, c0, u, dh_last, dc_last, mask, probe_h, probe_c):
    """``(dz, dh0, dc0, db, dprobe_h, dprobe_c)`` of ``KerasFancyrnnLstmSequenceGrad`` with
    TensorFlow ops. At a masked step a row's gradients pass to the step before unchanged."""
    from keras_fancyrnn._tf import tf

    dh, dc, dz_in, p_c = _present(dh, c), _present(dc, c), _present(dz_in, z), _present(probe_c, c)

    def step(carry, xs):
        dh_t, dc_t, dz_in_t, z_t, c_prev, m, p_t = xs
        dh_t, dc_t = dh_t + carry[0], dc_t + carry[1]
        dz_t, dc_prev, dc_total = lstm_backward(dh_t * m, dc_t * m, z_t, c_prev, probe=p_t)
        dz_t = dz_t + dz_in_t
        return (tf.matmul(dz_t, u, transpose_b=True) + (1 - m) * dh_t,
                dc_prev + (1 - m) * dc_t, dz_t, dh_t * m, dc_total)

    zeros = _step_zeros(c)
    dh_back, dc_back, dz, dp_h, dp_c = _scan_back(
        step, (dh, dc, dz_in, z, _previous(c0, c), _unmasked(mask, c), p_c),
        (dh_last, dc_last, _step_zeros(z), zeros, zeros))
    return (dz, _first(dh_back, dh_last), _first(dc_back, dc_last), _column_sums(dz),
            _probe_output(dp_h, probe_h), _probe_output(dp_c, probe_c))


def gru_sequence_backward(dh, drec_in, xp, rec, h, h0, u, dh_last, b_in, mask, probe_h):
    """``(dxp, drec, dh0, db_in, db_rec, dprobe_h)`` of ``KerasFancyrnnGruSequenceGrad`` with
    TensorFlow ops."""
    from keras_fancyrnn._tf import tf

    dh, drec_in, xp = _present(dh, h), _present(drec_in, rec), xp + b_in

    def step(carry, xs):
        dh_t, drec_in_t, xp_t, rec_t, h_prev, m = xs
        dh_t = dh_t + carry[0]
        dxp_t, drec_t, direct = gru_backward(dh_t * m, xp_t, rec_t, h_prev)
        drec_t = drec_t + drec_in_t
        return (tf.matmul(drec_t, u, transpose_b=True) + direct + (1 - m) * dh_t, dxp_t, drec_t,
                dh_t * m)

    dh_back, dxp, drec, dp_h = _scan_back(
        step, (dh, drec_in, xp, rec, _previous(h0, h), _unmasked(mask, h)),
        (dh_last, _step_zeros(xp), _step_zeros(rec), _step_zeros(h)))
    return (dxp, drec, _first(dh_back, dh_last), _column_sums(dxp), _column_sums(drec),
            _probe_output(dp_h, probe_h))


def gru_before_sequence_backward(dh, drec_in, drh_in, xp, rec, h, h0, u, dh_last, b, mask,
                                 probe_h):
    """``(dxp, drec, dh0, db, dprobe_h)`` of ``KerasFancyrnnGruBeforeSequenceGrad`` with
    TensorFlow ops."""
    from keras_fancyrnn._tf import tf

    dh, drec_in, drh_in = _present(dh, h), _present(drec_in, rec), _present(drh_in, h)
    xp = xp + b
    units = h.shape[-1]
    u_zr, u_h = u[:, :2 * units], u[:, 2 * units:]

    def step(carry, xs):
        dh_t, drec_in_t, drh_in_t, xp_t, rec_t, h_prev, m = xs
        dh_t = dh_t + carry[0]
        dh_new = dh_t * m
        x_z, x_r, x_h = tf.split(xp_t, 3, axis=-1)
        r_z, r_r, r_h = tf.split(rec_t, 3, axis=-1)
        z, r, hh = tf.sigmoid(x_z + r_z), tf.sigmoid(x_r + r_r), tf.tanh(x_h + r_h)
        da = dh_new * (1 - z) * (1 - hh * hh)
        dz = dh_new * (h_prev - hh) * z * (1 - z)
        d_rh = tf.matmul(da + drec_in_t[:, 2 * units:], u_h, transpose_b=True) + drh_in_t
        dr = d_rh * h_prev * r * (1 - r)
        dxp_t = tf.concat([dz, dr, da], axis=-1)
        drec_t = dxp_t + drec_in_t
        dh_prev = (dh_new * z + d_rh * r + (1 - m) * dh_t
                   + tf.matmul(drec_t[:, :2 * units], u_zr, transpose_b=True))
        return dh_prev, dxp_t, drec_t, dh_new

    dh_back, dxp, drec, dp_h = _scan_back(
        step, (dh, drec_in, drh_in, xp, rec, _previous(h0, h), _unmasked(mask, h)),
        (dh_last, _step_zeros(xp), _step_zeros(rec), _step_zeros(h)))
    return (dxp, drec, _first(dh_back, dh_last), _column_sums(dxp),
            _probe_output(dp_h, probe_h))


def rnn_sequence_backward(dh, h, h0, u, dh_last, mask, probe_h, act, activation="tanh"):
    """``(dz, dh0, db, dprobe_h)`` of ``KerasFancyrnnRnnSequenceGrad`` with TensorFlow ops
    (σ(z_t): ``act`` where the forward kept it, else ``h_t - probe_t``)."""
    from keras_fancyrnn._tf import tf

    dh = _present(dh, h)
    sigma = act if not _absent(act) else h if _absent(probe_h) else h - probe_h

    def derivative(sigma_t):  # σ'(z_t) from σ(z_t)
        if activation == "relu":
            return tf.cast(sigma_t > 0, sigma_t.dtype)
        return 1 - sigma_t * sigma_t

    def step(carry, xs):
        dh_t, sigma_t, m = xs
        dh_t = dh_t + carry[0]
        dz_t = dh_t * m * derivative(sigma_t)
        return tf.matmul(dz_t, u, transpose_b=True) + (1 - m) * dh_t, dz_t, dh_t * m

    dh_back, dz, dp_h = _scan_back(step, (dh, sigma, _unmasked(mask, h)),
                                   (dh_last, _step_zeros(h), _step_zeros(h)))
    return dz, _first(dh_back, dh_last), _column_sums(dz), _probe_output(dp_h, probe_h)


def _step_zeros(sequence):
    """Zeros shaped as one step of ``sequence`` (also where it has no steps)."""
    from keras_fancyrnn._tf import tf

    return tf.zeros(tf.shape(sequence)[1:], sequence.dtype)


def _first(stacked, default):
    """The first step of a backward scan's stacked carries (``default`` for no steps)."""
    from keras_fancyrnn._tf import tf

    return tf.cond(tf.shape(stacked)[0] > 0, lambda: stacked[0], lambda: default)


def _recurrent_kernel_gradient(h0, h, dz):
    """``sum_t h_{t-1}^T dz_t`` (``h_{-1} = h0``): ``h0^T dz_0`` plus one
    ``[H, (T-1)·B] x [(T-1)·B, n]`` matmul over slices, which share the sequences' memory (a
    concatenation ``[h0, h_0, ...]`` would copy all of ``h``)."""
    from keras_fancyrnn._tf import tf

    rest = tf.matmul(tf.reshape(h[:-1], [-1, h.shape[-1]]), tf.reshape(dz[1:], [-1, dz.shape[-1]]),
                     transpose_a=True)
    return rest + tf.matmul(h0, tf.reduce_sum(dz[:1], axis=0), transpose_a=True)


def _known_zero(grad) -> bool:
    """Whether ``grad`` is None or, in a graph, a fill of zeros: what TensorFlow passes for the
    outputs of an op that nothing downstream used (it fills zeros for every output of an op
    with any gradient)."""
    import numpy as np

    from keras_fancyrnn._tf import tf

    if grad is None:
        return True
    if tf.executing_eagerly() or isinstance(grad, tf.IndexedSlices):
        return False
    op = grad.op
    if op.type == "ZerosLike":
        return True
    value = (tf.get_static_value(op.inputs[1]) if op.type == "Fill"
             else tf.get_static_value(grad) if op.type == "Const" else None)
    return value is not None and not np.any(value)


def _optional(grad, like):
    """``grad`` for a sequence gradient kernel, or its empty marker where it is known to be zero
    (no ``[T, B, ...]`` zeros to allocate, read and add)."""
    from keras_fancyrnn._tf import tf

    return tf.zeros([0], like.dtype) if _known_zero(grad) else grad


def _zeros_for_none(grads, outputs):
    from keras_fancyrnn._tf import tf

    return [tf.zeros_like(o) if g is None else g for g, o in zip(grads, outputs)]


def _vjp(function, inputs, grads):
    from keras_fancyrnn._tf import tf

    # Copies in the graph being built: a gradient function can run in another graph than its op
    # (a loop's gradient body), where the op's own inputs are captures the tape would not see.
    inputs = [tf.identity(x) for x in inputs]
    watched = [x for x in inputs if x.dtype.is_floating]  # not the masks
    with tf.GradientTape() as tape:
        tape.watch(watched)
        outputs = function(*inputs)
    found = iter(tape.gradient(outputs, watched,
                               output_gradients=_zeros_for_none(grads, outputs)))
    return [next(found) if x.dtype.is_floating else None for x in inputs]


def _attr(op, name: str) -> str:
    """A string attr of an op (``activation``, ``product``), as ``str``."""
    value = op.get_attr(name)
    return value.decode() if isinstance(value, bytes) else value


def _register_gate_gradients():
    """The gradients of the step kernels (gates.cc), and theirs."""
    from keras_fancyrnn._tf import tf

    @tf.RegisterGradient("KerasFancyrnnLstmGates")
    @tf.RegisterGradient("KerasFancyrnnLstmGatesProbed")
    def _lstm(op, dh, dc):
        dh, dc = _zeros_for_none((dh, dc), op.outputs)
        grad = (library().keras_fancyrnn_lstm_gates_grad if op.type == "KerasFancyrnnLstmGates"
                else library().keras_fancyrnn_lstm_gates_probed_grad)
        return grad(dh, dc, *op.inputs)

    @tf.RegisterGradient("KerasFancyrnnLstmGatesGrad")
    @tf.RegisterGradient("KerasFancyrnnLstmGatesProbedGrad")
    def _lstm_second(op, *grads):
        return _vjp(lstm_backward, op.inputs, grads)

    @tf.RegisterGradient("KerasFancyrnnGruGates")
    def _gru(op, dh):
        (dh,) = _zeros_for_none((dh,), op.outputs)
        return library().keras_fancyrnn_gru_gates_grad(dh, *op.inputs)

    @tf.RegisterGradient("KerasFancyrnnGruGatesGrad")
    def _gru_second(op, *grads):
        return _vjp(gru_backward, op.inputs, grads)


def _register_sequence_gradients():
    """The gradients of the sequence kernels (sequence.cc)."""
    from keras_fancyrnn._tf import tf

    # The sequence kernels. Their gradient kernels run the step-by-step part of backpropagation
    # through time and sum the bias gradients; the recurrent kernel's gradient is one large
    # matmul here.

    # Gradients of sequence outputs nobody used (None in a graph) go to the kernels as empty
    # markers, not as [T, B, ...] zeros: a layer that returns only its final state then sends no
    # sequence-sized gradient back.

    # Each forward kernel's last inputs are its mask (no gradient) and probes, whose gradients
    # are the backward kernel's last outputs.

    @tf.RegisterGradient("KerasFancyrnnLstmSequence")
    def _lstm_sequence(op, dz, dh, dc, dh_last, dc_last):
        _, h0, c0, u, _, *extras = op.inputs
        z, h, c, *last = op.outputs
        dh_last, dc_last = _zeros_for_none((dh_last, dc_last), last)
        dz, dh0, dc0, db, *dprobes = library().keras_fancyrnn_lstm_sequence_grad(
            _optional(dh, h), _optional(dc, c), _optional(dz, z), z, c, c0, u, dh_last, dc_last,
            *extras, product=_attr(op, "product"))
        return dz, dh0, dc0, _recurrent_kernel_gradient(h0, h, dz), db, None, *dprobes

    @tf.RegisterGradient("KerasFancyrnnGruSequence")
    def _gru_sequence(op, dh, drec, dh_last):
        xp, h0, u, _, b_in, *extras = op.inputs
        h, rec, last = op.outputs
        (dh_last,) = _zeros_for_none((dh_last,), (last,))
        dxp, drec, dh0, db_in, db_rec, dprobe = library().keras_fancyrnn_gru_sequence_grad(
            _optional(dh, h), _optional(drec, rec), xp, rec, h, h0, u, dh_last, b_in, *extras,
            product=_attr(op, "product"))
        return dxp, dh0, _recurrent_kernel_gradient(h0, h, drec), db_rec, db_in, None, dprobe

    @tf.RegisterGradient("KerasFancyrnnGruBeforeSequence")
    def _gru_before_sequence(op, dh, drec, drh, dh_last):
        xp, h0, u, b, *extras = op.inputs
        h, rec, rh, last = op.outputs
        (dh_last,) = _zeros_for_none((dh_last,), (last,))
        dxp, drec, dh0, db, dprobe = library().keras_fancyrnn_gru_before_sequence_grad(
            _optional(dh, h), _optional(drec, rec), _optional(drh, rh), xp, rec, h, h0, u,
            dh_last, b, *extras, product=_attr(op, "product"))
        # rec = [h_{t-1} U_z, h_{t-1} U_r, rh_t U_h]
        units = h.shape[-1]
        du_h = tf.matmul(tf.reshape(rh, [-1, units]), tf.reshape(drec[..., 2 * units:],
                                                                 [-1, units]), transpose_a=True)
        du_zr = _recurrent_kernel_gradient(h0, h, drec[..., :2 * units])
        return dxp, dh0, tf.concat([du_zr, du_h], axis=1), db, None, dprobe

    @tf.RegisterGradient("KerasFancyrnnRnnSequence")
    def _rnn_sequence(op, dh, dh_last, _):  # act: ReLU's σ(z_t), whose σ' has no gradient
        _, h0, u, _, mask, probe = op.inputs
        h, last, act = op.outputs
        (dh_last,) = _zeros_for_none((dh_last,), (last,))
        dz, dh0, db, dprobe = library().keras_fancyrnn_rnn_sequence_grad(
            _optional(dh, h), h, h0, u, dh_last, mask, probe, act,
            activation=_attr(op, "activation"), product=_attr(op, "product"))
        return dz, dh0, _recurrent_kernel_gradient(h0, h, dz), db, None, dprobe


def _register_sequence_second_derivatives():
    """The gradients of the sequence gradient kernels: their equations in TensorFlow ops."""
    from keras_fancyrnn._tf import tf

    @tf.RegisterGradient("KerasFancyrnnLstmSequenceGrad")
    def _lstm_sequence_second(op, *grads):
        return _vjp(lstm_sequence_backward, op.inputs, grads)

    @tf.RegisterGradient("KerasFancyrnnGruSequenceGrad")
    def _gru_sequence_second(op, *grads):
        return _vjp(gru_sequence_backward, op.inputs, grads)

    @tf.RegisterGradient("KerasFancyrnnGruBeforeSequenceGrad")
    def _gru_before_sequence_second(op, *grads):
        return _vjp(gru_before_sequence_backward, op.inputs, grads)

    @tf.RegisterGradient("KerasFancyrnnRnnSequenceGrad")
    def _rnn_sequence_second(op, *grads):
        return _vjp(functools.partial(rnn_sequence_backward, activation=_attr(op, "activation")),
                    op.inputs, grads)


if keras.config.backend() == "tensorflow":
    _register_gate_gradients()
    _register_sequence_gradients()
    _register_sequence_second_derivatives()

config.guard_removed(__name__, {"ENABLED": "native_kernels", "SEQUENCES": "sequence_kernels"})
