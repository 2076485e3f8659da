import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eightbit.graph.capture import capture
from eightbit.graph.transforms.attention import attention_reference, decompose_attention


class Attention(nn.Module):
    def __init__(self, mask_kind: str, scale=None):
        super().__init__()
        self.mask_kind, self.scale = mask_kind, scale

    def forward(self, q, k, v, keep):
        if self.mask_kind == "bool":
            mask = keep[:, None, None, :].bool()
        elif self.mask_kind == "float":
            mask = (1.0 - keep[:, None, None, :].float()) * -1e4
        else:
            mask = None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


def _inputs(batch=2, heads=3, seq=5, dim=8):
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))
    keep = torch.ones(batch, seq, dtype=torch.long)
    keep[0, 3:] = 0
    return q, k, v, keep


@pytest.mark.parametrize("mask_kind,scale", [("bool", None), ("float", None), ("none", 0.3)])
def test_decomposition_matches_sdpa(mask_kind, scale):
    model = Attention(mask_kind, scale)
    args = _inputs()
    gm = capture(model, args).graph_module
    assert decompose_attention(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert targets.count(torch.ops.aten.matmul.default) == 2
    other = _inputs(batch=3)  # the dynamic batch still works after the rewrite
    for a in (args, other):
        torch.testing.assert_close(gm(*a), model(*a), rtol=1e-5, atol=1e-5)


def test_reference_matches_sdpa():
    q, k, v, keep = _inputs()
    mask = keep[:, None, None, :].bool()
    torch.testing.assert_close(attention_reference(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask))


def test_causal_attention_is_left_fused():
    class Causal(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    gm = capture(Causal(), _inputs()[:3]).graph_module
    assert decompose_attention(gm) == 0
