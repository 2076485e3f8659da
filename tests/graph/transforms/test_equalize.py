import copy

import pytest
import torch
from torch import nn

from eightbit.config import Relu6Handling
from eightbit.graph.capture import capture
from eightbit.graph.transforms import fold_batchnorm, fuse_pad_into_conv
from eightbit.graph.transforms.equalize import (
    absorb_bias,
    absorbable_bias,
    bound_for_clip,
    equalization_scales,
    equalize_graph,
    equalize_pair,
    input_channel_ranges,
    output_channel_ranges,
    record_channel_max,
    relu6_layers,
)


def _unbalance(*layers):
    """Spread the output channels' ranges over 3 orders of magnitude, as BN folding does."""
    with torch.no_grad():
        for layer in layers:
            spread = torch.logspace(-1.5, 1.5, layer.weight.shape[0])[torch.randperm(layer.weight.shape[0])]
            layer.weight.mul_(spread.reshape(-1, *([1] * (layer.weight.dim() - 1))))
            if layer.bias is not None:
                layer.bias.mul_(spread)


class ConvChain(nn.Module):
    """conv -> act -> depthwise -> act -> conv -> (no act) conv."""

    def __init__(self, act):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(6, 4, 3)
        self.act = act
        _unbalance(self.a, self.dw, self.b)

    def forward(self, x):
        return self.c(self.b(self.act(self.dw(self.act(self.a(x))))))


class LinearChain(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(12, 10), nn.Linear(10, 3)
        self.act = act
        _unbalance(self.a, self.b)

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x)))))


def _ops(gm):
    return sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _capture(model, x):
    gm = capture(model.eval(), (x,)).graph_module
    fold_batchnorm(gm)
    fuse_pad_into_conv(gm)
    return gm


def _relative_error(got, want):
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max())


def test_scales_balance_ranges_as_the_formula_says():
    w1, w2 = torch.randn(8, 5, 3, 3) * torch.logspace(-2, 1, 8).reshape(-1, 1, 1, 1), torch.randn(4, 8, 1, 1)
    r1, r2 = output_channel_ranges(w1), input_channel_ranges(w2)
    s = equalization_scales(r1, r2)
    assert torch.allclose(r1.double() / s, r2.double() * s, rtol=1e-12)
    assert torch.allclose(s, torch.sqrt(r1.double() * r2.double()) / r2.double())
    new1, _, new2, _ = equalize_pair(w1, None, w2)
    assert torch.allclose(output_channel_ranges(new1), input_channel_ranges(new2), rtol=1e-5)


def test_zero_channels_keep_scale_one():
    s = equalization_scales(torch.tensor([0.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 3.0]))
    assert s.tolist() == [1.0, 1.0, 1.0]


def test_depthwise_second_layer_uses_its_filters():
    w = torch.randn(8, 1, 3, 3)
    assert torch.equal(input_channel_ranges(w, depthwise=True), output_channel_ranges(w))


@pytest.mark.parametrize(
    ("model", "pairs"), [(ConvChain(nn.ReLU()), 3), (LinearChain(nn.ReLU()), 2)], ids=["conv-dw-conv", "linear"]
)
def test_equalization_keeps_the_float_output_and_balances_each_pair(model, pairs):
    x = torch.randn(4, 3, 10, 10) if isinstance(model, ConvChain) else torch.randn(16, 6)
    gm = _capture(model, x)
    want, ops_before = gm(x), _ops(gm)
    report = equalize_graph(gm, relu6=Relu6Handling.SKIP, absorb_high_bias=False, tolerance=1e-7)
    assert report.pairs == pairs and report.spread_after < report.spread_before
    assert _relative_error(gm(x), want) <= 1e-4
    assert _ops(gm) == ops_before
    layers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _LAYER_TARGETS]
    weights = [getattr(gm, n.args[1].target) for n in layers]
    for first, second, node in zip(weights, weights[1:], layers[1:], strict=False):
        depthwise = second.shape[1] == 1 and first.shape[0] == second.shape[0] and node.args[-1] == second.shape[0]
        assert torch.allclose(output_channel_ranges(first), input_channel_ranges(second, depthwise), rtol=1e-4)


_LAYER_TARGETS = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}


def test_relu6_bounded_is_exact_on_the_data_and_respects_the_clip():
    model = ConvChain(nn.ReLU6())
    x = torch.randn(8, 3, 10, 10) * 3
    gm = _capture(model, x)
    want = gm(x)
    maxima = record_channel_max(gm, relu6_layers(gm), lambda g: g(x))
    assert set(maxima) == {"conv2d", "conv2d_1"} and torch.equal(gm(x), want)  # recorders removed again
    saturating = {k: v >= 6 for k, v in maxima.items()}
    assert any(s.any() for s in saturating.values()) and any((~s).any() for s in saturating.values())
    report = equalize_graph(gm, relu6=Relu6Handling.BOUNDED, channel_max=maxima, absorb_high_bias=False)
    assert report.pairs == 3 and report.relu6_replaced == 0
    assert _relative_error(gm(x), want) <= 1e-4
    after = record_channel_max(gm, relu6_layers(gm), lambda g: g(x))
    for name, peak in after.items():
        assert torch.all(peak[saturating[name]] == maxima[name][saturating[name]])  # untouched
        assert torch.all(peak[~saturating[name]] <= 6.0 * (1 + 1e-5))


