"""Fixtures shared across test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module (the 2-core CI machine runs fastest so, and is steady)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
