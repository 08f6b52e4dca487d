"""C++ ops for the recurrences on a CPU: whole sequences, and the gate part of single steps.

The library's build and load are in ``keras_fancyrnn.ops.build``, the ops' gradients (and, as
their second derivatives, the same equations in TensorFlow ops) in
``keras_fancyrnn.ops.gradients``; this module holds the Python wrappers of the ops.

On a CPU a recurrent step is a small matmul and 10–20 small element-wise ops, and at the sizes
people train (batch 64, 128 units) each op costs more in TensorFlow's per-op overhead than in
arithmetic. Two kinds of kernels remove that:

- ``kernels/sequence.cc``: every timestep of an LSTM, GRU (either ``reset_after``) or tanh or
  ReLU SimpleRNN in one op (``lstm_sequence``, ``gru_sequence``, ``gru_before_sequence``,
  ``rnn_sequence``), and the step-by-step part of its gradient in another, which also sums the
  bias gradient. The forward op takes the layer's batch-major ``x`` and ``W`` and computes
  ``x W`` itself, a few steps ahead of the recurrence, writing its ``[T, B, ...]`` outputs only
  where an op of the graph reads them (a gradient does; inference need not). ``project``
  (``x W`` for all timesteps, time-major) is the gradient of ``x``, and the weight gradients
  ``dW`` and ``dU`` are ops of their own after the gradient op (``kernels/outer_sum.h``;
  registered in ``gradients.py``). Masks
  and the monitor's probes run in them too; the engine runs them wherever it does not need its
  loop (truncation, recurrent dropout, ``unroll``; benchmarks/sequence_kernels.py).
- ``kernels/norms.cc``: the norm of every row of a matrix (``row_norms``), the monitor's
  per-step gradient norms in one pass.
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
"""

from __future__ import annotations

import keras

from keras_fancyrnn import config
from keras_fancyrnn.ops import gradients
from keras_fancyrnn.ops.build import (  # noqa: F401  (this module's public names)
    compiler,
    library,
    load_error,
    product,
    products,
    usable,
)


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


def project(x, kernel, go_backwards=False):
    """``x W`` for batch-major ``x`` ``[B, T, D]``, time-major: ``[T, B, n]``, the steps in
    reverse order with ``go_backwards``. One op (``KerasFancyrnnProject``) in place of a
    transpose and a matmul, with its gradient registered in ``keras_fancyrnn.ops.gradients``
    (the same op for ``x``); the sequence ops' gradients of ``x`` run it."""
    return library().keras_fancyrnn_project(x, kernel, reverse_1=go_backwards, **_attrs())


def row_norms(x):
    """``‖x[r, :]‖₂`` ``[R]`` of every row of ``x`` ``[R, W]`` (float32 or float64), without
    underflow for tiny rows (``kernels/norms.cc``). No gradient: the monitor reads its
    gradient norms, it does not differentiate them."""
    return library().keras_fancyrnn_row_norms(x)


def _attrs() -> dict:
    """The attrs every sequence op and the projection take from the settings now: ``product``
    (``recurrent_product``) and ``spin`` (``spinning_workers``)."""
    return {"product": product(), "spin": config.get("spinning_workers")}


def _bias(bias, w):
    """The bias input of a sequence kernel: ``bias``, or zeros as wide as ``w``'s rows (``W``'s
    columns)."""
    from keras_fancyrnn._tf import tf

    if bias is None:
        return tf.zeros(tf.shape(w)[-1:], w.dtype)
    return tf.convert_to_tensor(bias, w.dtype)


def _extras(w, mask, probes, states: int):
    """The mask and probe inputs every sequence kernel takes after its own: ``mask`` ``[T, B]``
    (bool) and ``probes[i]`` ``[T, B, H]`` (of ``w``'s dtype) for each of the first ``states``
    states, each the empty marker where absent."""
    from keras_fancyrnn._tf import tf

    probes = probes or {}
    unknown = set(probes) - set(range(states))
    if unknown:
        raise ValueError(f"probes: state indices {sorted(unknown)} do not exist; this kernel "
                         f"has {states} state(s)")
    mask = tf.zeros([0], tf.bool) if mask is None else tf.cast(mask, tf.bool)
    return [mask] + [tf.zeros([0], w.dtype) if probes.get(i) is None
                     else tf.convert_to_tensor(probes[i], w.dtype) for i in range(states)]


