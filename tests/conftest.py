import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist): each worker, and the processes it starts, uses one
    # thread, so two workers never oversubscribe the cores (OpenMP threads spinning on a shared core are many times
    # slower than one thread)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"
    torch.set_num_threads(1)


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
