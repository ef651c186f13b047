"""Shared fixtures: every test is written once and runs on each backend that is usable here."""
import pytest

import minigrad


@pytest.fixture(params=["cpu", "cuda"])
def backend(request):
    """Device name for the code under test; "cuda" is skipped when CuPy has no working GPU."""
    if request.param == "cuda" and not minigrad.backend.cuda_available():
        pytest.skip("CUDA backend not available (CuPy missing or no GPU)")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """A fixed seed per test, so random inputs and dropout masks do not depend on test order."""
    minigrad.manual_seed(0)
    yield
