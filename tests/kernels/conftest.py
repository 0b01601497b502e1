"""What every kernel test shares: one intra-op thread, the setting the kernels serve (`processes: N` recipes,
`cct bench`)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The kernels run in processes of one intra-op thread; where a CPU kind turns them off, that is why not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
