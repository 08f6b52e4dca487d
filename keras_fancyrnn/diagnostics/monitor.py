r"""``GradientNormMonitor``: the per-timestep gradient-norm curve ‖∂ℓ/∂h_t‖, recorded during fit.

Long (over 400 lines): one callback with its schedule, results and a runnable example of its use
outside ``fit`` in its docstring; its data sources are ``sources``.

Definition. For a monitored recurrent layer and each timestep ``t`` (index in input
order, also for a backward direction), the recorded value is

.. math::  g_t = \frac{1}{c_t} \sum_{i:\, m_{i,t}} \left\lVert
           \frac{\partial \ell_i}{\partial h_t^{(i)}} \right\rVert_2

where :math:`\ell_i` is example ``i``'s loss under the model's compiled loss (the loss of a batch
holding only example ``i``, sample weights and masks included) and :math:`h_t` is the hidden state
the step outputs; the sum runs over the :math:`c_t` examples whose step ``t`` the layer's mask
leaves valid (all ``B`` without a mask; ``<layer>/count`` holds :math:`c_t`, NaN marks a step no
example reaches; ``align="end"`` lines examples up at their last valid step instead, see the
``aggregate`` module). It is the *total* derivative through the recurrence (BPTT,
:math:`\partial\ell/\partial h_t = \text{direct}_t + J_{t+1}^\top \partial\ell/\partial h_{t+1}`),
read off a zero probe :math:`p_t` that the engine adds to :math:`h_t` after each step:
:math:`\partial\ell/\partial p_t = \partial\ell/\partial h_t`. Because every :math:`\ell_i` depends
only on example ``i``, one backward pass of :math:`\sum_i \ell_i` gives all of them, and the mean
over valid examples does not depend on the probe batch size, nor on how the batch is padded.

Series keys (``name``, ``name/cell``, ``name/forward``, ``name/input`` …): ``targets``; how the
probe pass measures them and what it leaves untouched: ``probe_pass``; ``ℓ_i``: ``losses``; the
derived scalars, per example: ``aggregate`` and ``series``; files, TensorBoard and plots:
``reporting``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable

import keras
import numpy as np
from keras import ops

from keras_fancyrnn.diagnostics import reporting
from keras_fancyrnn.diagnostics.aggregate import check_align, count_key
from keras_fancyrnn.diagnostics.findings import Finding, diagnose
from keras_fancyrnn.diagnostics.probe_pass import (
    ProbePass,
    _check_loss,
    _check_stateful_batch,
    check_probe_dtype,
)
from keras_fancyrnn.diagnostics.series import (
    LOG_MODES,
    _clipping_stats,
    clip_scalars,
    fit_log_entries,
    headline_keys,
)
from keras_fancyrnn.diagnostics.sources import check_batched, make_source
from keras_fancyrnn.diagnostics.targets import _as_selection, discover
from keras_fancyrnn.errors import LayerSelectionError

_log = logging.getLogger("keras_fancyrnn.diagnostics")

#: Records per ``every_n_batches`` when neither ``every_n_batches`` nor ``every_n_epochs`` is given.
DEFAULT_EVERY_N_BATCHES = 100


def _positive_int_or_none(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
    return value


class GradientNormMonitor(keras.callbacks.Callback):
    r"""Records the per-timestep gradient-norm curve ‖∂ℓ/∂h_t‖ of recurrent layers during fit.

    .. math::  g_t = \tfrac{1}{B}\textstyle\sum_i \lVert \partial\ell_i/\partial h_t^{(i)}\rVert_2

    the total derivative through the recurrence (the engine's zero probe), mean over the examples
    of the probe batch whose step ``t`` is unmasked, so independent of the batch's size and
    padding (see the ``targets`` module's docstring for the keys: ``name``, ``name/cell``,
    ``name/forward``, ``name/input`` …; a layer that receives a mask also gets
    ``name/count``, the number of examples valid at each ``t``).

    Args:
        data: the probe batch: ``(x, y)`` or ``(x, y, sample_weight)`` arrays (used whole, every
            record), a ``tf.data.Dataset`` of such batches (one batch per record, cycled), or a
            callable returning one.
        layers: ``None`` (every recurrent layer, nested models and wrappers included), or layer
            names / layer objects / any key the monitor reports (``"branch_a/top"``,
            ``"bi/forward"``); a non-recurrent layer taking a sequence gets its ``/input``.
            Keras's own recurrent layers (``keras.layers.LSTM`` …) are measured like fr layers,
            with no conversion by the user: the pass runs them as fr layers on their own
            variables (``probe_model``); one it cannot reach is named in one warning.
        every_n_batches: record every ``n`` training steps (counted across epochs and fits).
        every_n_epochs: record at the end of every ``n``-th epoch. With neither given,
            ``every_n_batches=100`` (``DEFAULT_EVERY_N_BATCHES``).
        record_at_train_begin: also record at the start of ``fit`` (the curve at initialisation).
        input_norms: also record ``name/input`` for every monitored layer.
        log_dir: write TensorBoard summaries under ``log_dir/gradient_norms``.
        csv_path / npz_path: write every record to disk as it is taken.
        log_scalars: what goes into the batch logs of a recording step and every epoch's logs
            (so into the progress bar, ``History``, ``CSVLogger``): ``True`` (default) the
            ``grad_ratio`` of one series per monitored layer (its hidden state, or its input
            where that is all it has); ``"all"`` every derived scalar and
            the ``clip/…`` statistics; ``False`` none. ``monitor.scalars`` and TensorBoard always
            get all of them. The clipping statistics are logged by ``fr.ClippingStats``.
        loss: optional ``fn(y_true, y_pred) -> [batch]`` per-example losses, instead of the
            model's compiled loss.
        probe_dtype: ``None`` (the model's own precision) or ``"float64"``: each record runs a
            float64 copy of the model (weights copied, cast, before every record; the training
            model is untouched), whose backward pass follows a vanishing gradient below float32's
            range. In float32 the backward pass itself underflows: TensorFlow flushes denormals to
            zero, so a curve stops at exact zeros near 1.2e-38. ``history`` is then float64.
        align: ``"time"`` (default): index ``t`` is step ``t`` of every example; ``"end"``: each
            example's last valid step lands on the last index, so index ``T - 1 - k`` is ``k``
            steps before each example's end (padded text, where the loss reads the last state).
        kernel_norms: also record ``name/recurrent_kernel`` for every fr layer: per ``t`` the
            Frobenius norm of step ``t``'s term of the recurrent kernel's BPTT gradient (which
            timesteps the update of ``U`` learns from; ``targets`` module). Costs memory
            ``T × U.size`` in the probe pass.

    Attributes: ``history`` (``{key: [n_records, T]}``), ``steps``, ``epochs``, ``scalars``
    (``{name: [n_records]}``); ``plot()`` draws them; ``summary()`` diagnoses them (vanishing or
    exploding gradients, saturated tanh units, and what to do: the ``findings`` module);
    ``record()`` takes one now; ``compute(x, y)`` returns curves without recording.

    Outside ``fit`` (a custom training loop): ``set_model(model)`` instead of ``callbacks=``,
    ``record(step)`` where the loop wants a record, ``loss=`` where the model is not compiled,
    and the optimizer's clipping statistics passed to ``record`` (``fit`` reads them from
    ``model.optimizer``)::

        >>> import keras, numpy as np, tensorflow as tf
        >>> import keras_fancyrnn as fr
        >>> x = np.random.default_rng(0).uniform(size=(16, 10, 2)).astype("float32")
        >>> y = x[:, -3:, :1].sum(axis=1)  # [16, 1]
        >>> model = keras.Sequential([keras.Input((10, 2)), fr.SimpleRNN(8, name="rnn"),
        ...                           keras.layers.Dense(1)])
        >>> def per_example(y_true, y_pred):  # [batch] losses
        ...     return tf.reduce_mean((y_true - y_pred) ** 2, axis=-1)
        >>> optimizer = fr.ClippingOptimizer(keras.optimizers.SGD(0.05), threshold=1.0)
        >>> monitor = fr.GradientNormMonitor((x[:8], y[:8]), loss=per_example)
        >>> monitor.set_model(model)
        >>> for step in range(3):
        ...     with tf.GradientTape() as tape:
        ...         loss = tf.reduce_mean(per_example(y, model(x, training=True)))
        ...     grads = tape.gradient(loss, model.trainable_variables)
        ...     optimizer.apply(grads, model.trainable_variables)
        ...     curves = monitor.record(step, clip_stats=optimizer.stats())
        >>> monitor.history["rnn"].shape, monitor.steps.tolist()
        ((3, 10), [0, 1, 2])
        >>> float(monitor.scalars["clip/applied_steps"][-1])
        3.0

    One curve without a monitor: ``fr.gradient_norms(model, x, y, loss=per_example)``
    (examples/custom_loop_monitor.py is a whole program).

    Put the monitor before callbacks that should see its logs (``CSVLogger``, ``TensorBoard``,
    ``EarlyStopping``); Keras's ``History`` and progress bar come after user callbacks anyway.
    Cost: one forward + backward pass on the probe batch per record (about two training steps
    for a probe batch twice the training batch) every ``every_n_batches``
    (benchmarks/monitor_overhead.py measures it).
    """

    def __init__(
        self,
        data,
        layers=None,
        every_n_batches: int | None = None,
        every_n_epochs: int | None = None,
        record_at_train_begin: bool = True,
        input_norms: bool = True,
        log_dir: str | None = None,
        csv_path: str | None = None,
        npz_path: str | None = None,
        log_scalars: bool | str = True,
        loss: Callable | None = None,
        probe_dtype: str | None = None,
        align: str = "time",
        kernel_norms: bool = False,
    ):
        super().__init__()
        self.every_n_batches = _positive_int_or_none("every_n_batches", every_n_batches)
        self.every_n_epochs = _positive_int_or_none("every_n_epochs", every_n_epochs)
        if self.every_n_batches is None and self.every_n_epochs is None:
            self.every_n_batches = DEFAULT_EVERY_N_BATCHES
        if layers is not None:
            _as_selection(layers)
        self.layers = layers
        self.record_at_train_begin = bool(record_at_train_begin)
        self.input_norms = bool(input_norms)
        if not any(log_scalars is m or (isinstance(m, str) and log_scalars == m)
                   for m in LOG_MODES):
            raise ValueError(f"log_scalars must be True, 'all' or False, got {log_scalars!r}")
        self.log_scalars = log_scalars
        self.loss = loss
        self.probe_dtype = check_probe_dtype(probe_dtype)
        self.align = check_align(align)
        self.kernel_norms = bool(kernel_norms)
        self._source = make_source(data, lambda: self._model)
        self._csv = reporting.CSVWriter(csv_path) if csv_path else None
        self._npz = reporting.NPZWriter(npz_path) if npz_path else None
        self._tb = reporting.TensorBoardWriter(log_dir) if log_dir else None
        self._probe: ProbePass | None = None
        self._probe_model = None
        self._curves: dict[str, list[np.ndarray]] = {}
        self._scalars: dict[str, list[float]] = {}
        self._steps: list[int] = []
        self._epochs: list[int] = []
        self._latest_scalars: dict[str, float] = {}
        self._global_step = 0
        self._batches_in_epoch = 0
        self._epoch = 0
        self._last_record_step: int | None = None
        self._reported: set = set()  # (kind, series) of the findings logged so far

    # -- recording -------------------------------------------------------------------------
    def _ensure_probe(self):
        model = self.model
        if model is None:
            raise ValueError("GradientNormMonitor has no model: pass it to fit() or set_model()")
        if self._probe is None or self._probe_model is not model:
            _check_loss(model, self.loss)
            targets = discover(model, self.layers, self.input_norms)
            for t in targets:
                t.kernel = self.kernel_norms
            if not targets:
                raise LayerSelectionError(
                    f"layers: the model {model.name!r} has no recurrent layer to monitor; pass "
                    "layers=[...] to name layers that take a sequence"
                )
            if self._source.spec is not None:  # now the model's input ranks can tell
                check_batched(*self._source.spec, model=model)
            # before the first record, which may be many steps into fit
            _check_stateful_batch(model, self._source.static_batch)
            self._probe = ProbePass(model, targets, self.loss, self.align,
                                    dtype=self.probe_dtype)
            self._probe_model = model
        return self._probe

    def _loss_scale(self) -> float:
        optimizer = getattr(self.model, "optimizer", None)
        scale = getattr(optimizer, "dynamic_scale", None)
        if scale is None or not any(
            getattr(t.layer, "compute_dtype", "float32") == "float16" for t in self._probe.targets
        ):
            return 1.0
        return float(ops.convert_to_numpy(scale))

    def compute(self, x, y, sample_weight=None) -> dict[str, np.ndarray]:
        """The curves for one batch, without recording them."""
        probe = self._ensure_probe()
        return probe(x, y, sample_weight, self._loss_scale())

    def record(self, step: int | None = None, clip_stats=None) -> dict[str, np.ndarray]:
        """Takes one record now (next probe batch) and writes it; returns ``{key: [T]}``.

        ``step``: the training step to file it under (default: the steps ``fit`` counted).
        ``clip_stats``: a ``ClippingOptimizer``'s ``stats()`` (any ``{name: number}``), recorded
        as ``clip/<name>``; by default they are read from ``model.optimizer`` where that is (or
        wraps) a ``ClippingOptimizer``. A custom loop that applies its optimizer itself passes
        them here (class docstring).
        """
        extra = None if clip_stats is None else clip_scalars(clip_stats)
        probe = self._ensure_probe()
        x, y, sw = self._source.next()
        measured = probe.measure(x, y, sw, self._loss_scale())
        curves = measured.curves(self.align)
        step = self._global_step if step is None else int(step)
        scalars = measured.scalars()
        scalars.update(_clipping_stats(getattr(self.model, "optimizer", None))
                       if extra is None else extra)
        n = len(self._steps)
        for k, c in curves.items():
            self._curves.setdefault(k, [None] * n).append(c)
        for k in self._curves:
            if len(self._curves[k]) == n:  # a series missing from this record
                self._curves[k].append(None)
        for k, v in scalars.items():
            self._scalars.setdefault(k, [math.nan] * n).append(v)
        for k in self._scalars:
            if len(self._scalars[k]) == n:
                self._scalars[k].append(math.nan)
        self._steps.append(step)
        self._epochs.append(self._epoch)
        self._latest_scalars = scalars
        self._last_record_step = step
        if self._csv is not None:
            self._csv.write(step, self._epoch, curves)
        if self._npz is not None:
            self._npz.write(self.steps, self.epochs, self.history)
        if self._tb is not None:
            self._tb.write(step, curves, scalars)
        for finding in self.summary():  # each kind of finding logged once, when it appears
            if (finding.kind, finding.series) not in self._reported:
                self._reported.add((finding.kind, finding.series))
                _log.warning("GradientNormMonitor: %s", finding.text)
        return curves

    def summary(self) -> list[Finding]:
        """The diagnosis of the latest records: vanishing or exploding gradients, saturated
        tanh units, each a ``Finding`` with its numbers, remedies and ``text`` (thresholds and
        their reasons: the ``findings`` module). One series per monitored layer is judged (its
        hidden state, or its input), plus the clipping statistics. ``[]`` before a record."""
        if not self._steps or self._probe is None:
            return []
        targets = self._probe.targets
        layers = {key: t.layer for t in targets for key in headline_keys([t])}
        return diagnose(self.history, self.scalars, self.steps, layers)

    def _fit_log_entries(self) -> dict[str, float]:
        if self._probe is None:
            return {}
        return fit_log_entries(self._latest_scalars, self._probe.targets, self.log_scalars)

    # -- results ---------------------------------------------------------------------------
    @property
    def history(self) -> dict[str, np.ndarray]:
        """``{key: float32 [n_records, T]}`` (float64 with ``probe_dtype="float64"``); NaN where a
        record lacks a timestep or series."""
        out = {}
        for k, rows in self._curves.items():
            width = max((len(r) for r in rows if r is not None), default=0)
            arr = np.full((len(rows), width), np.nan,
                          dtype=np.float64 if self.probe_dtype == "float64" else np.float32)
            for i, r in enumerate(rows):
                if r is not None:
                    arr[i, : len(r)] = r
            out[k] = arr
        return out

    @property
    def steps(self) -> np.ndarray:
        """The training step (optimizer updates so far) of each record."""
        return np.asarray(self._steps, dtype=np.int64)

    @property
    def epochs(self) -> np.ndarray:
        """The (0-based) epoch during which each record was taken."""
        return np.asarray(self._epochs, dtype=np.int64)

    @property
    def scalars(self) -> dict[str, np.ndarray]:
        """Derived scalars per record: ``{key/grad_ratio, key/grad_decay, clip/…: [n_records]}``."""
        return {k: np.asarray(v, dtype=np.float64) for k, v in self._scalars.items()}

    def plot(self, path: str | None = None, keys: Iterable[str] | None = None):
        """Heatmap (record × timestep, log colour scale) and the first and latest curves, one row
        per series (by default not the ``/count`` series). Saves to ``path`` if given; returns the
        matplotlib ``Figure``."""
        history = self.history
        if keys is None and self._probe is not None:
            counts = {count_key(t.key) for t in self._probe.targets}
            history = {k: v for k, v in history.items() if k not in counts}
        if not history:
            raise ValueError("plot: nothing recorded yet")
        if keys is not None:
            keys = list(keys)
            unknown = [k for k in keys if k not in history]
            if unknown:
                raise ValueError(f"keys: {unknown} not recorded; recorded: {sorted(history)}")
            history = {k: history[k] for k in keys}
        return reporting.plot_history(self.steps, history, path)

    # -- callback hooks --------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._ensure_probe()
        optimizer = getattr(self.model, "optimizer", None)
        iterations = getattr(optimizer, "iterations", None)
        if iterations is not None:
            with contextlib.suppress(TypeError, ValueError):
                self._global_step = int(ops.convert_to_numpy(iterations))
        self._batches_in_epoch = 0
        if self.record_at_train_begin:
            self.record()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        self._batches_in_epoch = 0

    def on_train_batch_end(self, batch, logs=None):
        done = int(batch) + 1
        before = self._global_step
        self._global_step += max(done - self._batches_in_epoch, 0)
        self._batches_in_epoch = done
        n = self.every_n_batches
        if n and self._global_step // n > before // n and self._last_record_step != (
            self._global_step
        ):
            self.record()
            if logs is not None:
                logs.update(self._fit_log_entries())

    def on_epoch_end(self, epoch, logs=None):
        n = self.every_n_epochs
        if n and (int(epoch) + 1) % n == 0 and self._last_record_step != self._global_step:
            self.record()
        if logs is not None:
            logs.update(self._fit_log_entries())


__all__ = ["DEFAULT_EVERY_N_BATCHES", "GradientNormMonitor"]
