import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


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
