"""The recurrent layer: ``RNN`` runs a cell (``layers/cell.py``) on the engine, with the Keras
layer contract (arguments, initial states, masks, stateful layers, serialization) written once for
the three layers; ``build_cell`` and ``layer_arguments`` split a layer's arguments between it and
its cell. An fr layer also runs inside ``keras.layers.Bidirectional``.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_fancyrnn import engine
from keras_fancyrnn.engine import dispatch, probes

__all__ = ["CELL_ARGS", "LAYER_ARGS", "RNN", "SequenceMaskFromInput", "build_cell",
           "layer_arguments"]


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


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
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
        if keras.config.backend() == "tensorflow" and not dispatch.on_gpu():
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
        dtype = keras.backend.standardize_dtype(sequences.dtype)
        if "int" in dtype or dtype == "bool":
            return ops.cast(sequences, self.cell.compute_dtype)
        if "float" not in dtype:
            raise TypeError(
                f"{self.name} expects real-valued inputs (float, int or bool), got dtype "
                f"{dtype}; cast the data (e.g. x.astype('float32'))"
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

