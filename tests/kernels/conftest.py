import pytest


@pytest.fixture(scope="session", autouse=True)
def sparse_kernels():
    """Build (or load the cached) C++ extension once per test session."""
    from sparselm.kernels.extension import load_extension

    return load_extension()
