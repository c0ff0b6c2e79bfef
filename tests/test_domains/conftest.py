import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a 2-core machine: one intra-op thread is several times faster than two that contend with
    other processes (measured: a training test took 30 s on one thread and 472 s on two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
