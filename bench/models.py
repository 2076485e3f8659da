"""Benchmark CNNs written out by hand, architecture- and parameter-name-identical to torchvision.

torchvision is deliberately not a dependency (it pins its own torch build); these definitions follow
torchvision's ResNet (v1.5: stride on the 3x3 conv of a bottleneck) and MobileNetV2 code, including module
names, so a torchvision state_dict would load into them. Weights are randomly initialised the way torchvision
does it: only speed is measured with them, not accuracy.

torchvision's initialisation alone leaves eval-mode BatchNorm as an identity, and then activations drift
by orders of magnitude through the network (MobileNetV2's depthwise convs, initialised with fan_out =
channels * 9, shrink them to ~1e-9 logits, which an int8 quantizer rounds to exactly 0). The builders
therefore "settle" BatchNorm by default: running statistics measured on a few random batches, as training
would leave them, so every layer sees unit-scale activations and int8-vs-fp32 agreement means something.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["BenchModel", "build", "mobilenet_v2", "resnet18", "resnet50", "settle_batchnorm"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 residual block: two 3x3 convs."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50+ residual block: 1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet with the default (non-grouped, non-dilated) configuration."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation as MobileNetV2 uses it: Conv (no bias) -> BN -> ReLU6."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = cout


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expand, 3x3 depthwise, linear 1x1 project, residual if shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel_size=1))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.MobileNetV2 with width 1.0."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        # t (expansion), c (channels), n (repeats), s (first stride)
        settings = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2]]
        settings.append([6, 320, 1, 1])
        input_channel, self.last_channel = 32, 1280
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2)]
        for t, c, n, s in settings:
            output_channel = _make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def settle_batchnorm(model: nn.Module, steps: int = 2, batch: int = 4, seed: int = 0) -> nn.Module:
    """Set every BatchNorm's running statistics from random 224x224 inputs; returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the steps rather than an exponential one
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(batch, 3, 224, 224, generator=gen))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def _finish(model: nn.Module, settle_bn: bool, seed: int) -> nn.Module:
    return settle_batchnorm(model, seed=seed) if settle_bn else model.eval()


def resnet18(seed: int = 0, settle_bn: bool = True) -> ResNet:
    """ResNet-18 (11,689,512 parameters), random init, eval mode (BatchNorm settled by default)."""
    torch.manual_seed(seed)
    return _finish(ResNet(BasicBlock, [2, 2, 2, 2]), settle_bn, seed)


def resnet50(seed: int = 0, settle_bn: bool = True) -> ResNet:
    """ResNet-50 v1.5 (25,557,032 parameters), random init, eval mode (BatchNorm settled by default)."""
    torch.manual_seed(seed)
    return _finish(ResNet(Bottleneck, [3, 4, 6, 3]), settle_bn, seed)


def mobilenet_v2(seed: int = 0, settle_bn: bool = True) -> MobileNetV2:
    """MobileNetV2 1.0 (3,504,872 parameters), random init, eval mode (BatchNorm settled by default)."""
    torch.manual_seed(seed)
    return _finish(MobileNetV2(), settle_bn, seed)


class BenchModel(enum.Enum):
    """Models the benchmark knows how to build."""

    RESNET18 = "resnet18"
    RESNET50 = "resnet50"
    MOBILENET_V2 = "mobilenet_v2"


_BUILDERS: dict[BenchModel, Callable[..., nn.Module]] = {
    BenchModel.RESNET18: resnet18,
    BenchModel.RESNET50: resnet50,
    BenchModel.MOBILENET_V2: mobilenet_v2,
}


def build(model: BenchModel, seed: int = 0, settle_bn: bool = True) -> nn.Module:
    """Instantiate a benchmark model (eval mode) by enum member."""
    try:
        builder = _BUILDERS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; valid: {[m.value for m in _BUILDERS]}") from None
    return builder(seed, settle_bn=settle_bn)
