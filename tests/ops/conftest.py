"""Fixtures of the kernel tests: the compiled library, and each recurrent product."""

import pytest
from kernel_kinds import PRODUCTS

import keras_fancyrnn as fr
from keras_fancyrnn.ops import native


@pytest.fixture(scope="module")
def library():
    lib = native.library()
    assert lib is not None, native.load_error()
    return lib


@pytest.fixture(params=PRODUCTS)
def product(request, library):
    """A recurrent product this CPU runs, set for the test (skipped where the CPU lacks it)."""
    if request.param not in native.products():
        pytest.skip(f"this CPU runs {native.products()}, not {request.param}")
    with fr.config.scope(recurrent_product=request.param):
        yield request.param
