import os

import pytest
import torch

# Two cores are shared by everything on the CI machine: keep tests single-threaded and deterministic.
torch.set_num_threads(int(os.environ.get("DINOKIT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
