"""Tiny models covering every op of the TFLite int8 export (shared by tests/export and tests/integer)."""

import torch
import torch.nn.functional as F
from torch import nn

import eightbit
from eightbit import Granularity, QuantConfig, Target, int8_weights, uint8_activations
from tests.helpers import ConcatNet, DepthwiseNet, ResidualNet, calibration_batches


class ConvVariants(nn.Module):
    """Stride 2 with PyTorch padding (explicit PAD), dilation, groups, depthwise x2 multiplier, 5x5, avg-pool."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.d = nn.Conv2d(16, 8, 5, padding=2, stride=2)
        self.e = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.relu6(self.b(x))
        x = self.d(self.c(x))
        return F.avg_pool2d(self.e(x), 2)


class Broadcasting(nn.Module):
    """ADD and MUL broadcasting (N,C,1,1) against (N,C,H,W), concatenation."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        a = self.a(x)
        b = self.b(x).mean((2, 3), keepdim=True)
        return torch.cat([a + b, a * b], 1)


class Activations(nn.Module):
    """hard-swish, squeeze-excite (MEAN, LOGISTIC, MUL), max-pool with SAME padding, flatten of an NHWC tensor
    (TRANSPOSE + RESHAPE), linear, softmax."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.f = nn.Conv2d(8, 8, 1)
        self.g = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 6)

    def forward(self, x):
        x = F.hardswish(self.a(x))
        x = x * torch.sigmoid(self.f(x.mean((2, 3), keepdim=True)))
        x = F.max_pool2d(F.max_pool2d(self.g(x), 3, stride=1, padding=1), 4)
        return torch.softmax(self.fc(x.flatten(1)), -1)


class HardSwishNet(nn.Module):
    """HARD_SWISH between two convolutions (MobileNetV3's activation)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.b(F.hardswish(self.a(x)))


MODELS = {
    "residual": ResidualNet,
    "depthwise": DepthwiseNet,
    "concat": ConcatNet,
    "conv_variants": ConvVariants,
    "broadcasting": Broadcasting,
    "activations": Activations,
    "hardswish": HardSwishNet,
}

SCHEMES = {
    "per_channel": {},
    "per_tensor": {"weights": int8_weights(granularity=Granularity.PER_TENSOR)},
    "power_of_two": {
        "weights": int8_weights(power_of_two=True),
        "activations": uint8_activations(power_of_two=True),
    },
}


def quantized(name: str, scheme: str = "per_channel"):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    config = QuantConfig(target=Target.TFLITE, **SCHEMES[scheme])
    return eightbit.quantize(model, calibration_batches(n=2), config=config, progress=False)
