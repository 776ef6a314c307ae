import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _quiet_tdq_logs():
    logging.getLogger("tdq").setLevel(logging.ERROR)
    yield


@pytest.fixture
def one_thread():
    """Run the test on one CPU thread (two-thread OpenMP is many times slower on a build machine shared with other
    jobs); files use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
