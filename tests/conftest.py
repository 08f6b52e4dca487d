import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Off the TensorFlow backend only the tests marked ``all_backends`` run (the others test
    the TensorFlow engine, its C++ kernels, exports or tf.data); the rest are skipped, saying so."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"TensorFlow backend only (KERAS_BACKEND={backend})")
    for item in items:
        if "all_backends" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_config():
    """Every test starts and ends with keras_fancyrnn.config as the environment sets it."""
    import keras_fancyrnn as fr

    fr.config.reset()
    yield
    fr.config.reset()
