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