def test_relu6_to_relu_equals_the_relu_model():
    model = ConvChain(nn.ReLU6())
    x = torch.randn(4, 3, 10, 10) * 3
    relu_model = copy.deepcopy(model)
    relu_model.act = nn.ReLU()
    gm = _capture(model, x)
    report = equalize_graph(gm, relu6=Relu6Handling.TO_RELU, absorb_high_bias=False)
    assert report.relu6_replaced == 2
    assert _relative_error(gm(x), relu_model(x)) <= 1e-4


def test_relu6_pairs_are_skipped_without_maxima_or_when_asked():
    gm = _capture(ConvChain(nn.ReLU6()), torch.randn(2, 3, 10, 10))
    assert equalize_graph(gm, relu6=Relu6Handling.BOUNDED).pairs == 1  # only b -> c (no activation)
    assert equalize_graph(gm, relu6=Relu6Handling.SKIP).pairs == 1


def test_bound_for_clip():
    s = torch.tensor([0.1, 0.1, 2.0], dtype=torch.float64)
    bounded = bound_for_clip(s, torch.tensor([3.0, 6.5, 1.0]), torch.tensor([False, True, False]))
    assert bounded.tolist() == [0.5, 1.0, 2.0]


def test_bias_absorption_is_exact_above_the_offset():
    w2, b2 = torch.randn(5, 4, 3, 3), torch.randn(5)
    b1 = torch.randn(4) + 3
    c = absorbable_bias(torch.tensor([2.0, 0.5, 4.0, -1.0]), torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert c.tolist() == [0.5, 0.0, 1.0, 0.0]
    new_b1, new_b2 = absorb_bias(b1, w2, b2, c)
    y = torch.rand(2, 4, 6, 6) * 3 + 1.0  # pre-activation without bias, all above c - b1 + b1: relu is linear
    want = nn.functional.conv2d(torch.relu(y + b1.reshape(1, -1, 1, 1)), w2, b2)
    got = nn.functional.conv2d(torch.relu(y + new_b1.reshape(1, -1, 1, 1)), w2, new_b2)
    assert torch.allclose(got, want, atol=1e-4)


class BnReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.bn.bias.copy_(torch.linspace(-1, 8, 8))
            self.bn.weight.fill_(0.5)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


def test_high_bias_absorption_from_folded_batchnorm_statistics():
    model = BnReluNet().eval()
    x = torch.randn(4, 3, 5, 5)
    gm = _capture(model, x)
    want = gm(x)
    report = equalize_graph(gm, relu6=Relu6Handling.SKIP, absorb_high_bias=True)
    assert report.absorbed == 1
    # BN output ~ N(beta, 0.5^2) as declared: channels with beta > 1.5 lose their offset, nearly exactly.
    assert _relative_error(gm(x), want) <= 1e-3
    first = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    # bias now ~ beta - 3 * 0.5 lower (in equalized units it must not exceed the original offset)
    assert float(getattr(gm, first.args[2].target).max()) < float(model.bn.bias.max())


def test_pipeline_equalizes_before_calibration_and_says_so():
    from eightbit import Equalize, Granularity, QuantConfig, calibrate, int8_weights, quantize
    from tests.helpers import DepthwiseNet, calibration_batches

    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    _unbalance(model.stem, model.dw)
    data = calibration_batches()
    per_tensor = int8_weights(granularity=Granularity.PER_TENSOR)
    config = QuantConfig(weights=per_tensor, equalize=Equalize())
    qm = quantize(model, data, config=config, progress=False)
    line = next(line for line in qm.summary().splitlines() if "cross-layer equalization" in line)
    assert "2 pairs" in line
    x = torch.cat(data)
    want = model(x).detach()
    plain = quantize(model, data, config=QuantConfig(weights=per_tensor), progress=False)
    assert (qm(x) - want).pow(2).mean() < (plain(x) - want).pow(2).mean()
    with pytest.raises(ValueError, match="other placement options"):
        calibrate(model, data, config=config, progress=False).quantize(QuantConfig(weights=per_tensor))
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(model, config=config, encodings=qm.encodings(), example_inputs=x)


def test_equalize_config_is_validated():
    from eightbit import Equalize, QuantConfig

    with pytest.raises(TypeError, match="Relu6Handling"):
        Equalize(relu6="skip")
    with pytest.raises(ValueError, match="max_rounds"):
        Equalize(max_rounds=0)
    with pytest.raises(TypeError, match="Equalize"):
        QuantConfig(equalize=True)
