"""Settings of keras_fancyrnn: read with ``get``, change for the process with ``set``, or for a
block of code with ``scope``.

    import keras_fancyrnn as fr

    fr.config.get("recurrent_product")          # "auto"
    with fr.config.scope(recurrent_product="avx2"):
        model(x)                                # traced here: runs the AVX2 register block

Each setting starts from its environment variable where it has one, else its default. The
layers read settings when they are traced (the first call of a ``tf.function``, ``fit``'s first
step): a function traced before a change keeps what it was traced with.

Settings:

``recurrent_product`` (``KERAS_FANCYRNN_RECURRENT_PRODUCT``): how the CPU sequence kernels compute
the recurrent products ``h_{t-1} U`` and ``dz_t U^T`` for float32: ``"auto"`` (default: the widest
of the following this CPU runs), ``"avx512"`` (an 8 x 48 or 8 x 32 register block, CPUs with
AVX-512F), ``"avx2"`` (a 4 x 24 or 6 x 16 register block, CPUs with AVX2 and FMA), ``"eigen"``
(Eigen's matrix product, any CPU). float64 always uses Eigen's. The weight gradients ``dW`` and
``dU`` follow it: the same instruction set's register blocks, or with ``"eigen"`` (and float64)
TensorFlow's matmuls. They differ only in the order of float32 additions;
``keras_fancyrnn.ops.native.products()`` lists what this CPU runs, and asking for one it cannot is
an error when the layers are traced.

``spinning_workers`` (``KERAS_FANCYRNN_SPIN``, ``True``): whether the sequence kernels' shards
run on the package's own worker threads, which spin for 2 ms after each kernel so that the next
kernel's shards start at once; ``False`` runs them on TensorFlow's intra-op pool (for a machine
shared with other work, where a spinning core costs more than it gains; docs/performance.md).

``native_kernels`` (``KERAS_FANCYRNN_NATIVE``, ``True``): whether the layers may run the C++
kernels (``keras_fancyrnn.ops.native``) at all; ``False`` runs the same equations as TensorFlow ops.

``sequence_kernels`` (``KERAS_FANCYRNN_SEQUENCE_KERNELS``, ``True``): whether a whole sequence may
run in one C++ kernel; ``False`` keeps the step loop (with the per-step gate kernels).

``fused_on_cpu`` (``KERAS_FANCYRNN_FUSED_ON_CPU``, ``True``): whether a cell's whole-sequence
path (the sequence kernels, or the LSTM's ``BlockLSTMV2``) may replace the step loop on a CPU at
all; ``False`` runs the loop (e.g. for second derivatives through ``BlockLSTMV2``).

Boolean variables read ``0``, ``false`` or ``no`` (any case) as ``False`` and ``1``, ``true`` or
``yes`` as ``True``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any

from keras_fancyrnn.errors import ConfigError

_BOOL = (True, False)
#: name -> (environment variable, default, allowed values)
_SETTINGS: dict[str, tuple[str, Any, tuple]] = {
    "recurrent_product": ("KERAS_FANCYRNN_RECURRENT_PRODUCT", "auto",
                          ("auto", "avx512", "avx2", "eigen")),
    "spinning_workers": ("KERAS_FANCYRNN_SPIN", True, _BOOL),
    "native_kernels": ("KERAS_FANCYRNN_NATIVE", True, _BOOL),
    "sequence_kernels": ("KERAS_FANCYRNN_SEQUENCE_KERNELS", True, _BOOL),
    "fused_on_cpu": ("KERAS_FANCYRNN_FUSED_ON_CPU", True, _BOOL),
}
_WORDS = {"0": False, "false": False, "no": False, "1": True, "true": True, "yes": True}

_process: dict[str, Any] = {}
_scoped: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "keras_fancyrnn_config", default=types.MappingProxyType({}))


def _check(name: str, value: Any, source: str) -> Any:
    if name not in _SETTINGS:
        raise ConfigError(f"{source}: no setting named {name!r}; the settings are "
                          f"{', '.join(sorted(_SETTINGS))}")
    allowed = _SETTINGS[name][2]
    if allowed is _BOOL and source.startswith("$"):
        value = _WORDS.get(value.strip().lower(), value)
    if allowed is _BOOL and not isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"{source}: {name} must be one of {', '.join(map(repr, allowed))}, "
                          f"got {value!r}")
    return value


def get(name: str) -> Any:
    """The value of setting ``name``: the innermost ``scope``'s, else ``set``'s, else the
    environment variable's, else the default."""
    if name not in _SETTINGS:
        raise ConfigError(f"keras_fancyrnn.config.get: no setting named {name!r}; the settings "
                          f"are {', '.join(sorted(_SETTINGS))}")
    scoped = _scoped.get()
    if name in scoped:
        return scoped[name]
    if name in _process:
        return _process[name]
    variable, default, _ = _SETTINGS[name]
    if os.environ.get(variable):
        return _check(name, os.environ[variable], f"${variable}")
    return default


def set(**settings: Any) -> None:  # noqa: A001 - fr.config.set reads as intended
    """Changes settings for the whole process, e.g. ``set(recurrent_product="eigen")``."""
    for name, value in settings.items():
        _check(name, value, "keras_fancyrnn.config.set")
    _process.update(settings)


def reset() -> None:
    """Forgets every ``set``: settings come from the environment or their defaults again."""
    _process.clear()


@contextlib.contextmanager
def scope(**settings: Any) -> Iterator[None]:
    """Changes settings inside a ``with`` block (this thread or task only), e.g.
    ``with scope(recurrent_product="avx2"): ...``."""
    for name, value in settings.items():
        _check(name, value, "keras_fancyrnn.config.scope")
    token = _scoped.set(types.MappingProxyType({**_scoped.get(), **settings}))
    try:
        yield
    finally:
        _scoped.reset(token)


def guard_removed(module_name: str, removed: dict[str, str],
                  gone: dict[str, str] | None = None) -> None:
    """Makes reading or assigning a module global that became a setting (``removed``: global ->
    setting) or was removed (``gone``: global -> why) an error that says so, instead of an
    assignment that silently does nothing."""
    gone = gone or {}

    def message(name):
        if name in gone:
            return f"{module_name}.{name} was removed: {gone[name]}"
        return (f"{module_name}.{name} is now the keras_fancyrnn.config setting "
                f"{removed[name]!r}: use fr.config.set({removed[name]}=...) or "
                f"fr.config.scope({removed[name]}=...)")

    class Guarded(types.ModuleType):
        def __setattr__(self, name, value):
            if name in removed or name in gone:
                raise AttributeError(message(name))
            super().__setattr__(name, value)

        def __getattr__(self, name):
            if name in removed or name in gone:
                raise AttributeError(message(name))
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    sys.modules[module_name].__class__ = Guarded
