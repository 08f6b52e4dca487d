"""``ClippingOptimizer``: a Keras optimizer that clips the gradient with the pure functions of
``optim/clipping.py``, skips non-finite steps, keeps statistics, and hands the result to the
optimizer it wraps, on the TensorFlow, JAX and torch backends. Its arguments are checked in
``optim/arguments.py``; the TensorFlow distribution and XLA parts are in ``optim/replicas.py``, the
other per-backend parts (JAX's skip without a branch, where the step may raise) in
``optim/backends.py``.

Long (over 400 lines): about 110 of them are the class docstring, the user's documentation of
the step, the statistics, the backends, distribution and mixed precision; the code is one step's
orchestration and its state, which would not read better apart.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from keras_fancyrnn.optim import arguments, backends, clipping, replicas

__all__ = ["ClippingOptimizer", "find_clipping_optimizer"]


def _select(items: Sequence[Any], mask: Sequence[bool]) -> list[Any]:
    return [x for x, m in zip(items, mask, strict=True) if m]


def _replace(items: Sequence[Any], mask: Sequence[bool], new: Sequence[Any]) -> list[Any]:
    """``items`` with the entries selected by ``mask`` replaced, in order, by ``new``."""
    new = iter(new)
    return [next(new) if m else x for x, m in zip(items, mask, strict=True)]


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class ClippingOptimizer(keras.optimizers.Optimizer):
    r"""Wrap a Keras optimizer: clip the gradient, skip non-finite steps, and report what happened.

    Each step, with :math:`g` the gradient (summed over replicas under ``tf.distribute``, and
    divided by ``loss_scale_factor`` if one is set):

    1. if ``skip_nonfinite`` and any entry of :math:`g` is ``nan``/``inf``: the step is skipped —
       no variable of the model or of the inner optimizer changes, ``iterations`` does not
       advance — and counted in ``skipped_steps``;
    2. otherwise :math:`g` is clipped by ``method`` and handed to ``inner_optimizer``:

       * ``"global_norm"`` — :func:`clip_by_global_norm`, :math:`g \leftarrow g\,\tau/\lVert g
         \rVert` if :math:`\lVert g \rVert > \tau` (Pascanu et al. 2013); default :math:`\tau = 1`;
       * ``"norm"`` — :func:`clip_by_norm`, every variable's gradient by its own norm;
       * ``"value"`` — :func:`clip_by_value`, every entry to :math:`[-\tau, \tau]`;
       * ``"adaptive"`` — :func:`adaptive_clip`, unit-wise AGC (Brock et al. 2021) with
         :math:`\lambda` = ``threshold`` (default 0.01) and ``eps`` (default 1e-3);
       * ``"auto"`` — AutoClip (Seetharaman et al. 2020): global-norm clipping at the
         ``percentile``-th percentile (default 10) of the last ``history_size`` (default 1000)
         gradient norms, current one included (:func:`autoclip_threshold`); no ``threshold``.

    Statistics, kept as non-trainable optimizer variables (saved with the model, readable at any
    time through :meth:`stats` or the properties of the same names):

    ``grad_norm``
        global norm of the last step's gradient before clipping (``inf``/``nan`` if it was skipped);
    ``clipped_grad_norm``
        global norm of the gradient handed to the inner optimizer (0 for a skipped step);
    ``applied_steps``, ``clipped_steps``, ``skipped_steps``
        steps applied, applied steps where clipping changed the gradient, steps skipped;
    ``clip_rate``
        ``clipped_steps / applied_steps``, the fraction of applied steps that were clipped;
    ``consecutive_skips``
        length of the current run of skipped steps;
    ``norm_history``
        (``"auto"`` only) the ring buffer of gradient norms.

    ``max_consecutive_skips``: on the N-th skipped step in a row the optimizer raises, and from then
    on it refuses every step (the weights stay those of the last finite step) until
    ``optimizer.consecutive_skips.assign(0)``. The error comes from the step where the step can
    raise, else from the :class:`ClippingStats` callback after the batch:

    * TensorFlow without XLA: an in-graph ``tf.debugging.Assert`` stops ``fit`` at that step
      (``tf.errors.InvalidArgumentError``); under ``jit_compile=True`` XLA compiles assertions
      away and the callback raises ``RuntimeError``;
    * JAX: the JAX trainer's step is traced by ``jax.jit`` and cannot raise: the callback raises
      ``RuntimeError``; an ``apply`` run eagerly (outside ``jax.jit``) raises it at the step;
    * torch: the step runs in Python and raises ``RuntimeError`` at that step.

    The callback also raises where the step would have. Use it with XLA and on JAX; the optimizer
    warns when its step is compiled with a limit set and no callback watching.

    Distribution: Keras clips each replica's gradient before the sum (two replicas with gradients 10
    and 20, ``global_clipnorm=1``, lr 1 move a variable by 2). This wrapper all-reduces the gradient
    first, clips the sum (so the move is 1) and skips a step if any replica's gradient is not
    finite. The inner optimizer sums across replicas again; replica 0 hands it the clipped sum and
    the others zeros, so that second sum is exactly the clipped gradient. It costs one extra
    all-reduce of the gradient. With Keras's distribution API on JAX (e.g.
    ``keras.distribution.DataParallel``) the step is one program over the global batch, whose
    gradient is already the whole batch's: it is clipped as on one device.

    Mixed precision: ``model.compile`` wraps the optimizer as
    ``LossScaleOptimizer(ClippingOptimizer(...))`` under the ``"mixed_float16"`` policy, which
    unscales the gradient before it reaches this wrapper: the unscaled gradient is clipped and the
    loss scale is unaffected. Wrapping a ``LossScaleOptimizer`` inside this one is refused (it would
    clip the scaled gradient).

    ``IndexedSlices`` gradients (e.g. from an embedding) are converted to dense tensors. On JAX the
    step also runs inside ``stateless_apply`` (the JAX trainer's): skipping is then a selection
    between the stepped and the skipped values of every variable (``ops.where``), not a branch.

    Args:
        inner_optimizer: the ``keras.optimizers.Optimizer`` to wrap (or a name/config accepted by
            ``keras.optimizers.get``). It must not clip itself nor set ``loss_scale_factor``.
        method: one of :data:`METHODS`.
        threshold: :math:`\tau` (or AGC's :math:`\lambda`); ``None`` takes the method's default.
            Not accepted by ``"auto"``.
        skip_nonfinite: skip steps with a non-finite gradient. If False they are clipped and
            applied as Keras does (a nan norm never exceeds the threshold, so a nan gradient
            reaches the inner optimizer unclipped).
        max_consecutive_skips: raise after this many skipped steps in a row (needs
            ``skip_nonfinite``); ``None`` never raises.
        percentile: AutoClip's :math:`p \in (0, 100]`; only with ``"auto"``.
        history_size: AutoClip's ring buffer length; only with ``"auto"``.
        eps: AGC's :math:`\epsilon`; only with ``"adaptive"``.
        loss_scale_factor: static loss scale (see ``keras.optimizers.Optimizer``); the gradient is
            unscaled before it is clipped.
        name: optimizer name.
    """

    def __init__(
        self,
        inner_optimizer: Any,
        method: str = "global_norm",
        threshold: float | None = None,
        skip_nonfinite: bool = True,
        max_consecutive_skips: int | None = None,
        percentile: float | None = None,
        history_size: int | None = None,
        eps: float | None = None,
        loss_scale_factor: float | None = None,
        name: str | None = None,
        **kwargs: Any,
    ):
        arguments.check_no_base_args(kwargs)
        inner_optimizer = arguments.checked_inner(inner_optimizer)
        threshold, percentile, history_size, eps = arguments.checked_method_args(
            method, threshold, percentile, history_size, eps
        )
        max_consecutive_skips = arguments.checked_skips(skip_nonfinite, max_consecutive_skips)
        if loss_scale_factor is not None:
            loss_scale_factor = arguments.positive("loss_scale_factor", loss_scale_factor)

        super().__init__(learning_rate=0.0, loss_scale_factor=loss_scale_factor, name=name)
        self.inner_optimizer = inner_optimizer
        self.method = method
        self.threshold = threshold
        self.skip_nonfinite = skip_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.percentile = percentile
        self.history_size = history_size
        self.eps = eps
        #: True while something outside the step enforces ``max_consecutive_skips`` by calling
        #: :meth:`check_skip_limit` after every step (``ClippingStats`` sets it during ``fit``);
        #: it silences the warning that a compiled step cannot raise.
        self.skip_limit_checked_outside = False
        self._compiled_warned = False

    # -- state ------------------------------------------------------------------------------------

    def build(self, var_list: Sequence[Any]) -> None:
        def scalar(name: str, dtype: str) -> Any:
            return self.add_variable(
                (), initializer="zeros", dtype=dtype, aggregation="only_first_replica", name=name
            )

        self._grad_norm = scalar("grad_norm", "float32")
        self._clipped_grad_norm = scalar("clipped_grad_norm", "float32")
        self._clip_rate = scalar("clip_rate", "float32")
        self._applied_steps = scalar("applied_steps", "int")
        self._clipped_steps = scalar("clipped_steps", "int")
        self._skipped_steps = scalar("skipped_steps", "int")
        self._consecutive_skips = scalar("consecutive_skips", "int")
        if self.method == "auto":
            self._norm_history = self.add_variable(
                (self.history_size,),
                initializer="zeros",
                dtype="float32",
                aggregation="only_first_replica",
                name="norm_history",
            )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self) -> list[Any]:
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    def _stat(self, name: str) -> Any:
        if not self.built:
            raise ValueError(
                f"{self.name} has no statistics before it is built: call build(variables), "
                "apply(...) or model.fit(...) first"
            )
        variable = getattr(self, "_" + name)
        if backends.held_by_jax_trainer(variable):
            raise ValueError(
                f"{self.name}'s statistics are held by the JAX trainer during fit: read them in a "
                "callback through `self.model` first (which attaches the trainer's state to the "
                "variables, as ClippingStats does), or after fit"
            )
        return variable

    grad_norm = property(lambda self: self._stat("grad_norm"), doc="Pre-clip norm, last step.")
    clipped_grad_norm = property(
        lambda self: self._stat("clipped_grad_norm"), doc="Post-clip norm, last step."
    )
    clip_rate = property(lambda self: self._stat("clip_rate"), doc="clipped / applied steps.")
    applied_steps = property(lambda self: self._stat("applied_steps"), doc="Steps applied.")
    clipped_steps = property(lambda self: self._stat("clipped_steps"), doc="Steps clipped.")
    skipped_steps = property(lambda self: self._stat("skipped_steps"), doc="Steps skipped.")
    consecutive_skips = property(
        lambda self: self._stat("consecutive_skips"), doc="Current run of skipped steps."
    )

    @property
    def norm_history(self) -> Any:
        """AutoClip's ring buffer of gradient norms (``method="auto"`` only)."""
        if self.method != "auto":
            raise ValueError(f"norm_history exists only for method='auto', not {self.method!r}")
        return self._stat("norm_history")

    def stats(self) -> dict[str, float | int]:
        """The statistics as Python numbers: ``grad_norm``, ``clipped_grad_norm``, ``clip_rate``,
        ``applied_steps``, ``clipped_steps``, ``skipped_steps``, ``consecutive_skips``."""
        out: dict[str, float | int] = {}
        for name in ("grad_norm", "clipped_grad_norm", "clip_rate"):
            out[name] = float(self._stat(name).numpy())
        for name in ("applied_steps", "clipped_steps", "skipped_steps", "consecutive_skips"):
            out[name] = int(self._stat(name).numpy())
        return out

    # -- the step ---------------------------------------------------------------------------------

    def apply_gradients(self, grads_and_vars: Any) -> Any:
        grads, trainable_variables = zip(*grads_and_vars, strict=True)
        self.apply(grads, trainable_variables)
        return self.iterations

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `trainable_variables`, the optimizer must "
                    "already be built: call `optimizer.build(trainable_variables)` first"
                )
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                self.build(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(
                f"apply needs one gradient per variable, got {len(grads)} gradients for "
                f"{len(trainable_variables)} variables"
            )
        if keras.backend.backend() == "tensorflow":
            self._tf_apply(grads, trainable_variables)
        else:
            grads = self._unscale(grads, trainable_variables)
            self._warn_if_skip_limit_unenforced()
            self._apply_local(grads, trainable_variables)

    def _clippable(self, grads: Sequence[Any], variables: Sequence[Any]) -> list[bool]:
        return [
            g is not None and not self._overwrite_variable_with_gradient(v)
            for g, v in zip(grads, variables, strict=True)
        ]

    def _unscale(self, grads: list[Any], variables: Sequence[Any]) -> list[Any]:
        if self.loss_scale_factor is None:
            return grads
        mask = self._clippable(grads, variables)
        return _replace(grads, mask, [g / self.loss_scale_factor for g in _select(grads, mask)])

    def _tf_apply(self, grads: list[Any], variables: list[Any]) -> None:
        replicas.check_replica_context()
        grads = self._unscale(replicas.densify(grads), variables)
        self._warn_if_skip_limit_unenforced()
        # Clip the gradient of the whole batch: sum it over replicas first.
        mask = self._clippable(grads, variables)
        grads = _replace(grads, mask, replicas.sum_over_replicas(_select(grads, mask)))
        if not replicas.needs_merge_call():
            self._apply_local(grads, variables)
            return
        from keras_fancyrnn._tf import tf

        decide = functools.partial(
            replicas.cross_replica_cond,
            proceed=self._proceed if self.skip_nonfinite else None,
            step=self._finite_step,
            skip=self._skip_step,
        )
        tf.distribute.get_replica_context().merge_call(decide, args=(grads, variables))

    def _warn_if_skip_limit_unenforced(self) -> None:
        if self.max_consecutive_skips is None or self.skip_limit_checked_outside:
            return
        if self._compiled_warned or not backends.compiled_step(self._consecutive_skips.value):
            return
        self._compiled_warned = True
        if keras.backend.backend() == "tensorflow":
            reason = "XLA compiles assertions away, so"
            where = "under jit_compile=True"
        else:
            reason = "a step traced by jax.jit (the JAX trainer's) cannot raise, so"
            where = "on JAX"
        warnings.warn(
            f"{self.name}: {reason} max_consecutive_skips={self.max_consecutive_skips} cannot "
            f"raise from inside the step {where}; add keras_fancyrnn.ClippingStats() to the "
            "callbacks, which raises after the batch",
            stacklevel=3,
        )

    def _apply_local(self, grads: list[Any], variables: list[Any]) -> None:
        if not self.skip_nonfinite:
            self._finite_step(grads, variables)
            return
        proceed = self._proceed(grads, variables)
        step = functools.partial(self._finite_step, grads, variables)
        skip = functools.partial(self._skip_step, grads, variables)
        if keras.backend.backend() != "jax":
            ops.cond(proceed, step, skip)
            return
        # JAX: no assignments inside a traced cond (optim/backends.py)
        backends.select_step(proceed, [*variables, *self.variables], step, skip)
        if self.max_consecutive_skips is not None and not backends.compiled_step(proceed):
            self.check_skip_limit()  # eager JAX raises at the step, as TensorFlow's assertion

    def _proceed(self, grads: list[Any], variables: list[Any]) -> Any:
        proceed = clipping.all_finite(_select(grads, self._clippable(grads, variables)))
        if self.max_consecutive_skips is not None:
            proceed = ops.logical_and(proceed, self._consecutive_skips < self.max_consecutive_skips)
        return proceed

    def _clip(self, sub: list[Any], params: list[Any], norm: Any) -> tuple[list[Any], Any]:
        """Dispatch to the pure function of ``method``; "auto" also pushes ``norm`` into the
        history."""
        if self.method == "global_norm":
            return clipping.clip_by_global_norm(sub, self.threshold, norm=norm)
        if self.method == "norm":
            return clipping.clip_by_norm(sub, self.threshold)
        if self.method == "value":
            return clipping.clip_by_value(sub, self.threshold)
        if self.method == "adaptive":
            return clipping.adaptive_clip(sub, params, self.threshold, self.eps)
        threshold, history, _ = clipping.autoclip_threshold(
            self._norm_history, self._applied_steps, norm, self.percentile
        )
        self._norm_history.assign(history)
        return clipping.clip_by_global_norm(sub, threshold, norm=norm)

    def _finite_step(self, grads: list[Any], variables: list[Any]) -> None:
        mask = self._clippable(grads, variables)
        sub = _select(grads, mask)
        params = _select(variables, mask)
        norm = clipping.global_norm(sub)
        clipped, fired = self._clip(sub, params, norm)

        applied = self._applied_steps + 1
        clipped_steps = self._clipped_steps + ops.cast(fired, self._clipped_steps.dtype)
        self._grad_norm.assign(ops.cast(norm, "float32"))
        self._clipped_grad_norm.assign(ops.cast(clipping.global_norm(clipped), "float32"))
        self._applied_steps.assign(applied)
        self._clipped_steps.assign(clipped_steps)
        self._clip_rate.assign(ops.cast(clipped_steps, "float32") / ops.cast(applied, "float32"))
        self._consecutive_skips.assign(ops.zeros((), self._consecutive_skips.dtype))

        grads = _replace(grads, mask, replicas.first_replica_only(clipped))
        self.inner_optimizer.apply(grads, variables)

    def _skip_step(self, grads: list[Any], variables: list[Any]) -> None:
        sub = _select(grads, self._clippable(grads, variables))
        consecutive = self._consecutive_skips + 1
        self._grad_norm.assign(ops.cast(clipping.global_norm(sub), "float32"))
        self._clipped_grad_norm.assign(ops.zeros((), "float32"))
        self._skipped_steps.assign(self._skipped_steps + 1)
        self._consecutive_skips.assign(consecutive)
        if self.max_consecutive_skips is None:
            return
        if keras.backend.backend() == "tensorflow":
            from keras_fancyrnn._tf import tf

            tf.debugging.Assert(
                consecutive < self.max_consecutive_skips,
                [self._skip_limit_message(), "consecutive skips:", consecutive],
            )
        elif keras.backend.backend() == "torch":
            self.check_skip_limit()  # the torch step runs in Python: raise at the step

    def check_skip_limit(self) -> None:
        """Raise ``RuntimeError`` if the last ``max_consecutive_skips`` steps were all skipped.

        The step raises itself where it can, but not when it is compiled (XLA under
        ``jit_compile=True``, ``jax.jit`` on JAX): there call this after every step
        (``ClippingStats`` does, after every batch), and set :attr:`skip_limit_checked_outside`
        to silence the warning."""
        limit = self.max_consecutive_skips
        if limit is not None and self.built and int(self._consecutive_skips.numpy()) >= limit:
            raise RuntimeError(self._skip_limit_message())

    def _skip_limit_message(self) -> str:
        return (
            f"{self.name}: {self.max_consecutive_skips} consecutive steps had a non-finite "
            f"gradient (max_consecutive_skips={self.max_consecutive_skips}); every step was "
            "skipped, so the weights are those of the last finite step. Lower the learning rate, "
            "tighten the clipping, or check the data for nan/inf."
        )

    # -- delegation and serialization -------------------------------------------------------------

    def finalize_variable_values(self, var_list: Sequence[Any]) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def exclude_from_weight_decay(self, var_list: Any = None, var_names: Any = None) -> None:
        self.inner_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "method": self.method,
            "threshold": self.threshold,
            "skip_nonfinite": self.skip_nonfinite,
            "max_consecutive_skips": self.max_consecutive_skips,
            "percentile": self.percentile,
            "history_size": self.history_size,
            "eps": self.eps,
            "loss_scale_factor": self.loss_scale_factor,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> ClippingOptimizer:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def find_clipping_optimizer(optimizer: Any) -> ClippingOptimizer | None:
    """The ``ClippingOptimizer`` that is ``optimizer`` or is wrapped in it (through the
    ``inner_optimizer`` of e.g. Keras's ``LossScaleOptimizer``), or ``None``."""
    for _ in range(16):  # a bound on the depth of wrapping, against cycles
        if optimizer is None or isinstance(optimizer, ClippingOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None
