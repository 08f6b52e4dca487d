"""What the three cells and the three layers share: argument checks, weights, dropout, the layer.

Long (over 400 lines): ``RecurrentCell`` and ``RNN`` implement the whole Keras cell and layer
contracts (arguments, weights, dropout masks, states, masks, serialization) once for all cells.

A cell (``RecurrentCell``) holds one step of math; the layer (``RNN``) hands it to the engine.
Both follow the Keras contracts, so an fr cell runs inside ``keras.layers.RNN`` and an fr layer
inside ``keras.layers.Bidirectional``.
"""

from __future__ import annotations

import contextlib
import threading

import keras
from keras import ops
from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell

from keras_fancyrnn import engine
from keras_fancyrnn._tf import tf
from keras_fancyrnn.engine import dispatch, probes
from keras_fancyrnn.ops import native

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
                    object.__setattr__(self, name, tf.convert_to_tensor(variable))
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

    def fused_sequence(self, inputs, states, dropout_mask=None):
        """All timesteps in one kernel: ``x W`` for the whole sequence as one matmul, then
        ``sequence_kernel``, which adds the bias. ``inputs``: time-major ``[T, B, D]``;
        ``dropout_mask``: ``None`` or one ``[B, D]`` mask. Returns
        ``(outputs [T, B, units], final states)``."""
        if dropout_mask is not None:
            inputs = inputs * dropout_mask  # one [B, D] mask, broadcast over time
        xp = native.project(inputs, ops.convert_to_tensor(self.kernel))
        bias = None if self.input_bias is None else ops.convert_to_tensor(self.input_bias)
        return self.sequence_kernel(xp, list(states), bias)

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


#: Cell arguments that the layers take and expose as read-only properties, as Keras's layers do.
CELL_ARGS = (
    "units", "activation", "recurrent_activation", "use_bias", "unit_forget_bias", "reset_after",
    "kernel_initializer", "recurrent_initializer", "bias_initializer", "kernel_regularizer",
    "recurrent_regularizer", "bias_regularizer", "kernel_constraint", "recurrent_constraint",
    "bias_constraint", "dropout", "recurrent_dropout", "seed", "implementation",
)
LAYER_ARGS = (
    "return_sequences", "return_state", "go_backwards", "stateful", "unroll",
    "zero_output_for_mask", "bptt_truncate", "use_cudnn",
)


def build_cell(cell_class, args: dict, kwargs: dict, name: str):
    """The cell of a layer, from the layer's own arguments (``args``: the layer's ``locals()``),
    as Keras's layers build theirs; ``implementation`` (a cell-only keyword) leaves ``kwargs``."""
    cell_args = {k: v for k, v in args.items() if k in CELL_ARGS}
    return cell_class(**cell_args, implementation=kwargs.pop("implementation", 2),
                      dtype=kwargs.get("dtype"), trainable=kwargs.get("trainable", True),
                      name=name)


def layer_arguments(args: dict) -> dict:
    """The layer-level arguments among a layer's ``locals()``."""
    return {k: v for k, v in args.items() if k in LAYER_ARGS + ("activity_regularizer",)}


class SequenceMaskFromInput:
    """Takes the mask from ``sequences`` also when ``initial_state`` holds tensors.

    ``keras.layers.Layer.__call__`` only fills ``mask`` from the input when the call has a single
    tensor argument, so a functional model that passes ``initial_state`` tensors would silently
    drop an ``Embedding(mask_zero=True)`` / ``Masking`` mask (Keras's own RNN layers and
    Bidirectional do).
    """

    def __call__(self, sequences, *args, **kwargs):
        if kwargs.get("mask") is None and len(args) < 2:
            mask = getattr(sequences, "_keras_mask", None)
            if mask is not None:
                kwargs["mask"] = mask
        return super().__call__(sequences, *args, **kwargs)


