import pytest
import torch

from tests.support import models


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_dit():
    """The shared tiny-DiT builder, :func:`tests.support.models.tiny_dit`."""
    return models.tiny_dit


@pytest.fixture
def tiny_block_lm():
    """The shared tiny block-diffusion LM builder, :func:`tests.support.models.tiny_block_lm`."""
    return models.tiny_block_lm


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny networks: a second thread only adds contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
