"""prepare_qat -> train -> convert: PTQ initialisation, training, state_dict, schedule, keep_float, export."""

import pytest
import torch
from torch import nn

from eightbit import QuantConfig, int8_weights, uint8_activations
from eightbit.qat import QATConfig, prepare_qat
from eightbit.qat.fake_quant import FakeQuantizer
from tests.helpers import DepthwiseNet, ResidualNet, calibration_batches


def _same_encodings(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].scale, a[k].zero_point, a[k].qmin, a[k].qmax, a[k].axis, a[k].tensors) == (
            b[k].scale,
            b[k].zero_point,
            b[k].qmin,
            b[k].qmax,
            b[k].axis,
            b[k].tensors,
        ), k


def _train(qat, data, steps=3, lr=1e-2):
    teacher = qat.ptq_model
    opt = torch.optim.SGD(qat.parameters(), lr=lr)  # stateless: a resumed model continues identically
    qat.train()
    for i in range(steps):
        x = data[i % len(data)]
        with torch.no_grad():
            target = teacher(x)
        out = qat(x)
        loss = (out - target).pow(2).mean() + out.abs().mean() * 0.1
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qat.eval()


@pytest.mark.parametrize(
    "model_cls, config",
    [
        (ResidualNet, QuantConfig()),
        (DepthwiseNet, QuantConfig()),
        (ResidualNet, QuantConfig(activations=uint8_activations(method="percentile"))),
        (DepthwiseNet, QuantConfig(weights=int8_weights(bits=4), activations=uint8_activations(bits=4))),
        (
            ResidualNet,
            QuantConfig(weights=int8_weights(power_of_two=True), activations=uint8_activations(power_of_two=True)),
        ),
    ],
)
def test_qat_model_converted_before_training_equals_its_ptq_model(model_cls, config):
    torch.manual_seed(0)
    data = calibration_batches()
    qat = prepare_qat(model_cls().eval(), data, config=config, progress=False)
    ptq = qat.ptq_model
    converted = qat.convert()
    _same_encodings(converted.activation_encodings, ptq.activation_encodings)
    _same_encodings(converted.weight_encodings, ptq.weight_encodings)
    qat.eval()
    for x in data:
        assert torch.equal(converted(x), ptq(x))
        assert torch.equal(qat(x), ptq(x))  # eval-mode QAT computes exactly what the int8 model computes


def test_trained_qat_model_converts_exports_and_matches_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    data = calibration_batches()
    model = ResidualNet().eval()
    qat = prepare_qat(model, data, progress=False)
    before = {k: v.clone() for k, v in qat.state_dict().items() if isinstance(v, torch.Tensor)}
    _train(qat, data, steps=4)
    changed = [k for k, v in qat.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any(k.endswith("quantizer.scale") for k in changed) and any(k.endswith(".weight") for k in changed)
    assert any("running_mean" in k for k in changed)  # BatchNorm trained with batch statistics
    converted = qat.convert()
    for x in data:
        assert torch.equal(converted(x), qat(x))
    report = converted.export_onnx(tmp_path / "qat.onnx")
    assert report.parity.mismatched_fraction < 0.01 and report.parity.max_steps <= 1.0
    assert "int8" in converted.summary()
    for p in model.parameters():  # the float model is never touched
        assert p.grad is None


def test_parameters_are_shadow_weights_and_quantization_parameters_and_all_get_gradients():
    data = calibration_batches()
    qat = prepare_qat(ResidualNet().eval(), data, progress=False)
    names = [n for n, p in qat.named_parameters() if p.requires_grad]
    assert any(n.endswith("quantizer.scale") for n in names) and any(n.endswith("batchnorm.weight") for n in names)
    qat.train()
    qat(data[0]).sum().backward()
    assert [n for n, p in qat.named_parameters() if p.requires_grad and p.grad is None] == []
    weights, quant = qat.parameter_groups()
    assert len(weights) + len(quant) == len(names) and all(p.dim() <= 1 for p in quant)


def test_state_dict_resume_continues_identically(tmp_path):
    data = calibration_batches()
    config = QATConfig(observe_steps=2, freeze_bn_after=3)
    model = ResidualNet().eval()
    first = _train(prepare_qat(model, data, qat=config, progress=False), data, steps=3)
    torch.save(first.state_dict(), tmp_path / "qat.pt")
    resumed = prepare_qat(model, data, qat=config, progress=False)
    resumed.load_state_dict(torch.load(tmp_path / "qat.pt"))
    resumed.eval()
    assert resumed.steps == 3 and not any(q.observing for q in resumed.quantizers().values())
    for x in data:
        assert torch.equal(resumed(x), first(x))
    assert _same_state(_train(resumed, data, 2), _train(first, data, 2))


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.allclose(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa
    )


def test_schedule_observes_then_learns_then_freezes():
    data = calibration_batches()
    qat = prepare_qat(
        DepthwiseNet().eval(), data, qat=QATConfig(observe_steps=2, freeze_quantizers_after=4), progress=False
    )
    seen = []
    qat.train()
    for i in range(5):
        qat(data[i % len(data)])
        q = next(iter(qat.quantizers().values()))
        seen.append((q.observing, q.learning))
    assert seen == [(True, False), (True, False), (False, True), (False, True), (False, False)]


def test_keep_float_modules_carry_no_fake_quantizers():
    data = calibration_batches()
    qat = prepare_qat(ResidualNet().eval(), data, config=QuantConfig(keep_float=("fc",)), progress=False)
    layers = qat.layers()
    fc = [layer for layer in layers.values() if layer.target is torch.ops.aten.linear.default]
    assert len(fc) == 1 and fc[0].quantizer is None
    assert all(layer.quantizer is not None for layer in layers.values() if layer not in fc)
    assert not any(isinstance(m, FakeQuantizer) for m in fc[0].modules())
    converted = qat.convert()
    assert "linear" in converted.placement.float_ops and "linear" not in converted.weight_encodings


class InputNorm(nn.Module):
    """A BatchNorm on the model input (preprocessing), then conv-bn-relu.  The conv zero-pads its input, so the
    input BN cannot be folded forward into it (its shift would be wrong on the border) and stays a BN."""

    def __init__(self):
        super().__init__()
        self.pre = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.pre.running_mean.fill_(0.5)
            self.pre.running_var.fill_(4.0)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(self.pre(x))))


def test_batchnorm_on_the_input_is_frozen_from_the_start():
    data = calibration_batches()
    qat = prepare_qat(InputNorm().eval(), data, progress=False)
    frozen = {n: p for n, p in qat.named_parameters() if n.startswith("graph_module.pre.")}
    assert frozen and not any(p.requires_grad for p in frozen.values())
    running = {n: b.clone() for n, b in qat.named_buffers() if n.startswith("graph_module.pre.")}
    _train(qat, data, steps=2)
    assert all(torch.equal(b, running[n]) for n, b in qat.named_buffers() if n in running)
    assert len(qat.layers()) == 1 and next(iter(qat.layers().values())).batchnorm is not None
