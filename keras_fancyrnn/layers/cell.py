"""The cell contract: what the three cells share (argument checks, weights with Keras's names and
shapes, dropout masks, the Keras step, the engine's hooks).

A cell (``RecurrentCell``) holds one step of math and its weights; ``layers/base.py``'s ``RNN``
hands it to the engine. It follows Keras's cell contract, so an fr cell also runs inside
``keras.layers.RNN``.
"""

from __future__ import annotations

import contextlib
import threading

import keras
from keras import ops
from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell

from keras_fancyrnn.ops import native

__all__ = ["RecurrentCell", "SeedStateSaving", "check_rate", "check_units", "get_activation"]

_serialize = keras.saving.serialize_keras_object


def check_units(units) -> int:
    if isinstance(units, bool) or not isinstance(units, int) or units <= 0:
        raise ValueError(f"units must be a positive integer, got {units!r}")
    return units


def check_rate(name: str, rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {rate!r}")
    return float(rate)


def get_activation(name: str, identifier):
    try:
        return keras.activations.get(identifier)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name} must be a Keras activation (a name such as 'tanh', 'sigmoid', 'relu', or a "
            f"callable), got {identifier!r}"
        ) from err


def _read(variable):
    """The variable's value as a tensor (on TensorFlow ``ops.convert_to_tensor`` would keep the
    variable, read again wherever it is used)."""
    if keras.config.backend() == "tensorflow":
        from keras_fancyrnn._tf import tf

        return tf.convert_to_tensor(variable)
    return ops.convert_to_tensor(variable)


def _dense(x, kernel):
    """``x @ kernel`` over the last axis as one 2-D matmul. For ``[T, B, D]`` inputs this is much
    faster than a broadcast batch matmul, whose kernel gradient sums ``T`` per-step products."""
    if len(x.shape) == 2:
        return ops.matmul(x, kernel)
    lead = ops.shape(x)[:-1]
    flat = ops.matmul(ops.reshape(x, (-1, x.shape[-1])), kernel)
    return ops.reshape(flat, (*lead, kernel.shape[-1]))


class SeedStateSaving:
    """Saves the layer's dropout RNG state (``self.seed_generator``) with its weights.

    Keras saves a layer's variables but not its ``SeedGenerator``'s state (keras-team/keras#19796),
    so a model restored by ``load_weights``/``load_model``/``BackupAndRestore`` would draw the
    dropout masks of the first steps again and a resumed run would not equal an uninterrupted one.
    The state is stored under its own key after the variables; files without it still load.
    """

    _SEED_KEY = "seed_generator_state"

    def save_own_variables(self, store):
        super().save_own_variables(store)
        generator = getattr(self, "seed_generator", None)
        if generator is not None:
            store[self._SEED_KEY] = generator.state

    def load_own_variables(self, store):
        generator = getattr(self, "seed_generator", None)
        if generator is not None and self._SEED_KEY in store:
            generator.state.assign(store[self._SEED_KEY])
            store = {key: store[key] for key in store.keys() if key != self._SEED_KEY}
        super().load_own_variables(store)


