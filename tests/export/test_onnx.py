"""Exported QDQ models: standard ops, int8 initializers, dynamic batch, parity with ORT and OpenVINO."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from eightbit import QuantConfig, quantize
from eightbit.runtime.backends import Backend, load
from tests.helpers import ConcatNet, DepthwiseNet, ResidualNet, calibration_batches

MODELS = {"residual": ResidualNet, "depthwise": DepthwiseNet, "concat": ConcatNet}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    model = MODELS[request.param]().eval()
    qm = quantize(model, calibration_batches(), progress=False)
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    report = qm.export_onnx(path)
    return model, qm, path, report


def _step(values: np.ndarray) -> float:
    return float(values.max() - values.min()) / 255


def test_export_uses_standard_qdq_ops_and_int8_weights(exported):
    _, qm, path, _ = exported
    model = onnx.load(path)
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] == sum(len(m) for m in qm.placement.groups.values())
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    int8_inits = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_inits) == len(qm.weight_encodings)
    float_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2]
    assert not float_weights  # no weight matrix left in float


def test_batch_axis_is_dynamic(exported):
    _, _, path, _ = exported
    dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"


@pytest.mark.parametrize("backend", [Backend.ORT, Backend.OPENVINO])
@pytest.mark.parametrize("batch", [1, 5])
def test_runtime_matches_pytorch_simulation(exported, backend, batch):
    _, qm, path, _ = exported
    x = torch.randn(batch, 3, 16, 16)
    with torch.no_grad():
        want = qm(x).numpy()
    runner = load(path, backend)
    got = runner.run({runner.input_names[0]: x.numpy()})[0]
    # Runtimes requantize with their own rounding; a couple of output steps is the expected spread.
    assert np.abs(got - want).max() <= 3 * _step(want) + 1e-6


def test_export_reports_parity_in_steps(exported):
    _, _, _, report = exported
    assert report.parity is not None and report.parity.max_steps < 3


def test_int8_file_is_small(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 128, 3), torch.nn.ReLU(), torch.nn.Conv2d(128, 128, 3)).eval()
    qm = quantize(model, calibration_batches(), progress=False)
    qm.export_onnx(tmp_path / "q.onnx")
    torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), tmp_path / "f.onnx", dynamo=True)
    fp32 = sum(p.stat().st_size for p in tmp_path.glob("f.onnx*"))
    assert (tmp_path / "q.onnx").stat().st_size <= 0.3 * fp32


def test_existing_output_is_not_overwritten_unless_asked(tmp_path):
    qm = quantize(DepthwiseNet().eval(), calibration_batches(), progress=False)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        qm.export_onnx(target)
    assert target.read_bytes() == b"keep me"
    qm.export_onnx(target, overwrite=True)
    assert onnx.load(target).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary files left


def test_per_tensor_weights_and_signed_activations_export(tmp_path):
    from eightbit import Granularity, int8_weights, uint8_activations

    cfg = QuantConfig(
        weights=int8_weights(granularity=Granularity.PER_TENSOR),
        activations=uint8_activations(signed=True, symmetric=True),
    )
    qm = quantize(ResidualNet().eval(), calibration_batches(), config=cfg, progress=False)
    report = qm.export_onnx(tmp_path / "s8.onnx")
    assert report.parity.max_steps < 3
    zps = [i for i in onnx.load(tmp_path / "s8.onnx").graph.initializer if "zero_point" in i.name]
    assert zps and all(z.data_type == onnx.TensorProto.INT8 for z in zps)


def test_four_bit_activations_are_clamped_in_onnx(tmp_path):
    from eightbit import uint8_activations

    qm = quantize(
        DepthwiseNet().eval(),
        calibration_batches(),
        config=QuantConfig(activations=uint8_activations(bits=4)),
        progress=False,
    )
    assert qm.export_onnx(tmp_path / "a4.onnx").parity.max_steps < 3


def _scale_last_output_dq(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """Corrupt a file the way a wrong scale would: the last activation DequantizeLinear reads `factor` x its scale."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits][-1]
    scale = numpy_helper.to_array(inits[dq.input[1]]) * factor
    model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), "broken_scale"))
    dq.input[1] = "broken_scale"
    return model


@pytest.fixture()
def broken_scale(monkeypatch):
    """Exports write a file whose last activation scale is 10x too large."""
    import eightbit.export.onnx as export

    original = export._onnx_model

    def corrupted(*args, **kwargs):
        model, exporter, reason = original(*args, **kwargs)
        return _scale_last_output_dq(model, 10.0), exporter, reason

    monkeypatch.setattr(export, "_onnx_model", corrupted)


@pytest.fixture()
def add_emitted_as_sub(monkeypatch):
    """A handler with the wrong semantics: aten.add is written as ONNX Sub."""
    from eightbit.export import handlers_nn

    monkeypatch.setitem(handlers_nn._BINARY, torch.ops.aten.add.Tensor, "Sub")


@pytest.mark.parametrize("breakage", ["broken_scale", "add_emitted_as_sub"])
def test_a_broken_export_raises_with_the_report_and_leaves_files_alone(breakage, request, tmp_path):
    from eightbit import ParityError

    qm = quantize(ResidualNet().eval(), calibration_batches(), progress=False)
    request.getfixturevalue(breakage)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"the user's earlier model")
    with pytest.raises(ParityError, match="check=False") as caught:
        qm.export_onnx(target, overwrite=True)
    assert caught.value.report.max_steps > 16
    assert str(caught.value.report) in str(caught.value)
    assert target.read_bytes() == b"the user's earlier model"  # the broken file never replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    report = qm.export_onnx(target, overwrite=True, check=False)  # the way out: written, not checked
    assert report.parity is None and onnx.load(target).graph.node


def test_parity_report_of_a_healthy_export_passes(exported):
    _, _, _, report = exported
    assert report.parity.passed and report.parity.max_steps < 3


@pytest.mark.parametrize(
    "got, want, steps",
    [
        ([1.0, 1.0], [1.0, 1.0 + 1e-7], 0.0),  # a constant output has a step: 1/255, not 1e-12
        ([2.0, 3.0 + 3 / 255], [2.0, 3.0], 1.0),  # one-sided outputs: the step spans 0..max, as the ranges do
        ([float("nan"), 1.0], [float("nan"), 1.0], 0.0),  # NaN in both at the same place agrees
        ([float("nan"), 1.0], [0.5, 1.0], float("inf")),  # NaN from the runtime only never passes
        ([[1.0, 2.0]], [1.0, 2.0], float("inf")),  # different shapes never pass
    ],
)
def test_parity_steps_of_degenerate_outputs(got, want, steps):
    from eightbit.export.onnx import _diff_and_step

    diff, step = _diff_and_step(np.array(got), np.array(want))
    assert float(diff.max(initial=0.0)) / step == pytest.approx(steps, abs=1e-3)


def test_an_unusable_output_path_fails_before_the_export_work(tmp_path, monkeypatch):
    import eightbit.export.onnx as export

    qm = quantize(DepthwiseNet().eval(), calibration_batches(), progress=False)
    monkeypatch.setattr(export, "_onnx_model", lambda *a, **k: pytest.fail("the export ran"))
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        qm.export_onnx(tmp_path / "dir.onnx", overwrite=True)
    (tmp_path / "m.onnx").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        qm.export_onnx(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == b"keep" and (tmp_path / "dir.onnx").is_dir()
