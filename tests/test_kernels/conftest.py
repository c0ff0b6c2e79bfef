import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Kernel test tensors are tiny: intra-op threads only add fork/join cost, and on a shared 2-core machine an
    OpenMP team waiting for a descheduled thread turns every op into a scheduler time slice (30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
