"""Tiny models shared by tests."""

import torch
from torch import nn


class ResidualNet(nn.Module):
    """conv-bn-relu, a residual add, max-pool, global average pool, linear classifier."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.conv(x) + x
        x = self.pool(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class DepthwiseNet(nn.Module):
    """MobileNet-style block: depthwise 3x3 + ReLU6, pointwise 1x1, classifier."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, 2 * c, 1)
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x):
        x = nn.functional.relu6(self.stem(x))
        x = nn.functional.relu6(self.dw(x))
        x = self.pw(x)
        return self.fc(x.mean((2, 3)))


class ConcatNet(nn.Module):
    """Two branches concatenated (inception-style) then a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.mix(y)


def calibration_batches(n: int = 4, batch: int = 8, size: int = 16):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def tiny_bert_encoder(vocab_size: int = 120, *, pooling_layer: bool = False):
    """A seeded, randomly initialised 2-layer BERT (hidden 32, 2 heads) inside a `SentenceEncoder`."""
    import transformers

    from eightbit.text import SentenceEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return SentenceEncoder(transformers.BertModel(config, add_pooling_layer=pooling_layer)).eval()


class LinearGeluChain(nn.Module):
    """Tiny linears separated by float GELUs: every int8 linear needs its own QuantizeLinear, which costs more than
    the 8x8 matmul saves, so the int8 model is slower than fp32 by a wide margin (about 2x per op on ORT)."""

    def __init__(self, width: int = 8, depth: int = 16):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for fc in self.fcs:
            x = nn.functional.gelu(fc(x))
        return x
