import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Sampler tests run many tiny ops; on a loaded 2-core machine torch's thread pool makes each
    one ~100x slower than a single thread does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
