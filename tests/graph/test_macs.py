"""The int8 share is counted in multiply-accumulates from the captured shapes, and quantize warns (naming the
largest float ops and why) when too much stays float."""

import warnings

import pytest
import torch
from torch import nn

import eightbit
from eightbit import MostlyFloatWarning as PublicWarning
from eightbit.api import _prepare
from eightbit.config import OpKind, QuantConfig
from eightbit.graph.capture import capture
from eightbit.graph.macs import (
    FLOAT_MAC_WARNING_SHARE,
    MostlyFloatWarning,
    count_macs,
    node_macs,
    warn_if_mostly_float,
)
from eightbit.graph.placement import place
from tests.helpers import ResidualNet, calibration_batches


class Products(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x, q, k):
        y = self.fc(self.conv(x).mean((2, 3)))
        scores = torch.matmul(q, k.transpose(-1, -2))
        return y, torch.bmm(scores, k), torch.einsum("bqd,bkd->bqk", q, k)


def test_node_macs_from_recorded_shapes():
    x, q, k = torch.randn(2, 4, 5, 5), torch.randn(2, 7, 3), torch.randn(2, 9, 3)
    gm = capture(Products().eval(), (x, q, k)).graph_module
    found = {str(n.target): node_macs(gm, n) for n in gm.graph.nodes if node_macs(gm, n)}
    assert found == {
        "aten.conv2d.default": 2 * 6 * 5 * 5 * (4 // 2) * 3 * 3,
        "aten.linear.default": 2 * 5 * 6,
        "aten.matmul.default": 2 * 7 * 9 * 3,
        "aten.bmm.default": 2 * 7 * 3 * 9,
        "aten.einsum.default": 2 * 7 * 9 * 3,
    }


def test_share_counts_macs_not_op_rows():
    model = ResidualNet().eval()
    x = calibration_batches(1)[0]
    gm = capture(model, (x,)).graph_module
    report = count_macs(gm, place(gm, QuantConfig(keep_float=("fc",))))
    assert report.int8_share > 0.99  # the float classifier is one op of a few, but a tiny share of the work
    report = count_macs(gm, place(gm, QuantConfig(keep_float=("conv",))))
    stem, conv = (n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    assert report.float[conv.name] == (node_macs(gm, conv), "module 'conv' kept float by config")
    assert report.int8_share == pytest.approx(1 - node_macs(gm, conv) / report.total)
    assert report.headline().startswith(f"int8 share: {100 * report.int8_share:.1f}% of ")


def test_warning_names_the_largest_float_ops_and_why():
    model = ResidualNet().eval()
    gm = capture(model, (calibration_batches(1)[0],)).graph_module
    with pytest.warns(
        MostlyFloatWarning, match=r"(?s)only .*% of the multiply-accumulates.*conv.*kept float by config"
    ):
        warn_if_mostly_float(count_macs(gm, place(gm, QuantConfig(keep_float_ops=(OpKind.CONV,)))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_mostly_float(count_macs(gm, place(gm, QuantConfig())))
    assert 0 < FLOAT_MAC_WARNING_SHARE < 1 and PublicWarning is MostlyFloatWarning


def test_quantize_warns_and_summary_opens_with_the_int8_share():
    data = calibration_batches(2)
    with pytest.warns(MostlyFloatWarning):
        qm = eightbit.quantize(
            ResidualNet().eval(), data, config=QuantConfig(keep_float_ops=(OpKind.CONV,)), progress=False
        )
    assert qm.summary().startswith("int8 share: ")
    assert "kept float by config" in qm.summary().splitlines()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MostlyFloatWarning)
        qm = eightbit.quantize(ResidualNet().eval(), data, progress=False)
    assert qm.summary().startswith("int8 share: 100.0% of ")


def test_unsupported_spelling_is_named_as_the_reason():
    class OddProduct(nn.Module):  # a three-operand einsum has no int8 rule
        def forward(self, a, b, c):
            return torch.einsum("ij,jk,kl->il", a, b, c)

    args = (torch.randn(4, 5), torch.randn(5, 6), torch.randn(6, 3))
    prepared = _prepare(OddProduct().eval(), args, QuantConfig())
    report = count_macs(prepared.gm, prepared.placement)
    ((_, macs, why),) = report.top_float()
    assert macs == 4 * 5 * 6 * 3 and "no int8 rule for aten.einsum" in why
