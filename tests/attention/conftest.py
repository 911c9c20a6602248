import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """These tests use tiny tensors: one thread is faster, and avoids spinning against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
