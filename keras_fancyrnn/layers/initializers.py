"""Initialisers for recurrent weights that the vanishing-gradient literature calls for.

* IRNN (Le, Jaitly & Hinton 2015): a ReLU ``SimpleRNN`` with ``recurrent_initializer=
  keras.initializers.Identity()`` and a zero bias — Keras's own initialiser does it.
* ``ChronoBias`` (Tallec & Ollivier 2018) for LSTM biases.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_fancyrnn")
class ChronoBias(keras.initializers.Initializer):
    r"""Chrono initialisation of an LSTM bias (Tallec & Ollivier 2018, "Can recurrent neural
    networks warp time?").

    For a bias of shape ``(4·units,)`` in Keras gate order i, f, c, o:

    .. math::  b_f \sim \log(\mathcal U[1, T_{max} - 1]), \qquad b_i = -b_f, \qquad b_c = b_o = 0

    so the forget gates start with characteristic timescales spread up to ``max_timescale``
    steps. Use it with ``unit_forget_bias=False`` (it sets the forget bias itself)::

        fr.LSTM(128, unit_forget_bias=False, bias_initializer=fr.initializers.ChronoBias(750))
    """

    sets_forget_bias = True

    def __init__(self, max_timescale, seed=None):
        if isinstance(max_timescale, bool) or not isinstance(max_timescale, (int, float)) or (
            max_timescale <= 2
        ):
            raise ValueError(
                f"max_timescale must be a number > 2 (the longest dependency, in steps), got "
                f"{max_timescale!r}"
            )
        self.max_timescale = max_timescale
        self.seed = seed
        self._generator = keras.random.SeedGenerator(seed) if seed is not None else None

    def __call__(self, shape, dtype=None):
        if len(shape) != 1 or shape[0] % 4:
            raise ValueError(
                f"ChronoBias initialises an LSTM bias of shape (4 * units,), got shape {shape}"
            )
        units = shape[0] // 4
        seed = self._generator if self._generator is not None else None
        u = keras.random.uniform((units,), 1.0, self.max_timescale - 1.0, dtype=dtype, seed=seed)
        b_f = ops.log(u)
        zeros = ops.zeros((2 * units,), dtype=dtype)
        return ops.concatenate([-b_f, b_f, zeros])

    def get_config(self):
        return {"max_timescale": self.max_timescale, "seed": self.seed}