class RecurrentCell(SeedStateSaving, keras.layers.Layer, DropoutRNNCell):
    """Base of the fr cells: weights with the Keras names and shapes, and the Keras cell contract.

    Subclasses set ``gates`` (the number of blocks of ``units`` columns in the fused kernels) and
    implement ``step``; ``input_bias`` and ``build_bias`` cover the bias layouts.
    Weights: ``kernel (D, gates·units)``, ``recurrent_kernel (units, gates·units)``, ``bias``.
    """

    gates = 1

    def __init__(
        self,
        units,
        activation="tanh",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        implementation=2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = check_units(units)
        self.activation = get_activation("activation", activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = keras.regularizers.get(recurrent_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.recurrent_constraint = keras.constraints.get(recurrent_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.dropout = check_rate("dropout", dropout)
        self.recurrent_dropout = check_rate("recurrent_dropout", recurrent_dropout)
        # 0 is a legacy value that Keras still accepts (old configs) and runs as 2; it is kept as
        # given so that the config round-trips.
        if implementation not in (0, 1, 2):
            raise ValueError(
                f"implementation must be 0, 1 or 2, got {implementation!r} (0 is a legacy value "
                "that computes as 2)"
            )
        self.implementation = implementation
        # Keras draws one input/recurrent mask per gate when it runs implementation 1, which it
        # does whenever recurrent_dropout is set; one mask for all gates otherwise (0 and 2).
        if self.gates > 1 and (implementation == 1 or self.recurrent_dropout > 0):
            self.dropout_mask_count = self.gates
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed=seed)

    # -- Keras cell contract -------------------------------------------------------------------
    @property
    def state_size(self):
        return self.units

    @property
    def output_size(self):
        return self.units

    def get_initial_state(self, batch_size=None):
        sizes = self.state_size if isinstance(self.state_size, list) else [self.state_size]
        return [ops.zeros((batch_size, s), dtype=self.compute_dtype) for s in sizes]

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                f"{self.name}: the last (feature) dimension of the input must be known, got "
                f"input shape {tuple(input_shape)}"
            )
        width = self.gates * self.units
        self.kernel = self.add_weight(
            shape=(input_dim, width),
            name="kernel",
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.recurrent_kernel = self.add_weight(
            shape=(self.units, width),
            name="recurrent_kernel",
            initializer=self.recurrent_initializer,
            regularizer=self.recurrent_regularizer,
            constraint=self.recurrent_constraint,
        )
        self.bias = None
        if self.use_bias:
            shape, initializer = self.bias_layout()
            self.bias = self.add_weight(
                shape=shape,
                name="bias",
                initializer=initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        self.built = True

    def bias_layout(self):
        """(shape, initializer) of the bias; overridden where Keras's layout differs."""
        return (self.gates * self.units,), self.bias_initializer

    @property
    def input_bias(self):
        """The part of the bias added to ``x W`` (and hoisted with it)."""
        return self.bias

    def call(self, inputs, states, training=False):
        """One step, the Keras way: ``(x_t, states) -> (h_t, new_states)``."""
        nested = isinstance(states, (list, tuple))
        state_list = list(states) if nested else [states]
        dp_mask = rec_mask = None
        if training and 0.0 < self.dropout < 1.0:
            dp_mask = self.get_dropout_mask(inputs)
        if training and 0.0 < self.recurrent_dropout < 1.0:
            rec_mask = self.get_recurrent_dropout_mask(state_list[0])
        output, new_states = self.step(self.project_inputs(inputs, dp_mask), state_list, rec_mask)
        return output, (new_states if nested else new_states[0])

    # -- engine contract -----------------------------------------------------------------------
    def project_inputs(self, x, dropout_mask=None):
        """``x W + b`` for ``x`` of shape ``[B, D]`` or time-major ``[T, B, D]``: the part hoisted
        out of the time loop. ``dropout_mask`` is ``None``, one ``[B, D]`` mask, or one per gate
        (it broadcasts over the leading time axis)."""
        if dropout_mask is None:
            xp = _dense(x, self.kernel)
        elif isinstance(dropout_mask, (list, tuple)):
            blocks = ops.split(self.kernel, self.gates, axis=1)
            xp = ops.concatenate(
                [_dense(x * m, k) for m, k in zip(dropout_mask, blocks)], axis=-1
            )
        else:
            xp = _dense(x * dropout_mask, self.kernel)
        return xp if self.input_bias is None else xp + self.input_bias

    def recurrent_matmul(self, h, recurrent_mask, kernel):
        """``h U`` with the recurrent dropout mask(s) applied to ``h`` per gate block."""
        if recurrent_mask is None:
            return ops.matmul(h, kernel)
        if not isinstance(recurrent_mask, (list, tuple)):
            return ops.matmul(h * recurrent_mask, kernel)
        blocks = ops.split(kernel, kernel.shape[-1] // self.units, axis=1)
        return ops.concatenate(
            [ops.matmul(h * m, k) for m, k in zip(recurrent_mask, blocks)], axis=-1
        )

    def step(self, xp_t, states, recurrent_mask=None):  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def weights_read_once(self):
        """Inside, ``kernel``, ``recurrent_kernel`` and ``bias`` are tensors read from the
        variables once, here: a loop built inside captures them as constants instead of reading
        each variable at every step, and its gradient keeps no per-step copies of them (faster
        training: benchmarks/unused_features.py). The variables are back after.

        The swap is on the cell object, so the context holds the cell's lock: another thread
        building or running this cell's loop waits instead of seeing the tensors. Variables
        whose dtype is not the compute dtype (mixed precision) are left as variables: read once
        and cast, their gradient would be summed over time in float16/bfloat16."""
        with self._weights_lock:
            names = [n for n in ("kernel", "recurrent_kernel", "bias")
                     if isinstance(getattr(self, n, None), keras.Variable)
                     and getattr(self, n).dtype == self.compute_dtype]
            variables = {n: getattr(self, n) for n in names}
            try:
                for name, variable in variables.items():
                    # object.__setattr__: Keras's tracking must keep the variable, not the tensor
                    object.__setattr__(self, name, _read(variable))
                yield
            finally:
                for name, variable in variables.items():
                    object.__setattr__(self, name, variable)

    @property
    def _weights_lock(self):
        lock = self.__dict__.get("_fr_weights_lock")
        if lock is None:  # created on first use: a lock cannot be deep-copied or serialized
            lock = self.__dict__.setdefault("_fr_weights_lock", threading.RLock())
        return lock

    def native_gates(self, dtype) -> bool:
        """Whether ``step`` computes its gate equations with the fused kernel of
        ``keras_fancyrnn.ops.native`` (same values; LSTM and GRU with their default activations)."""
        return (self.activation is keras.activations.tanh
                and getattr(self, "recurrent_activation", None) is keras.activations.sigmoid
                and native.usable(dtype))

    # -- whole-sequence kernels (the dispatch's "sequence_kernel" path) -------------------------
    def sequence_kernel_blocker(self) -> str | None:
        """Why this cell's configuration has no whole-sequence kernel (``sequence_kernel``), or
        ``None`` where it has one: LSTM and GRU with tanh/sigmoid (either ``reset_after``)."""
        if (self.activation is keras.activations.tanh
                and getattr(self, "recurrent_activation", None) is keras.activations.sigmoid):
            return None
        return ("the sequence kernels run activation tanh and recurrent_activation sigmoid, "
                "not this cell's")

    def fused_sequence(self, inputs, states, dropout_mask=None, mask=None, probes=None,
                       go_backwards=False):
        """All timesteps in one kernel (the cell's ``sequence_kernel``), which computes ``x W``
        itself and adds the bias. ``inputs``: batch-major ``[B, T, D]``, processed last step
        first with ``go_backwards``;
        ``dropout_mask``: ``None`` or one ``[B, D]`` mask; ``mask`` ``[T, B]`` and ``probes``
        ``{state index: [T, B, units]}`` time-major in processing order, as
        ``keras_fancyrnn.ops.native.lstm_sequence`` takes them. Returns ``(hidden states
        [T, B, units], final states)``, in processing order."""
        if dropout_mask is not None:
            inputs = inputs * ops.expand_dims(dropout_mask, 1)  # one [B, D] mask for every step
        bias = None if self.input_bias is None else ops.convert_to_tensor(self.input_bias)
        return self.sequence_kernel(inputs, ops.convert_to_tensor(self.kernel), list(states),
                                    bias, mask=mask, probes=probes, go_backwards=go_backwards)

    def get_config(self):
        config = {
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": _serialize(self.kernel_initializer),
            "recurrent_initializer": _serialize(self.recurrent_initializer),
            "bias_initializer": _serialize(self.bias_initializer),
            "kernel_regularizer": _serialize(self.kernel_regularizer),
            "recurrent_regularizer": _serialize(self.recurrent_regularizer),
            "bias_regularizer": _serialize(self.bias_regularizer),
            "kernel_constraint": _serialize(self.kernel_constraint),
            "recurrent_constraint": _serialize(self.recurrent_constraint),
            "bias_constraint": _serialize(self.bias_constraint),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "seed": self.seed,
            "implementation": self.implementation,
        }
        return {**super().get_config(), **config}
