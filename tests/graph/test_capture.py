"""Capture errors say what is wrong with the input before blaming traceability."""

import pytest
import torch
from torch import nn

from eightbit.graph.capture import CaptureError, capture


def test_inputs_the_model_cannot_run_are_named_not_blamed_on_tracing():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    wrong = torch.randn(2, 16, 28, 28)  # 16 channels into a 1-channel conv: the input form is wrong
    with pytest.raises(CaptureError, match=r"fails on the example inputs.*\[2, 16, 28, 28\]") as info:
        capture(model, (wrong,))
    assert "traceable" not in str(info.value)


def test_runnable_model_captures():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    assert capture(model, (torch.randn(2, 1, 8, 8),)).graph_module is not None
