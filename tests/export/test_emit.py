"""Direct ONNX emission: the same operators and the same ONNX Runtime outputs as the dynamo exporter."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from eightbit import Granularity, QuantConfig, quantize, uint8_activations
from eightbit.export import emit
from eightbit.export.onnx import DIRECT, DYNAMO, _dynamo_model
from tests.helpers import ConcatNet, DepthwiseNet, ResidualNet, calibration_batches


class MobileBlock(nn.Module):
    """Hard-swish, a squeeze-excite gate (sigmoid, mul), average pooling and TF-style asymmetric padding."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.squeeze = nn.Conv2d(8, 8, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        x = nn.functional.hardswish(self.stem(self.pad(x)))
        x = x * torch.sigmoid(self.squeeze(x.mean((2, 3), keepdim=True)))
        return self.fc(torch.flatten(self.pool(x), 1))


MODELS = {"residual": ResidualNet, "depthwise": DepthwiseNet, "concat": ConcatNet, "mobile": MobileBlock}


def _quantized(name: str, config: QuantConfig | None = None):
    torch.manual_seed(0)
    return quantize(MODELS[name]().eval(), calibration_batches(), config=config, progress=False)


def _emit_both(qm):
    kwargs = dict(input_names=qm.input_names, dynamic_axes=qm.dynamic_axes, opset=20)
    direct = emit.emit_model(qm.graph_module, qm._example_args, **kwargs)
    dynamo = _dynamo_model(qm.graph_module, qm._example_args, **kwargs)
    return direct, dynamo


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.op_type not in ("Identity", "Constant"))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_direct_emission_matches_the_dynamo_exporter(name):
    qm = _quantized(name)
    direct, dynamo = _emit_both(qm)
    onnx.checker.check_model(direct, full_check=True)
    assert _op_counts(direct) == _op_counts(dynamo)
    for batch in (1, 5):  # the batch axis is dynamic in both
        x = torch.randn(batch, 3, 16, 16).numpy()
        np.testing.assert_allclose(_run(direct, x), _run(dynamo, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_of_cnns_takes_the_direct_path(name, tmp_path):
    report = _quantized(name).export_onnx(tmp_path / "m.onnx")
    assert report.exporter == DIRECT
    assert report.parity.max_steps < 3


@pytest.mark.parametrize(
    "activations",
    [uint8_activations(bits=4), uint8_activations(granularity=Granularity.PER_CHANNEL)],
    ids=["4-bit", "per-channel"],
)
def test_direct_emission_of_other_activation_schemes_matches_the_simulation(activations):
    qm = _quantized("depthwise", QuantConfig(activations=activations))
    model = emit.emit_model(
        qm.graph_module, qm._example_args, input_names=qm.input_names, dynamic_axes=qm.dynamic_axes, opset=20
    )
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = qm(x).numpy()
    got = _run(model, x.numpy())
    assert np.abs(got - want).max() <= 3 * float(want.max() - want.min()) / 255


class FlipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.flip(self.conv(x), dims=[3])  # no direct handler for flip


def test_unsupported_op_falls_back_to_dynamo(tmp_path):
    qm = quantize(FlipNet().eval(), calibration_batches(), progress=False)
    with pytest.raises(emit.Unsupported, match="flip"):
        emit.emit_model(qm.graph_module, qm._example_args, input_names=["x"], dynamic_axes=qm.dynamic_axes, opset=20)
    report = qm.export_onnx(tmp_path / "flip.onnx")
    assert report.exporter == DYNAMO
    assert report.parity.max_steps < 3


def test_a_failing_handler_warns_and_falls_back(tmp_path, monkeypatch):
    def broken(em, node):
        raise RuntimeError("handler bug")

    monkeypatch.setitem(emit.HANDLERS, torch.ops.aten.conv2d.default, broken)
    qm = _quantized("residual")
    with pytest.warns(UserWarning, match="direct ONNX emission failed.*handler bug"):
        report = qm.export_onnx(tmp_path / "m.onnx")
    assert report.exporter == DYNAMO and report.parity.max_steps < 3


def test_a_tensor_read_twice_becomes_one_initializer():
    qm = _quantized("residual")
    graph = qm.graph_module.graph
    first = next(n for n in graph.nodes if n.op == "get_attr")
    with graph.inserting_after(first):
        again = graph.get_attr(first.target)  # a second read of the same attribute
    next(iter(first.users)).replace_input_with(first, again)
    qm.graph_module.recompile()
    model = emit.emit_model(
        qm.graph_module, qm._example_args, input_names=qm.input_names, dynamic_axes=qm.dynamic_axes, opset=20
    )
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names))
    onnx.checker.check_model(model)


class PaddedNet(nn.Module):
    """A constant pad that is not folded into a convolution (it feeds a max-pool)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = nn.functional.pad(self.conv(x), (0, 1, 2, 0), value=0.5)
        return nn.functional.max_pool2d(y, 2)


def test_constant_padding_is_emitted_directly(tmp_path):
    qm = quantize(PaddedNet().eval(), calibration_batches(), progress=False)
    direct, dynamo = _emit_both(qm)
    assert _op_counts(direct)["Pad"] == 1
    x = torch.randn(2, 3, 16, 16).numpy()
    np.testing.assert_allclose(_run(direct, x), _run(dynamo, x), rtol=1e-5, atol=1e-6)
    assert qm.export_onnx(tmp_path / "pad.onnx").exporter == DIRECT


class MaskedTokens(nn.Module):
    """Integer ids compared with a float scalar, a float mask, an embedding and a linear over a sequence."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        keep = (ids >= 2.5).float().unsqueeze(-1)  # compared in float, as torch does: 3 is kept, 2 is not
        return self.fc(self.embedding(ids) * keep).sum(1)


