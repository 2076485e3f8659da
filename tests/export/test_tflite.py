"""TFLite int8 export: every op on tiny models, run on LiteRT and TFLite Micro against the simulation's codes."""

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tflite_micro")
pytest.importorskip("ai_edge_litert")

import eightbit  # noqa: E402
from eightbit import QuantConfig, Target  # noqa: E402
from eightbit.export.tflite import Unsupported, samples_of, tflite_bytes  # noqa: E402
from eightbit.export.tflite_run import run_litert  # noqa: E402
from tests.helpers import ResidualNet, calibration_batches  # noqa: E402
from tests.tflite_models import MODELS, SCHEMES, quantized  # noqa: E402

EXPECTED_OPS = {
    "residual": {"CONV_2D", "ADD", "MAX_POOL_2D", "MEAN", "RESHAPE", "FULLY_CONNECTED"},
    "depthwise": {"PAD", "CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED"},
    "concat": {"CONV_2D", "CONCATENATION"},
    "conv_variants": {"PAD", "CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D"},
    "broadcasting": {"CONV_2D", "MEAN", "ADD", "MUL", "CONCATENATION"},
    "activations": {"HARD_SWISH", "MEAN", "LOGISTIC", "MUL", "MAX_POOL_2D", "TRANSPOSE", "RESHAPE", "SOFTMAX"},
    "hardswish": {"CONV_2D", "HARD_SWISH"},
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", MODELS)
def test_export_runs_on_litert_and_tflm_within_one_code(tmp_path, name, scheme):
    qm = quantized(name, scheme)
    report = qm.export_tflite(tmp_path / "m.tflite")
    assert report.path.read_bytes()[4:8] == b"TFL3"
    assert EXPECTED_OPS[name] <= set(report.ops)
    assert {p.runtime for p in report.parity} == {"LiteRT", "TFLM"}
    # Fixed-point requantization vs float rounding: at most one code apart.  TFLite's HARD_SWISH is a 16-bit
    # fixed-point approximation; the 1x1 conv after it can turn its one-code errors into two.
    tolerance = 2 if name == "hardswish" else 1
    for parity in report.parity:
        assert parity.max_steps <= tolerance, str(parity)
    assert report.arena_bytes > 0


def test_default_target_keeps_onnx_placement():
    torch.manual_seed(0)
    qm = eightbit.quantize(ResidualNet().eval(), calibration_batches(n=2), progress=False)
    assert not qm.placement.fixed_ranges
    with pytest.raises(Unsupported, match="target=Target.TFLITE"):  # the classifier's output is float for ONNX
        tflite_bytes(qm.graph_module, qm._example_args)


class WithGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.conv(x)).mean((2, 3))


def test_unsupported_ops_are_listed_with_where_they_are(tmp_path):
    torch.manual_seed(0)
    qm = eightbit.quantize(
        WithGelu().eval(), calibration_batches(n=2), config=QuantConfig(target=Target.TFLITE), progress=False
    )
    with pytest.raises(Unsupported, match=r"gelu.*in 'act'"):
        qm.export_tflite(tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


def test_float_io_and_float_model(tmp_path):
    qm = quantized("residual")
    (sample,) = samples_of(qm._example_args, 1)
    x = sample[0].permute(0, 2, 3, 1).contiguous().numpy()
    want = qm(*sample).detach().numpy()
    float_io = qm.export_tflite(tmp_path / "io.tflite", float_io=True)
    float_model = qm.export_tflite(tmp_path / "fp32.tflite", float_model=True)
    assert float_io.ops["QUANTIZE"] == 1 and float_io.ops["DEQUANTIZE"] == 1
    step = float(qm.activation_encodings[list(qm.activation_encodings)[-1]].scale[0])
    (got,) = run_litert(float_io.path.read_bytes(), [x])
    assert np.abs(got - want).max() <= step * 1.01
    (fp32,) = run_litert(float_model.path.read_bytes(), [x])
    assert fp32.dtype == np.float32 and np.abs(fp32 - want).max() < 0.1 * np.abs(want).max() + 10 * step
    assert float_model.size_bytes > 3 * float_io.size_bytes // 2  # float32 weights


class DeadChannel(nn.Module):
    """A conv whose channel 0 has near-zero weights and a real bias (what BatchNorm folding leaves of a dead
    channel): its int32 bias code saturates at the int32 limit."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight[0] *= 1e-5
            self.conv.bias[0] = -50.0

    def forward(self, x):
        return torch.relu(self.conv(x))


def test_saturated_bias_cannot_wrap_the_int32_accumulator(tmp_path):
    # TFLM adds the bias to the int32 sum of products unchecked: a bias at the int32 limit wrapped around and the
    # dead channel came out tens of codes off.  The export keeps room for the products in the bias.
    torch.manual_seed(0)
    qm = eightbit.quantize(
        DeadChannel().eval(), calibration_batches(n=2), config=QuantConfig(target=Target.TFLITE), progress=False
    )
    report = qm.export_tflite(tmp_path / "m.tflite")
    for parity in report.parity:
        assert parity.max_steps <= 1, str(parity)


def test_cli_quantize_writes_a_checked_tflite(tmp_path, capsys):
    from eightbit.cli import main

    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(folder / f"{i}.npy", rng.standard_normal((3, 16, 16)).astype(np.float32))
    args = ["quantize", "tests.helpers:ResidualNet", "--calib", str(folder), "--out", str(tmp_path / "m.onnx")]
    args += ["--input-shape", "1,3,16,16", "--quiet", "--tflite", str(tmp_path / "m.tflite")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "TFLM arena" in printed and "LiteRT vs PyTorch" in printed
    assert (tmp_path / "m.tflite").read_bytes()[4:8] == b"TFL3" and (tmp_path / "m.onnx").exists()


def test_tflite_target_keeps_8_bit_weights_on_cpus_without_vnni():
    # The 7-bit overflow fix is for x86 ONNX Runtime / oneDNN (VPMADDUBSW); LiteRT's and TFLM's int8 kernels
    # accumulate in int32, so AUTO must not cost a TFLite model a bit of weight precision.
    from eightbit.config import OverflowFix, overflow_fix_active

    assert not overflow_fix_active(QuantConfig(target=Target.TFLITE), saturation_risk=True)
    assert overflow_fix_active(QuantConfig(target=Target.TFLITE, overflow_fix=OverflowFix.ENABLE), True)
    assert overflow_fix_active(QuantConfig(), saturation_risk=True)
