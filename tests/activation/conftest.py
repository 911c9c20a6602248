import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """These tests use tiny models: one thread is as fast, and far faster on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
