"""Tiny models with a planted activation outlier, shared by the analysis tests."""

import torch
from torch import nn


class OutlierMLP(nn.Module):
    """Four linear layers; fc2's channel 0 always outputs ~40 while every other activation is of size ~1, so fc3's
    input range is set by one channel and its other channels get a few codes.  fc3's weights on that channel are
    scaled down so the model's output stays of ordinary size.  Only fc3 (op `linear_2`) quantizes that tensor
    (linear outputs stay float), so keeping fc3 float removes the error."""

    OUTLIER_OP = "linear_2"

    def __init__(self, outlier: float = 40.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 32)
        self.fc3, self.fc4 = nn.Linear(32, 32), nn.Linear(32, 10)
        with torch.no_grad():
            self.fc2.bias[0] = outlier
            self.fc3.weight[:, 0] *= 1.0 / outlier

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.fc4(x)


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 16, generator=g) for _ in range(n)]
