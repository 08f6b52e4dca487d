"""The gradients of the kernels' ops, and theirs.

The backward kernels give first derivatives; their own gradients (second derivatives, e.g. a
gradient penalty) are the same equations written with TensorFlow ops here, so every order is
exact. Long (over 400 lines): those equations for every op (the weight gradients' among them,
which also stand in for their ops under float64 and Eigen's product), each next to its
registration; split, each registration would import its equations from another module.
"""

from __future__ import annotations

import functools

from keras_fancyrnn.ops.build import library, products

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


def _recurrent_kernel_gradient(op, h0, h, dz):
    """``sum_t h_{t-1}^T dz_t`` (``h_{-1} = h0``) for the sequence op ``op``: the weight
    gradient kernel, with ``op``'s product and workers (see ``_register_blocks``)."""
    if _register_blocks(op, dz.dtype):
        du = library().keras_fancyrnn_recurrent_weight_grad(h0, h, dz, **_kernel_attrs(op))
    else:
        du = recurrent_kernel_gradient_reference(h0, h, dz)
    du.set_shape([h0.shape[-1], dz.shape[-1]])
    return du


def _register_blocks(op, dtype) -> bool:
    """Whether the weight gradient kernels run a register block for ``op``'s product: float32,
    and ``avx512`` or ``avx2`` (``auto``: the widest this CPU runs). For float64 and Eigen's
    product they would run one Eigen product on one thread, so TensorFlow's matmuls (on all of
    its threads) take those."""
    from keras_fancyrnn._tf import tf

    product = _attr(op, "product")
    if product == "auto":
        product = (products() or ["eigen"])[0]
    return dtype == tf.float32 and product != "eigen"


def recurrent_kernel_gradient_reference(h0, h, dz):
    """``sum_t h_{t-1}^T dz_t`` (``h_{-1} = h0``) in TensorFlow ops: ``h0^T dz_0`` plus one
    ``[H, (T-1)·B] x [(T-1)·B, n]`` matmul over slices, which share the sequences' memory (a
    concatenation ``[h0, h_0, ...]`` would copy all of ``h``). The equations of
    ``KerasFancyrnnRecurrentWeightGrad``, and its gradient."""
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


def _kernel_attrs(op) -> dict:
    """A forward op's ``product`` and ``spin`` attrs, for its gradient op."""
    return {"product": _attr(op, "product"), "spin": op.get_attr("spin")}


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
    # through time and sum the bias gradients; the recurrent kernel's gradient is one op of
    # its own here (KerasFancyrnnRecurrentWeightGrad).

    # Gradients of sequence outputs nobody used (None in a graph) go to the kernels as empty
    # markers, not as [T, B, ...] zeros: a layer that returns only its final state then sends no
    # sequence-sized gradient back.

    # Each forward kernel's last inputs are its mask (no gradient) and probes, whose gradients
    # are the backward kernel's last outputs.

    # Each forward op projects its inputs itself: the gradient of x W (dz, dxp), which the
    # projection's gradient takes on to x and W.

    @tf.RegisterGradient("KerasFancyrnnLstmSequence")
    def _lstm_sequence(op, dz, dh, dc, dh_last, dc_last):
        x, w, h0, c0, u, _, *extras = op.inputs
        z, h, c, *last = op.outputs
        dh_last, dc_last = _zeros_for_none((dh_last, dc_last), last)
        dz, dh0, dc0, db, *dprobes = library().keras_fancyrnn_lstm_sequence_grad(
            _optional(dh, h), _optional(dc, c), _optional(dz, z), z, c, c0, u, dh_last, dc_last,
            *extras, **_kernel_attrs(op))
        du = _recurrent_kernel_gradient(op, h0, h, dz)
        return (*_input_gradients(op, dz), dh0, dc0, du, db, None, *dprobes)

    @tf.RegisterGradient("KerasFancyrnnGruSequence")
    def _gru_sequence(op, dh, drec, dh_last, dxp_out):
        _, _, h0, u, _, b_in, *extras = op.inputs
        h, rec, last, xp = op.outputs
        (dh_last,) = _zeros_for_none((dh_last,), (last,))
        dxp, drec, dh0, db_in, db_rec, dprobe = library().keras_fancyrnn_gru_sequence_grad(
            _optional(dh, h), _optional(drec, rec), xp, rec, h, h0, u, dh_last, b_in, *extras,
            **_kernel_attrs(op))
        du = _recurrent_kernel_gradient(op, h0, h, drec)
        return (*_input_gradients(op, _plus(dxp, dxp_out)), dh0, du, db_rec, db_in, None,
                dprobe)

    @tf.RegisterGradient("KerasFancyrnnGruBeforeSequence")
    def _gru_before_sequence(op, dh, drec, drh, dh_last, dxp_out):
        _, _, h0, u, b, *extras = op.inputs
        h, rec, rh, last, xp = op.outputs
        (dh_last,) = _zeros_for_none((dh_last,), (last,))
        dxp, drec, dh0, db, dprobe = library().keras_fancyrnn_gru_before_sequence_grad(
            _optional(dh, h), _optional(drec, rec), _optional(drh, rh), xp, rec, h, h0, u,
            dh_last, b, *extras, **_kernel_attrs(op))
        # rec = [h_{t-1} U_z, h_{t-1} U_r, rh_t U_h]
        units = h.shape[-1]
        du_h = tf.matmul(tf.reshape(rh, [-1, units]), tf.reshape(drec[..., 2 * units:],
                                                                 [-1, units]), transpose_a=True)
        du_zr = _recurrent_kernel_gradient(op, h0, h, drec[..., :2 * units])
        return (*_input_gradients(op, _plus(dxp, dxp_out)), dh0,
                tf.concat([du_zr, du_h], axis=1), db, None, dprobe)

    @tf.RegisterGradient("KerasFancyrnnRnnSequence")
    def _rnn_sequence(op, dh, dh_last, _):  # act: ReLU's σ(z_t), whose σ' has no gradient
        _, _, h0, u, _, mask, probe = op.inputs
        h, last, act = op.outputs
        (dh_last,) = _zeros_for_none((dh_last,), (last,))
        dz, dh0, db, dprobe = library().keras_fancyrnn_rnn_sequence_grad(
            _optional(dh, h), h, h0, u, dh_last, mask, probe, act,
            activation=_attr(op, "activation"), **_kernel_attrs(op))
        return (*_input_gradients(op, dz), dh0, _recurrent_kernel_gradient(op, h0, h, dz), db,
                None, dprobe)


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


