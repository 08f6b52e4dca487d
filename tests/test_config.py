"""keras_fancyrnn.config: defaults, the environment, set / scope / reset, and the errors for
settings that do not exist, values they cannot take, and register blocks this CPU lacks."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from graphs import traced_ops

import keras_fancyrnn as fr
from keras_fancyrnn.ops import build, native


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("KERAS_FANCYRNN_RECURRENT_PRODUCT", raising=False)
    fr.config.reset()
    yield
    fr.config.reset()


def test_default_set_scope_and_reset():
    assert fr.config.get("recurrent_product") == "auto"
    fr.config.set(recurrent_product="eigen")
    assert fr.config.get("recurrent_product") == "eigen"
    with fr.config.scope(recurrent_product="avx2"):
        assert fr.config.get("recurrent_product") == "avx2"
        with fr.config.scope(recurrent_product="avx512"):
            assert fr.config.get("recurrent_product") == "avx512"
        assert fr.config.get("recurrent_product") == "avx2"
    assert fr.config.get("recurrent_product") == "eigen"
    fr.config.reset()
    assert fr.config.get("recurrent_product") == "auto"


def test_environment_variable_is_the_starting_value(monkeypatch):
    monkeypatch.setenv("KERAS_FANCYRNN_RECURRENT_PRODUCT", "eigen")
    assert fr.config.get("recurrent_product") == "eigen"
    with fr.config.scope(recurrent_product="avx2"):
        assert fr.config.get("recurrent_product") == "avx2"
    monkeypatch.setenv("KERAS_FANCYRNN_RECURRENT_PRODUCT", "avx3")
    with pytest.raises(fr.ConfigError, match=r"\$KERAS_FANCYRNN_RECURRENT_PRODUCT: "
                                              r"recurrent_product must be one of .*'avx2'.*"
                                              r"got 'avx3'"):
        fr.config.get("recurrent_product")


def test_bad_names_and_values_are_config_errors():
    with pytest.raises(fr.ConfigError, match=r"no setting named 'recurrent_products'; the "
                                              r"settings are .*recurrent_product"):
        fr.config.set(recurrent_products="avx2")
    with pytest.raises(fr.ConfigError, match=r"must be one of 'auto', 'avx512', 'avx2', "
                                              r"'eigen', got 'AVX2'"):
        with fr.config.scope(recurrent_product="AVX2"):
            pass
    with pytest.raises(ValueError):  # a ValueError, as Keras's own argument errors are
        fr.config.get("no_such_setting")
    assert fr.config.get("recurrent_product") == "auto"  # nothing was changed


def test_the_scope_is_not_seen_by_other_threads():
    seen = []
    with fr.config.scope(recurrent_product="eigen"):
        thread = threading.Thread(target=lambda: seen.append(fr.config.get("recurrent_product")))
        thread.start()
        thread.join()
    assert seen == ["auto"]


@pytest.mark.skipif(native.library() is None, reason="the kernels cannot be had here")
def test_a_product_this_cpu_lacks_is_a_config_error_when_traced(monkeypatch):
    assert native.products()[-1] == "eigen"  # Eigen's product runs on every CPU
    monkeypatch.setattr(build, "products", lambda: ["eigen"])  # as a CPU without AVX2
    layer = fr.SimpleRNN(3)
    x = tf.zeros((2, 4, 5))
    with fr.config.scope(recurrent_product="avx2"):
        with pytest.raises(fr.ConfigError, match=r"recurrent_product='avx2' is not available on "
                                                  r"this CPU: it runs 'eigen'"):
            layer(x)
    with fr.config.scope(recurrent_product="eigen"):
        np.testing.assert_array_equal(layer(x).numpy(), np.zeros((2, 3)))


@pytest.mark.skipif(native.library() is None, reason="the kernels cannot be had here")
def test_the_environment_variable_reaches_the_kernels():
    """A fresh process with the variable set traces the sequence ops with that product."""
    code = (
        "import tensorflow as tf, keras_fancyrnn as fr\n"
        "layer = fr.LSTM(3)\n"
        "g = tf.function(layer).get_concrete_function(tf.zeros((2, 4, 5))).graph\n"
        "print(sorted({op.get_attr('product').decode() for op in g.get_operations()\n"
        "              if op.type == 'KerasFancyrnnLstmSequence'}))\n")
    env = {"KERAS_FANCYRNN_RECURRENT_PRODUCT": "eigen", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['eigen']"


def test_switches_are_booleans_from_the_environment_too(monkeypatch):
    assert fr.config.get("native_kernels") is True
    assert fr.config.get("fused_on_cpu") is True
    for word, value in [("0", False), ("False", False), ("no", False), ("1", True),
                        ("TRUE", True), ("yes", True)]:
        monkeypatch.setenv("KERAS_FANCYRNN_NATIVE", word)
        assert fr.config.get("native_kernels") is value, word
    monkeypatch.setenv("KERAS_FANCYRNN_NATIVE", "off")
    with pytest.raises(fr.ConfigError, match=r"\$KERAS_FANCYRNN_NATIVE: native_kernels must be "
                                              r"one of True, False, got 'off'"):
        fr.config.get("native_kernels")
    with pytest.raises(fr.ConfigError, match=r"fused_on_cpu must be one of True, False, got 1"):
        fr.config.set(fused_on_cpu=1)


def test_switches_choose_the_path(rng):
    """The settings reach the layers when they are traced: the sequence kernel (which projects
    its inputs itself) by default, the step loop with the gate kernels without sequence kernels,
    no C++ op without native kernels."""
    x = tf.constant(rng.normal(size=(3, 6, 4)).astype("float32"))

    def ops(layer):
        return {op for op in traced_ops(layer, x) if op.startswith("KerasFancyrnn")}

    if native.library() is not None:
        assert ops(fr.GRU(5)) == {"KerasFancyrnnGruSequence"}
        with fr.config.scope(sequence_kernels=False):
            assert ops(fr.GRU(5)) == {"KerasFancyrnnGruGates"}
    with fr.config.scope(native_kernels=False):
        assert ops(fr.GRU(5)) == set()


def test_the_old_module_globals_say_which_setting_replaced_them():
    from keras_fancyrnn import engine

    with pytest.raises(AttributeError, match=r"keras_fancyrnn.ops.native.ENABLED is now the "
                                             r"keras_fancyrnn.config setting 'native_kernels'"):
        native.ENABLED = False
    with pytest.raises(AttributeError, match=r"fr.config.set\(fused_on_cpu=...\)"):
        engine.FUSED_ON_CPU = False
    with pytest.raises(AttributeError, match=r"'sequence_kernels'"):
        native.SEQUENCES  # noqa: B018
    with pytest.raises(AttributeError, match=r"engine.HOIST_ON_CPU was removed: the loop hoists"):
        engine.HOIST_ON_CPU = True
    with pytest.raises(AttributeError, match=r"has no attribute 'NO_SUCH'"):
        engine.NO_SUCH  # noqa: B018
    assert fr.config.get("native_kernels") is True and fr.config.get("fused_on_cpu") is True
