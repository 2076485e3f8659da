import pytest
import torch
from torch import nn

from eightbit.config import QuantConfig
from eightbit.graph.capture import capture
from eightbit.graph.placement import place
from eightbit.graph.transforms.smooth_quant import (
    apply_smoothing,
    record_channel_absmax,
    smoothing_scales,
    smoothing_targets,
)


def test_smoothing_scales_formula_and_zero_channels():
    act = torch.tensor([8.0, 1.0, 0.0, 2.0])
    weight = torch.tensor([0.5, 2.0, 1.0, 0.0])
    s = smoothing_scales(act, weight, alpha=0.5)
    assert s[0].item() == pytest.approx((8.0**0.5) / (0.5**0.5))
    assert s[1].item() == pytest.approx(1.0 / 2.0**0.5)
    assert s[2].item() == 1.0 and s[3].item() == 1.0  # an all-zero side leaves the channel alone


class Block(nn.Module):
    """LayerNorm output read by two linears and a float residual add (the post-LN BERT pattern)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.norm2 = nn.LayerNorm(16)
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.ffn = nn.Linear(16, 16)

    def forward(self, x):
        h = self.norm(x)
        h = self.norm2(h + self.q(h) * self.k(h))
        return self.ffn(torch.nn.functional.gelu(h))


def test_smoothing_keeps_fp32_outputs():
    model = Block().eval()
    with torch.no_grad():
        model.norm.weight[3] = 40.0  # an outlier channel
    x = torch.randn(4, 6, 16)
    gm = capture(model, (x,)).graph_module
    placement = place(gm, QuantConfig())
    targets = smoothing_targets(gm, placement)
    # The LayerNorm output (read by q and k) and the GELU output (read by ffn); the residual reads float.
    assert sorted(len(v) for v in targets.values()) == [1, 2]
    absmax = record_channel_absmax(gm, list(targets), lambda g: g(x))
    assert all(a.shape == (16,) for a in absmax.values())
    want = model(x)
    assert apply_smoothing(gm, targets, absmax, alpha=0.5) == 2
    muls = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert len(muls) == 3  # the model's own q * k, plus one scaling per smoothed tensor
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    smoothed_absmax = record_channel_absmax(gm, [m.name for m in muls if "smooth" in str(m.args[1])], lambda g: g(x))
    for amax in smoothed_absmax.values():  # the outlier is flattened
        assert float(amax.max() / amax.median()) < 10.0
