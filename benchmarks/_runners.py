"""The models the speed scripts time: fr.X or keras.layers.X (+ Dense(1), Adam, MSE) through
``train_on_batch`` / ``predict_on_batch``, and torch.nn.X with the same head."""

from __future__ import annotations

import functools
import os

import _torch_first  # noqa: F401  (before keras: see the module)
import keras
import numpy as np

import keras_fancyrnn as fr
from keras_fancyrnn._tf import tf

# "irnn": the SimpleRNN with ReLU (Le, Jaitly & Hinton 2015; the identity initialisation does not
# change the timing); "gru_before": the GRU with reset_after=False (torch has only the other
# variant, so its column times that)
KERAS = {"simple_rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM, "gru": keras.layers.GRU,
         "irnn": functools.partial(keras.layers.SimpleRNN, activation="relu"),
         "gru_before": functools.partial(keras.layers.GRU, reset_after=False)}
FR = {"simple_rnn": fr.SimpleRNN, "lstm": fr.LSTM, "gru": fr.GRU,
      "irnn": functools.partial(fr.SimpleRNN, activation="relu"),
      "gru_before": functools.partial(fr.GRU, reset_after=False)}


def keras_runner(layer_cls, cell, batch, steps, dim, units, train, jit, masked=False):
    """``run(n)``: ``n`` steps of the model. ``masked``: each sequence of length uniform in
    ``[steps // 2, steps]``, zero-padded at the end, behind ``keras.layers.Masking(0.0)``."""
    pool = 2  # distinct batches, cycled (the big grid points would not fit ten in memory)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * pool, steps, dim)).astype("float32")
    y = np.zeros((batch * pool, 1), "float32")
    head = []
    if masked:
        lengths = rng.integers(steps // 2, steps + 1, size=batch * pool)
        x[np.arange(steps)[None, :] >= lengths[:, None]] = 0.0
        head = [keras.layers.Masking(0.0)]
    # layer_cls None: no recurrent layer, the last step's features straight into the head (what
    # a Keras call costs beyond the layer: the floor under any layer's time)
    layer = (keras.layers.Lambda(lambda v: v[:, -1]) if layer_cls is None
             else layer_cls(units))
    model = keras.Sequential([keras.Input((steps, dim)), *head, layer, keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3), "mse", jit_compile={"on": True, "off": False}.get(
        jit, "auto"))
    # tensors of the backend (on TensorFlow: constants), converted once, outside the timing
    xs = [keras.ops.convert_to_tensor(x[i * batch:(i + 1) * batch]) for i in range(pool)]
    ys = [keras.ops.convert_to_tensor(y[i * batch:(i + 1) * batch]) for i in range(pool)]

    # train_on_batch / predict_on_batch: one compiled step per call, without fit()'s per-call
    # set-up (data adapter, callbacks), which would dilute the layers' difference.
    def train_fn(n):
        for i in range(n):
            model.train_on_batch(xs[i % pool], ys[i % pool])

    def predict_fn(n):
        for i in range(n):
            model.predict_on_batch(xs[i % pool])

    return train_fn if train else predict_fn


def torch_available() -> bool:
    """Whether torch is installed; if so, it is set to use every core (as TensorFlow does)."""
    try:
        import torch
    except ImportError:
        return False
    torch.set_num_threads(os.cpu_count() or 1)
    return True


def torch_columns(rate: dict, ours: str) -> tuple[str, str]:
    """The table's torch steps/s and ``ours``/torch cells (empty where torch did not run)."""
    torch_rate = rate.get("torch")
    if torch_rate is None:
        return "", ""
    return f"{torch_rate:.1f}", f"{rate[ours] / torch_rate:.2f}"


def torch_runner(cell, batch, steps, dim, units, train):
    import torch

    torch.manual_seed(0)
    rnn = {"simple_rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU,
           "irnn": functools.partial(torch.nn.RNN, nonlinearity="relu"),
           "gru_before": torch.nn.GRU}[cell](
        dim, units, batch_first=True)
    # on the GPU where torch sees one (as Keras's torch backend places its tensors)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rnn = rnn.to(device)
    head = torch.nn.Linear(units, 1).to(device)
    params = list(rnn.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, 1e-3)
    xs = torch.randn(2, batch, steps, dim, device=device)
    y = torch.zeros(batch, 1, device=device)

    def train_fn(n):
        for i in range(n):
            out, _ = rnn(xs[i % 2])
            loss = ((head(out[:, -1]) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # waits for the step, as Keras's train_on_batch returns its loss

    @torch.no_grad()
    def predict_fn(n):
        for i in range(n):
            out, _ = rnn(xs[i % 2])
            head(out[:, -1]).cpu()  # as predict_on_batch returns NumPy

    return train_fn if train else predict_fn


def flax_runner(cell, batch, steps, dim, units, train):
    """flax.linen's LSTM (``OptimizedLSTMCell``) or GRU under ``nn.RNN`` with a Dense(1) head,
    optax Adam and MSE, the train step and the forward each one ``jax.jit``; every step waits
    for its result, as Keras's calls return theirs."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    make_cell = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[cell]

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.RNN(make_cell(units))(x)[:, -1])

    model = Model()
    xs = jax.random.normal(jax.random.PRNGKey(0), (2, batch, steps, dim))
    y = jnp.zeros((batch, 1))
    tx = optax.adam(1e-3)
    params = model.init(jax.random.PRNGKey(1), xs[0])
    state = [params, tx.init(params)]

    @jax.jit
    def step(params, opt_state, x):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    forward = jax.jit(model.apply)

    def train_fn(n):
        for i in range(n):
            state[0], state[1], loss = step(state[0], state[1], xs[i % 2])
            loss.block_until_ready()

    def predict_fn(n):
        for i in range(n):
            forward(state[0], xs[i % 2]).block_until_ready()

    return train_fn if train else predict_fn


def with_setting(run, name: str, value):
    """``run`` with ``keras_fancyrnn.config``'s ``name`` set to ``value`` while it runs (its first
    call traces, and the layers choose their path while tracing)."""
    import keras_fancyrnn as fr

    def call(n):
        with fr.config.scope(**{name: value}):
            run(n)
    return call


def run_on_off(on: str, off: str, name: str, flags) -> None:
    """``on_off_table`` for the ``keras_fancyrnn.config`` setting ``name``, printed and written to
    ``flags.out`` with a footer naming the machine (exits if the kernels are unavailable)."""
    import platform
    import time

    from _timing import emit

    from keras_fancyrnn.ops import native

    if native.library() is None:
        raise SystemExit(f"the kernels are unavailable here: {native.load_error()}")
    rows = on_off_table(on, off, name, flags)
    footer = (f"\nT={flags.time}, D={flags.input_dim}. Machine: "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"TF {tf.__version__}, Keras {keras.__version__}; {time.strftime('%Y-%m-%d')}.")
    emit(rows, footer, flags.out)


def on_off_table(on: str, off: str, name: str, flags) -> list[str]:
    """The rows of a table that times each fr layer of the grid in ``flags`` (cells, modes, batch,
    hidden, time, input_dim, repeats, steps, torch) with setting ``name`` True (column ``on``)
    and False (``off``) against keras.layers (and torch.nn), alternating; printed as they come."""
    import itertools

    from _timing import time_alternating

    have_torch = flags.torch and torch_available()
    rows = [f"| cell | mode | B | H | {on} steps/s | {off} steps/s | keras steps/s | "
            f"torch steps/s | {on}/{off} | {on}/keras | {on}/torch |", "|" + "---|" * 11]
    grid = itertools.product(flags.cells, flags.modes, map(int, flags.batch),
                             map(int, flags.hidden))
    for cell, mode, batch, units in grid:
        dims = (cell, batch, flags.time, flags.input_dim, units, mode == "train")
        runners = {on: with_setting(keras_runner(FR[cell], *dims, "auto"), name, True),
                   off: with_setting(keras_runner(FR[cell], *dims, "auto"), name, False),
                   "keras": keras_runner(KERAS[cell], *dims, "auto")}
        if have_torch:
            runners["torch"] = torch_runner(*dims)
        rate = time_alternating(runners, flags.repeats, flags.steps,
                                getattr(flags, "round_seconds", 0.0))
        torch_steps, vs_torch = torch_columns(rate, on)
        rows.append(
            f"| {cell} | {mode} | {batch} | {units} | {rate[on]:.1f} | {rate[off]:.1f} | "
            f"{rate['keras']:.1f} | {torch_steps} | {rate[on] / rate[off]:.2f} | "
            f"{rate[on] / rate['keras']:.2f} | {vs_torch} |")
        print(rows[-1], flush=True)
    return rows
