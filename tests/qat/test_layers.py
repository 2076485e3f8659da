"""Simulated BatchNorm folding in QATLayer against the float conv -> BatchNorm it replaces."""

import copy

import torch
from torch import nn

from eightbit.qat import BatchNormMode, QATConfig, prepare_qat
from eightbit.qat.layers import BatchNormState, QATLayer
from tests.helpers import ResidualNet, calibration_batches


def _conv_bn():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 3.0)
    state = BatchNormState(bn.weight, bn.bias, bn.running_mean, bn.running_var, eps=bn.eps, momentum=bn.momentum)
    layer = QATLayer("conv2d", torch.ops.aten.conv2d.default, ([1, 1], [1, 1]), {}, conv.weight, conv.bias, None, state)
    return conv, bn, layer


def test_simulated_folding_matches_conv_then_batchnorm_in_eval_mode():
    conv, bn, layer = _conv_bn()
    x = torch.randn(4, 3, 8, 8)
    layer.eval()
    assert torch.allclose(layer(x), bn.eval()(conv(x)), atol=1e-5)


def test_training_mode_uses_batch_statistics_and_updates_running_ones():
    conv, bn, layer = _conv_bn()
    x = torch.randn(4, 3, 8, 8)
    reference = copy.deepcopy(bn).train()
    layer.train()
    assert torch.allclose(layer(x), reference(conv(x)), atol=1e-5)
    assert torch.allclose(layer.batchnorm.running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(layer.batchnorm.running_var, reference.running_var, atol=1e-5)


def test_frozen_batchnorm_uses_running_statistics_in_training_mode():
    conv, bn, layer = _conv_bn()
    x = torch.randn(4, 3, 8, 8)
    layer.train()
    layer.bn_frozen = True
    before = layer.batchnorm.running_mean.clone()
    assert torch.allclose(layer(x), bn.eval()(conv(x)), atol=1e-5)
    assert torch.equal(layer.batchnorm.running_mean, before)


def test_freeze_bn_after_and_fold_at_start():
    data = calibration_batches()
    model = ResidualNet().eval()
    simulated = prepare_qat(model, data, qat=QATConfig(freeze_bn_after=2), progress=False)
    (bn_layer,) = [layer for layer in simulated.layers().values() if layer.batchnorm is not None]
    states = []
    for x in data[:3]:
        simulated(x)
        states.append(bn_layer.bn_frozen)
    assert states == [False, False, True]
    folded = prepare_qat(model, data, qat=QATConfig(batchnorm=BatchNormMode.FOLD), progress=False)
    assert all(layer.batchnorm is None for layer in folded.layers().values())
    assert not any("batchnorm" in n for n, _ in folded.named_parameters())
    folded.eval()
    assert torch.equal(folded(data[0]), folded.ptq_model(data[0]))