def projection_weight_gradient_reference(x, dy, transpose_w=False, reverse_0=False,
                                         reverse_1=False):
    """The gradient of ``KerasFancyrnnProject``'s ``w`` in TensorFlow ops: one matmul of ``x``'s
    rows, put in ``dy``'s order, with ``dy``'s. The equations of
    ``KerasFancyrnnProjectWeightGrad``, and its gradient."""
    from keras_fancyrnn._tf import tf

    rows = tf.transpose(x, [1, 0, 2])  # rows[q, p] = x[p, q]
    reversed_axes = [a for a, r in ((0, reverse_1), (1, reverse_0)) if r]
    if reversed_axes:
        rows = tf.reverse(rows, reversed_axes)
    rows = tf.reshape(rows, [-1, tf.shape(x)[-1]])
    dy_rows = tf.reshape(dy, [-1, tf.shape(dy)[-1]])
    return (tf.matmul(dy_rows, rows, transpose_a=True) if transpose_w
            else tf.matmul(rows, dy_rows, transpose_a=True))


def _register_projection_gradient():
    """The gradient of ``KerasFancyrnnProject`` (``y[q, p] = x[p', q'] w``, the reverse attrs
    reading an axis of ``x`` backwards): for ``x`` the same op on ``dy`` with ``w`` transposed
    and the reverse attrs swapped; for ``w`` ``KerasFancyrnnProjectWeightGrad``, the sum of
    ``x``'s rows times ``dy``'s in ``y``'s order (or its equations in TensorFlow ops: see
    ``_register_blocks``). Their gradients are these again and TensorFlow's ops, so every order
    is exact."""
    from keras_fancyrnn._tf import tf

    @tf.RegisterGradient("KerasFancyrnnProject")
    def _project(op, dy):
        x, w = op.inputs
        return _projection_gradients(op, x, w, dy, *(op.get_attr(name) for name in
                                                     ("transpose_w", "reverse_0", "reverse_1")))


def _input_gradients(op, dxp):
    """``(dx, dw)`` of a sequence op (inputs ``x`` ``[B, T, D]`` and ``w``, attr ``reverse``) from
    the gradient ``dxp`` ``[T, B, k H]`` of the ``x W`` it computed."""
    x, w = op.inputs[:2]
    return _projection_gradients(op, x, w, dxp, reverse_1=op.get_attr("reverse"))


def _plus(grad, more):
    """``grad + more``, ``more`` a gradient that may be ``None`` (zero)."""
    return grad if more is None else grad + more


def _projection_gradients(op, x, w, dy, transpose_w=False, reverse_0=False, reverse_1=False):
    """``(dx, dw)`` of ``y[q, p] = x[p', q'] w`` (``KerasFancyrnnProject``'s, with its attrs) from
    ``dy``, with ``op``'s product and workers: for ``x`` the same op on ``dy`` with ``w``
    transposed and the reverse attrs swapped; for ``w`` ``KerasFancyrnnProjectWeightGrad`` (or
    its equations in TensorFlow ops: see ``_register_blocks``)."""
    dx = library().keras_fancyrnn_project(dy, w, transpose_w=not transpose_w,
                                          reverse_0=reverse_1, reverse_1=reverse_0,
                                          **_kernel_attrs(op))
    if _register_blocks(op, dy.dtype):
        dw = library().keras_fancyrnn_project_weight_grad(
            x, dy, transpose_w=transpose_w, reverse_0=reverse_0, reverse_1=reverse_1,
            **_kernel_attrs(op))
    else:
        dw = projection_weight_gradient_reference(x, dy, transpose_w, reverse_0, reverse_1)
    dw.set_shape(w.shape)
    return dx, dw


def _register_weight_gradient_gradients():
    """The gradients of the weight gradient kernels: their equations in TensorFlow ops."""
    from keras_fancyrnn._tf import tf

    @tf.RegisterGradient("KerasFancyrnnRecurrentWeightGrad")
    def _recurrent(op, ddu):
        return _vjp(lambda *inputs: [recurrent_kernel_gradient_reference(*inputs)], op.inputs,
                    [ddu])

    @tf.RegisterGradient("KerasFancyrnnProjectWeightGrad")
    def _project(op, ddw):
        attrs = [op.get_attr(name) for name in ("transpose_w", "reverse_0", "reverse_1")]
        return _vjp(lambda x, dy: [projection_weight_gradient_reference(x, dy, *attrs)],
                    op.inputs, [ddw])


def register() -> None:
    """Registers every gradient above with TensorFlow (once, on the TensorFlow backend), and
    ``KerasFancyrnnRowNorms`` as not differentiable (the monitor reads norms, nothing
    differentiates them)."""
    from keras_fancyrnn._tf import tf

    tf.no_gradient("KerasFancyrnnRowNorms")
    _register_projection_gradient()
    _register_gate_gradients()
    _register_sequence_gradients()
    _register_sequence_second_derivatives()
    _register_weight_gradient_gradients()
