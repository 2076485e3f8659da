"""Study schemes: log2 (exponential) weights and fp16, simulated in PyTorch."""

import numpy as np
import pytest
import torch

from eightbit import QuantConfig, int8_weights, qmath, quantize, uint8_activations
from eightbit.config import Scheme
from eightbit.runtime.backends import Backend, load
from tests.helpers import DepthwiseNet, calibration_batches


def test_log2_levels_are_signed_powers_of_two_of_the_channel_max():
    w = torch.tensor([[1.0, -0.5, 0.3, 0.01, 0.0], [8.0, 3.0, -1.0, 0.2, 0.0]])
    q = qmath.log2_quantize(w, bits=4, axis=0)  # 7 nonzero magnitudes: max * 2^0 .. max * 2^-6
    assert q[0].tolist() == [1.0, -0.5, 0.25, 0.015625, 0.0]
    assert q[1].tolist() == [8.0, 4.0, -1.0, 0.25, 0.0]
    tiny = qmath.log2_quantize(torch.tensor([1.0, 1e-4]), bits=3)  # 3 magnitudes: 1, 1/2, 1/4
    assert tiny.tolist() == [1.0, 0.0]


def test_fp16_rounding_matches_half_precision():
    x = torch.tensor([1.0001, 65504.0, 70000.0, 1e-8])
    assert qmath.fp16_round(x).tolist() == x.half().float().tolist()


def _fp16_config():
    return QuantConfig(weights=int8_weights(scheme=Scheme.FP16), activations=uint8_activations(scheme=Scheme.FP16))


def test_log2_weights_simulate_and_refuse_export(tmp_path):
    model = DepthwiseNet().eval()
    qm = quantize(
        model, calibration_batches(), config=QuantConfig(weights=int8_weights(scheme=Scheme.LOG2)), progress=False
    )
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(model(x), qm(x)).min() > 0.8
    with pytest.raises(ValueError, match="export is refused"):
        qm.export_onnx(tmp_path / "log2.onnx")
    assert not (tmp_path / "log2.onnx").exists()


def test_fp16_is_close_and_exports_a_float16_model(tmp_path):
    import onnx

    model = DepthwiseNet().eval()
    qm = quantize(model, calibration_batches(), config=_fp16_config(), progress=False)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref, out = model(x), qm(x)
    assert torch.allclose(ref, out, rtol=1e-2, atol=1e-3)
    path = tmp_path / "fp16.onnx"
    assert qm.export_onnx(path).parity.max_steps < 1
    weights = [i for i in onnx.load(path).graph.initializer if len(i.dims) >= 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    for backend in (Backend.ORT, Backend.OPENVINO):
        runner = load(path, backend)
        got = runner.run({runner.input_names[0]: x.numpy()})[0]
        assert np.abs(got - out.numpy()).max() < 1e-2 * float(out.abs().max())


def test_schemes_are_validated():
    with pytest.raises(ValueError, match="weights only"):
        QuantConfig(activations=uint8_activations(scheme=Scheme.LOG2))
    with pytest.raises(ValueError, match="together"):
        QuantConfig(weights=int8_weights(scheme=Scheme.FP16))