def test_integer_tensor_against_float_scalar_compares_in_float(tmp_path):
    g = torch.Generator().manual_seed(0)
    qm = quantize(MaskedTokens().eval(), [torch.randint(0, 10, (4, 6), generator=g) for _ in range(4)], progress=False)
    assert qm.export_onnx(tmp_path / "masked.onnx").exporter == DIRECT
    ids = torch.arange(10).reshape(2, 5)  # every id, 2 (dropped) and 3 (kept) included
    session = ort.InferenceSession(str(tmp_path / "masked.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = qm(ids).numpy()
    np.testing.assert_allclose(session.run(None, {"ids": ids.numpy()})[0], want, rtol=1e-4, atol=1e-5)


def test_opsets_below_20_go_through_the_dynamo_exporter(tmp_path):
    report = _quantized("residual").export_onnx(tmp_path / "op17.onnx", opset=17)
    assert report.exporter == DYNAMO and report.parity.max_steps < 3


class DecoderOps(nn.Module):
    """The ops of GPT-2, T5, Llama and wav2vec2 that need direct handlers: split + getitem (fused QKV), pow,
    rsqrt (RMSNorm), cos/sin (rotary), abs/log/min/full_like (T5's position buckets), group norm."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.norm = nn.GroupNorm(4, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).split(8, dim=2)
        rms = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
        angle = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * 0.1
        rotated = k * torch.cos(angle) - k * torch.sin(angle)
        bucket = torch.min(torch.log(v.abs() + 1.0), torch.full_like(v, 0.5))
        grouped = self.norm(v.transpose(1, 2)).transpose(1, 2)
        return rms @ rotated.transpose(1, 2) + bucket.sum(-1, keepdim=True) + grouped.mean(-1, keepdim=True)


def test_decoder_ops_are_emitted_directly(tmp_path):
    data = [torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    qm = quantize(DecoderOps().eval(), data, progress=False)
    report = qm.export_onnx(tmp_path / "decoder_ops.onnx")
    assert report.exporter == DIRECT and not report.fallback_reason
    session = ort.InferenceSession(str(tmp_path / "decoder_ops.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 6, 8)
    with torch.no_grad():
        want = qm(x).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], want, atol=1e-4)


def test_a_fallback_names_the_op_that_caused_it(tmp_path):
    qm = quantize(FlipNet().eval(), calibration_batches(), progress=False)
    with pytest.warns(UserWarning, match="direct ONNX emitter cannot write aten.flip"):
        report = qm.export_onnx(tmp_path / "flip.onnx")
    assert report.exporter == DYNAMO and "aten.flip" in report.fallback_reason


class PooledTokens(nn.Module):
    """A CLS / last-token pool (`x[:, 0]`, `x[:, -1]`: aten.select), as CLIP's and GPT-2's heads read, and a
    sequence mean (adaptive_avg_pool1d), as Swin's pooler."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        pooled = nn.functional.adaptive_avg_pool1d(h.transpose(1, 2), 1)  # Swin's pooler
        return {"first": h[:, 0], "last": h[:, -1, 2:], "pooled": pooled}


def test_token_pools_are_emitted_directly_and_outputs_keep_their_names(tmp_path):
    data = [torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    qm = quantize(PooledTokens().eval(), data, progress=False)
    report = qm.export_onnx(tmp_path / "select.onnx")
    assert report.exporter == DIRECT and not report.fallback_reason
    session = ort.InferenceSession(str(tmp_path / "select.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["first", "last", "pooled"]
    x = torch.randn(3, 6, 8)
    with torch.no_grad():
        want = qm(x)
    got = session.run(None, {"x": x.numpy()})
    for name, value in zip(["first", "last", "pooled"], got, strict=True):
        np.testing.assert_allclose(value, want[name].numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "pool, size",
    [
        (dict(kernel_size=3, stride=2, ceil_mode=True), 8),  # the last window hangs past the input
        (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), 8),  # ... past the padding
        (dict(kernel_size=2, stride=2, ceil_mode=True), 7),
        (dict(kernel_size=2, stride=2, padding=1, ceil_mode=True), 7),  # torch drops a window in the right pad
        (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), 8),
        (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), 7),  # no overhang: plain AveragePool
    ],
)
def test_ceil_mode_average_pools_match_onnx_runtime(pool, size, tmp_path):
    """ONNX AveragePool divides a ceil-mode window that hangs past the (padded) input by the whole kernel; torch
    by the part inside it.  A pool that is not over the whole input used to be off by up to 0.57 on ORT."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AvgPool2d(**pool), nn.Conv2d(4, 4, 1)).eval()
    data = [torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(i)) + 1 for i in range(2)]
    qm = quantize(model, data, progress=False)
    report = qm.export_onnx(tmp_path / "pool.onnx", check=False)
    assert report.exporter == DIRECT
    session = ort.InferenceSession(str(tmp_path / "pool.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = qm(data[0]).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: data[0].numpy()})[0], want, atol=1e-5)
