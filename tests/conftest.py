import os

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_speed_check(monkeypatch):
    """`eightbit quantize` times int8 against fp32 and refuses a slower model; the suite's toy models are not what
    that check is about (tests of the check delete this variable)."""
    monkeypatch.setenv("EIGHTBIT_SKIP_SPEED_CHECK", "1")
