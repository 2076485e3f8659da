"""Collapsed ranges: a calibrated range that leaves nearly all of a tensor's values in a handful of codes is
reported (issue 10: one outlier value made every method return an all-zero int8 model, silently)."""

import warnings

import pytest
import torch
from torch import nn

from eightbit import CollapsedRangeWarning, QuantConfig, quantize, uint8_activations
from tests.helpers import DepthwiseNet, ResidualNet, calibration_batches


def _outlier_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()


def _outlier_batch():
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))  # 49k values ...
    x[0, 0, 5, 5] = 1e4  # ... and one outlier
    return x


def _cosine(model, qm) -> float:
    test = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float(nn.functional.cosine_similarity(model(test).flatten(), qm(test).flatten(), dim=0))


def test_one_outlier_under_minmax_warns_naming_the_tensor_and_the_fix():
    model = _outlier_net()
    with pytest.warns(CollapsedRangeWarning, match=r"tensor 'input_1'.*minmax.*use percentile, mse or kl"):
        qm = quantize(model, [_outlier_batch()], progress=False)
    assert "note: tensor 'input_1'" in qm.summary()
    assert any("tensor 'input_1'" in n for n in qm.notes)


@pytest.mark.parametrize("method", ["mse", "kl"])
def test_clipping_methods_keep_the_model_past_one_outlier(method):
    # Cosine with fp32 was 0.0 (mse) and 0.29 (kl): the outlier set every downstream range.
    model = _outlier_net()
    config = QuantConfig(activations=uint8_activations(method=method))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapsedRangeWarning)
        qm = quantize(model, [_outlier_batch()], config=config, progress=False)
    assert _cosine(model, qm) > 0.95


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "kl"])
@pytest.mark.parametrize("net", [DepthwiseNet, ResidualNet])
def test_healthy_models_raise_no_collapsed_range_warning(net, method):
    config = QuantConfig(activations=uint8_activations(method=method))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapsedRangeWarning)
        qm = quantize(net().eval(), calibration_batches(), config=config, progress=False)
    assert not qm.notes


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("kind", ["binary", "sparse_relu", "constant"])
def test_discrete_or_spiky_data_is_not_reported(kind):
    # Values that are few and exact (a 0/1 mask, exact zeros with a sparse signal, a constant) sit in few codes
    # without losing anything.
    g = torch.Generator().manual_seed(0)
    if kind == "binary":
        data = [(torch.rand(64, 16, generator=g) > 0.5).float() for _ in range(4)]
    elif kind == "sparse_relu":
        data = [torch.relu(torch.randn(64, 16, generator=g) - 3.2) for _ in range(4)]
    else:
        data = [torch.full((64, 16), 0.7) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapsedRangeWarning)
        quantize(_Masked().eval(), data, progress=False)


@pytest.mark.parametrize("method", ["minmax", "ema"])
@pytest.mark.parametrize("outlier_batch", [0, 1])
def test_a_constant_crushed_to_zero_by_an_outlier_is_reported(method, outlier_batch):
    # Fuzz seed 21: a constant input channel (0.25) plus one 1e4 outlier.  The range [0, 1e4] (minmax; ema's is
    # [0, ~810]) rounds the constant to code 0, so the model sees zeros: exact values are harmless only if the
    # range can represent them.  The constant must stay resolved in the histogram the check reads, whether the
    # outlier comes with the first batch or a later one.
    data = [torch.full((64, 16), 0.25) for _ in range(4)]
    data[outlier_batch][0, 0] = 1e4
    config = QuantConfig(activations=uint8_activations(method=method))
    with pytest.warns(CollapsedRangeWarning, match=r"tensor 'x'"):
        quantize(_Masked().eval(), data, config=config, progress=False)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_one_outlier_sample_in_a_small_tensor_is_reported(method):
    # Fuzz seeds 5 and 56: a pooled head holds one value per sample and channel, so one outlier sample of 16 is
    # 6% of its values, not the <1% a collapse needed; every method (rightly) keeps those values and the other 94%
    # fall in a few codes.
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 16, generator=g) for _ in range(4)]
    data[1][0] = torch.linspace(100.0, 1e3, 16)  # spread over the range, as an outlier sample's features are
    config = QuantConfig(activations=uint8_activations(method=method))
    with pytest.warns(CollapsedRangeWarning, match=r"tensor 'x'"):
        quantize(_Masked().eval(), data, config=config, progress=False)