def lstm_sequence(x, w, h0, c0, u, b=None, mask=None, probes=None, go_backwards=False):
    """All steps of an LSTM: ``(h [T, B, H], [h_T, c_T])`` from the batch-major input ``x``
    ``[B, T, D]``, processed last step first with ``go_backwards``, the input kernel ``w``
    ``[D, 4H]``, the initial states ``h0``, ``c0``, the recurrent kernel ``u`` and the bias
    ``b`` (``None``: none). The op projects ``x`` itself, a few steps ahead of the recurrence
    (``x W`` for all steps is never held where no gradient needs it). ``mask`` ``[T, B]``
    (time-major, in processing order): at a false step a row keeps its states (the returned
    ``h`` is the state sequence; the layer makes the outputs). ``probes``: ``{0: [T, B, H],
    1: [T, B, H]}`` added to ``h_t`` / ``c_t`` (before ``c_t`` feeds ``h_t``) at unmasked steps:
    their gradients are ``∂ℓ/∂h_t`` and ``∂ℓ/∂c_t``."""
    from keras_fancyrnn._tf import tf

    w = tf.convert_to_tensor(w)
    _, h, _, h_last, c_last = library().keras_fancyrnn_lstm_sequence(
        x, w, h0, c0, u, _bias(b, w), *_extras(w, mask, probes, 2), reverse=go_backwards,
        **_attrs())
    return h, [h_last, c_last]


def gru_sequence(x, w, h0, u, b_rec=None, b_in=None, mask=None, probes=None,
                 go_backwards=False):
    """All steps of a GRU (``reset_after=True``): ``(h [T, B, H], [h_T])`` from ``x`` and ``w``
    ``[D, 3H]`` as ``lstm_sequence``'s, ``h0``, the recurrent kernel ``u``, the recurrent bias
    ``b_rec`` and the input bias ``b_in`` (``None``: none); ``mask``, ``probes`` and
    ``go_backwards`` as ``lstm_sequence``'s."""
    from keras_fancyrnn._tf import tf

    w = tf.convert_to_tensor(w)
    h, _, h_last, _ = library().keras_fancyrnn_gru_sequence(
        x, w, h0, u, _bias(b_rec, w), _bias(b_in, w), *_extras(w, mask, probes, 1),
        reverse=go_backwards, **_attrs())
    return h, [h_last]


def gru_before_sequence(x, w, h0, u, b=None, mask=None, probes=None, go_backwards=False):
    """All steps of a GRU with ``reset_after=False`` (the reset gate before the product):
    ``(h [T, B, H], [h_T])`` from ``x`` and ``w`` ``[D, 3H]`` as ``lstm_sequence``'s, ``h0``,
    ``u`` and the bias ``b`` (``None``: none); ``mask``, ``probes`` and ``go_backwards`` as
    ``lstm_sequence``'s."""
    from keras_fancyrnn._tf import tf

    w = tf.convert_to_tensor(w)
    h, _, _, h_last, _ = library().keras_fancyrnn_gru_before_sequence(
        x, w, h0, u, _bias(b, w), *_extras(w, mask, probes, 1), reverse=go_backwards,
        **_attrs())
    return h, [h_last]


def rnn_sequence(x, w, h0, u, activation="tanh", b=None, mask=None, probes=None,
                 go_backwards=False):
    """All steps of a SimpleRNN with ``activation`` ``"tanh"`` or ``"relu"``:
    ``(h [T, B, H], [h_T])`` from ``x`` and ``w`` ``[D, H]`` as ``lstm_sequence``'s and the
    bias ``b`` (``None``: none); ``mask``, ``probes`` and ``go_backwards`` as
    ``lstm_sequence``'s."""
    from keras_fancyrnn._tf import tf

    w = tf.convert_to_tensor(w)
    h, h_last, _ = library().keras_fancyrnn_rnn_sequence(
        x, w, h0, u, _bias(b, w), *_extras(w, mask, probes, 1), activation=activation,
        reverse=go_backwards, **_attrs())
    return h, [h_last]


if keras.config.backend() == "tensorflow":
    gradients.register()

config.guard_removed(__name__, {"ENABLED": "native_kernels", "SEQUENCES": "sequence_kernels"})