class RNN(SequenceMaskFromInput, keras.layers.RNN):
    """A recurrent layer that runs an fr cell on the keras_fancyrnn engine.

    Same arguments and behaviour as ``keras.layers.RNN`` plus ``bptt_truncate``: ``None`` for full
    backpropagation through time, or ``k >= 1`` so that every gradient flows back at most ``k``
    steps (forward values are unchanged). Subclasses build their cell from Keras's arguments.
    """

    cell_class = None  # set by subclasses; None means "pass a cell"

    def __init__(
        self,
        cell,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        zero_output_for_mask=False,
        bptt_truncate=None,
        **kwargs,
    ):
        if not hasattr(cell, "project_inputs") or not hasattr(cell, "step"):
            raise TypeError(
                "cell must be a keras_fancyrnn cell (SimpleRNNCell, LSTMCell, GRUCell or a "
                f"subclass of keras_fancyrnn.RecurrentCell), got {type(cell).__name__}"
            )
        super().__init__(
            cell,
            return_sequences=bool(return_sequences),
            return_state=bool(return_state),
            go_backwards=bool(go_backwards),
            stateful=bool(stateful),
            unroll=bool(unroll),
            zero_output_for_mask=bool(zero_output_for_mask),
            **kwargs,
        )
        self.bptt_truncate = engine.validate_bptt_truncate(bptt_truncate)
        self.input_spec = keras.layers.InputSpec(ndim=3)
        # On CPU, XLA's while loop is about 2x slower than TensorFlow's for these recurrences
        # (benchmarks/rnn_speed.py), so `jit_compile="auto"` leaves XLA off; True still forces it.
        if not dispatch.on_gpu():
            self.supports_jit = False

    def build(self, sequences_shape, initial_state_shape=None):
        if len(sequences_shape) != 3:
            raise ValueError(
                f"{self.name} expects inputs of shape (batch, timesteps, features), got "
                f"{tuple(sequences_shape)}"
            )
        if self.unroll and sequences_shape[1] is None:
            raise ValueError(
                f"{self.name}: unroll=True needs a static number of timesteps, got input shape "
                f"{tuple(sequences_shape)}; pass keras.Input(shape=(T, D)) with a fixed T"
            )
        super().build(sequences_shape, initial_state_shape)
        self.input_spec = keras.layers.InputSpec(ndim=3, axes={-1: sequences_shape[-1]})

    def call(self, sequences, initial_state=None, mask=None, training=False):
        sequences = self._as_real(sequences)
        if sequences.shape[1] == 0:
            raise ValueError(f"{self.name}: the input has 0 timesteps, expected at least 1")
        batch = ops.shape(sequences)[0]
        if self.stateful:
            self._check_stateful_batch(sequences)
        if initial_state is None:
            initial_state = self.states if self.stateful else self.get_initial_state(batch)
        initial_state = self._check_initial_state(initial_state, sequences)
        mask = self._check_mask(mask, sequences)
        requested = probes.for_call(self, sequences, mask)
        if "input" in requested:
            sequences = sequences + ops.cast(requested.pop("input"), sequences.dtype)

        last_output, outputs, states = engine.run(
            self.cell,
            sequences,
            initial_state,
            mask=mask,
            training=bool(training),
            go_backwards=self.go_backwards,
            unroll=self.unroll,
            return_sequences=self.return_sequences,
            zero_output_for_mask=self.zero_output_for_mask,
            bptt_truncate=self.bptt_truncate,
            probes=requested or None,
            plan=dispatch.choose(self, sequences, mask, training, probed=bool(requested)),
        )
        if self.stateful:
            for variable, value in zip(self.states, states):
                variable.assign(ops.cast(value, variable.dtype))
        output = outputs if self.return_sequences else last_output
        return (output, *states) if self.return_state else output

    # -- input checks (raised while tracing, before any work) ----------------------------------
    def _as_real(self, sequences):
        """Integer and bool inputs in the cell's compute dtype, as Keras's layers compute them
        (its matmul promotes them to the kernel's dtype); other non-float dtypes are refused."""
        dtype = tf.as_dtype(sequences.dtype)
        if dtype.is_integer or dtype == tf.bool:
            return ops.cast(sequences, self.cell.compute_dtype)
        if not dtype.is_floating:
            raise TypeError(
                f"{self.name} expects real-valued inputs (float, int or bool), got dtype "
                f"{dtype.name}; cast the data (e.g. x.astype('float32'))"
            )
        return sequences

    def _check_stateful_batch(self, sequences):
        got = sequences.shape[0]
        expected = self._expected_batch_size
        if expected is not None and got is not None and got != expected:
            raise ValueError(
                f"{self.name} is stateful and was built for batch size {expected}, got a batch of "
                f"{got}; keep the batch size fixed (drop_remainder=True) or call reset_state() "
                "after rebuilding"
            )

    def _check_initial_state(self, initial_state, sequences):
        states = list(initial_state) if isinstance(initial_state, (list, tuple)) else [
            initial_state
        ]
        sizes = self.state_size
        if len(states) != len(sizes):
            raise ValueError(
                f"{self.name} expects initial_state to be a list of {len(sizes)} tensor(s) of "
                f"shapes {[(None, s) for s in sizes]}, got {len(states)}"
            )
        out = []
        for i, (s, size) in enumerate(zip(states, sizes)):
            s = ops.convert_to_tensor(s, dtype=self.cell.compute_dtype)
            batch = sequences.shape[0]
            if len(s.shape) != 2 or s.shape[-1] != size or (
                batch is not None and s.shape[0] is not None and s.shape[0] != batch
            ):
                raise ValueError(
                    f"{self.name}: initial_state[{i}] must have shape ({batch}, {size}), got "
                    f"{tuple(s.shape)}"
                )
            out.append(s)
        return out

    def _check_mask(self, mask, sequences):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        if mask is None:
            return None
        mask = ops.convert_to_tensor(mask)
        want = tuple(sequences.shape[:2])
        got = tuple(mask.shape)
        if len(got) != 2 or any(a is not None and b is not None and a != b
                                for a, b in zip(got, want)):
            raise ValueError(
                f"{self.name}: mask must have shape (batch, timesteps) = {want}, got {got}"
            )
        return mask

    def get_config(self):
        config = super().get_config()
        config["bptt_truncate"] = self.bptt_truncate
        if self.cell_class is not None:  # the cell's arguments are the layer's own
            del config["cell"]
            cell_config = self.cell.get_config()
            for key in ("name", "trainable", "dtype"):
                cell_config.pop(key, None)
            config.update(cell_config)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if cls.cell_class is None:
            return super().from_config(config, custom_objects=custom_objects)
        return cls(**config)


def _expose(name):
    return property(lambda self: getattr(self.cell, name), doc=f"The cell's ``{name}``.")


# The layer exposes its cell's arguments read-only, as Keras's layers do (an argument the cell
# does not have raises AttributeError, so ``hasattr`` stays truthful).
for _name in CELL_ARGS:
    setattr(RNN, _name, _expose(_name))


__all__ = ["RecurrentCell", "RNN", "SeedStateSaving"]
