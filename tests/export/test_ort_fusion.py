"""What ONNX Runtime actually runs: every quantized op must become an int8 kernel, nothing float in between."""

from collections import Counter

import onnx
import onnxruntime as ort
import torch
from torch import nn

from eightbit import quantize
from tests.helpers import DepthwiseNet, ResidualNet, calibration_batches


def _ort_ops(path, tmp_path) -> Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)


def _export(model, tmp_path):
    qm = quantize(model.eval(), calibration_batches(), progress=False)
    path = tmp_path / "m.onnx"
    qm.export_onnx(path)
    return path


def test_residual_net_runs_entirely_in_int8_kernels(tmp_path):
    ops = _ort_ops(_export(ResidualNet(), tmp_path), tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["QLinearGlobalAveragePool"] == 1
    assert ops["QGemm"] == 1  # float-output classifier still runs int8 (int32 bias)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0  # only the model input is quantized
    assert not {"Conv", "FusedConv", "Gemm", "Add", "ReduceMean", "Relu"} & set(ops)


def test_depthwise_relu6_and_mean_pooling_fuse(tmp_path):
    ops = _ort_ops(_export(DepthwiseNet(), tmp_path), tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QLinearGlobalAveragePool"] == 1
    assert not {"Conv", "Clip", "ReduceMean"} & set(ops)


class PaddedNet(nn.Module):
    """TF-style 'same' padding as an explicit asymmetric Pad before a strided conv (EfficientNet-Lite), and a
    pad before a max-pool (no conv to absorb it)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, groups=16)
        self.c3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = nn.functional.relu6(self.c1(x))
        x = nn.functional.relu6(self.c2(nn.functional.pad(x, (0, 1, 0, 1))))
        x = nn.functional.max_pool2d(nn.functional.pad(x, (1, 1, 1, 1)), 2)
        return self.c3(x)


def test_zero_pads_fold_into_conv_or_run_on_uint8_codes(tmp_path):
    model = PaddedNet()
    qm = quantize(model.eval(), calibration_batches(), progress=False)
    targets = Counter(str(n.target) for n in qm.graph_module.graph.nodes if n.op == "call_function")
    assert targets["eightbit.conv2d_padded.default"] == 1  # pad + conv2d became one op
    assert targets["aten.constant_pad_nd.default"] == 1 and targets["aten.pad.default"] == 0  # on uint8 codes
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert nn.functional.cosine_similarity(model(x).flatten(1), qm(x).flatten(1)).min() > 0.99
    path = tmp_path / "p.onnx"
    assert qm.export_onnx(path).parity.max_steps < 3
    ops = _ort_ops(path, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Pad"] == 1 and ops["DequantizeLinear"] == 1  # the output
    assert not {"Conv", "FusedConv"} & set(ops)
