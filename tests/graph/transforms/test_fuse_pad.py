import torch
from torch import nn

from eightbit.graph.capture import capture
from eightbit.graph.transforms import fuse_pad_into_conv
from eightbit.graph.transforms.fuse_pad import conv_pads


def test_conv_pads_converts_torch_order_to_onnx_order():
    assert conv_pads([0, 1, 2, 3], [1, 0]) == [3, 0, 4, 1]


class PadConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 5, groups=4, dilation=2)

    def forward(self, x):
        x = self.a(nn.functional.pad(x, (0, 1, 0, 1)))
        y = self.b(nn.functional.pad(x, (1, 2, 3, 4)))
        return y, nn.functional.pad(y, (1, 1, 1, 1), value=0.5)  # nonzero value: left alone


def test_zero_pad_before_conv_is_fused_exactly():
    model = PadConv().eval()
    x = torch.randn(2, 3, 17, 19)
    gm = capture(model, (x,)).graph_module
    assert fuse_pad_into_conv(gm) == 2
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count("eightbit.conv2d_padded.default") == 2 and targets.count("aten.conv2d.default") == 0
    assert targets.count("aten.pad.default") == 1
    for got, want in zip(gm(x), model(x), strict=True):
        assert torch.allclose(got, want, atol=1e-6)
