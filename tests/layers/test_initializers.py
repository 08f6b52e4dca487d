"""ChronoBias against Tallec & Ollivier (2018)'s definition, and IRNN through Keras's Identity."""

import keras
import numpy as np
import pytest

import keras_fancyrnn as fr

pytestmark = pytest.mark.all_backends

UNITS = 2000


def test_chrono_bias_follows_the_paper():
    bias = np.asarray(fr.initializers.ChronoBias(100, seed=1)((4 * UNITS,)))
    b_i, b_f, b_c, b_o = np.split(bias, 4)
    # b_f = log(u), u ~ U[1, T_max - 1]  =>  exp(b_f) is uniform on [1, 99]
    u = np.exp(b_f)
    assert u.min() >= 1.0 and u.max() <= 99.0
    assert abs(u.mean() - 50.0) < 2.0 and abs(u.std() - 98 / np.sqrt(12)) < 1.5
    np.testing.assert_array_equal(b_i, -b_f)
    np.testing.assert_array_equal(b_c, 0.0)
    np.testing.assert_array_equal(b_o, 0.0)


def test_chrono_bias_in_an_lstm_and_round_trip():
    layer = fr.LSTM(8, unit_forget_bias=False,
                    bias_initializer=fr.initializers.ChronoBias(750, seed=0))
    layer.build((None, 5, 3))
    b_f = layer.cell.bias.numpy()[8:16]
    assert np.all(b_f >= 0.0) and np.all(b_f <= np.log(749.0))
    clone = fr.LSTM.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_chrono_bias_rejects_bad_use():
    with pytest.raises(ValueError, match="max_timescale must be a number > 2"):
        fr.initializers.ChronoBias(1)
    with pytest.raises(ValueError, match=r"LSTM bias of shape \(4 \* units,\)"):
        fr.initializers.ChronoBias(10)((6,))
    with pytest.raises(ValueError, match="pass unit_forget_bias=False"):
        fr.LSTM(4, bias_initializer=fr.initializers.ChronoBias(10))


def test_irnn_identity_recurrent_kernel():
    layer = fr.SimpleRNN(6, activation="relu", recurrent_initializer=keras.initializers.Identity())
    layer.build((None, 4, 3))
    np.testing.assert_array_equal(layer.cell.recurrent_kernel.numpy(), np.eye(6))
    np.testing.assert_array_equal(layer.cell.bias.numpy(), 0.0)
