"""Probe requests: how the gradient monitor (or a test) asks the engine for ∂ℓ/∂h_t.

A probe is a tensor ``p`` added to a state after each step (``h_t + p_t``) or to a layer's
input; with ``p = 0`` the values are unchanged and ``∂ℓ/∂p_t`` is the total derivative
``∂ℓ/∂h_t`` through the recurrence. Inside ``scope({layer: request})`` each call of ``layer``
(a ``keras_fancyrnn.RNN``) asks ``request`` for its probes, and the engine adds them:

    with tf.GradientTape() as tape, probes.scope({layer: zeros}):
        y = model(x)

``request`` is either a mapping of given tensors, or a function ``request(layer, sequences,
mask)`` called when the layer runs (so that probes can be shaped like its input, and the
caller learns which steps are valid: ``mask`` is the layer's ``[B, T]`` mask or ``None``) that
returns one. Its keys: a state index (0 for ``h``, 1 for the LSTM's ``c`` …; ``[B, T, S_i]``,
in input time order), ``"input"`` (``[B, T, D]``, added to the input sequence),
``"recurrent_kernel"`` (``[T, H, P]``, the recurrent kernel's shape per step, in input time
order: ``E_t`` is added to the kernel at step ``t`` only, so ``∂ℓ/∂E_t`` is that step's term of
``∂ℓ/∂U``) or ``"states_out"`` (a list to which the layer's loop appends its outputs
``[B, T, H]`` in input time order; at a masked step the previous output, or zeros). A function
may return an empty mapping (no probes for that call, e.g. the second call of a shared layer).

The scope is seen by the code in its ``with`` block (this thread or task), not by other threads.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

Request = Mapping[Any, Any] | Callable[[Any, Any], Mapping[Any, Any]]

_requests: contextvars.ContextVar[Mapping[int, tuple[Any, Request]]] = contextvars.ContextVar(
    "keras_fancyrnn_probes", default=types.MappingProxyType({}))


@contextlib.contextmanager
def scope(requests: Mapping[Any, Request]) -> Iterator[None]:
    """Probes for the layers in ``requests`` (layer -> request, module docstring) inside the
    ``with`` block; scopes nest, the inner request for a layer replacing the outer."""
    merged = {**_requests.get(), **{id(layer): (layer, r) for layer, r in requests.items()}}
    token = _requests.set(types.MappingProxyType(merged))
    try:
        yield
    finally:
        _requests.reset(token)


def for_call(layer, sequences, mask=None) -> dict:
    """The probes ``layer`` adds in this call (with this ``mask``): ``{}`` where none are
    requested."""
    entry = _requests.get().get(id(layer))
    if entry is None or entry[0] is not layer:
        return {}
    request = entry[1]
    return dict(request(layer, sequences, mask) if callable(request) else request)
