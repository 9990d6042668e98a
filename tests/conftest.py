import os

import pytest
import torch

# Triton kernels run in the interpreter on CPU; must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): small shapes run
    fastest on one thread, and CI's cores are shared. The previous setting comes back after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
