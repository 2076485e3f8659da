"""Speed analysis: per-op int8 vs float time, mapped to graph ops, and the speed-driven fallback."""

from __future__ import annotations

import onnx
import pytest
import torch

import eightbit
from eightbit.analysis.speed import (
    compare_ops,
    measure_speed,
    onnx_owners,
    op_owners,
    quantize_without_slow_ops,
    slow_modules,
)
from eightbit.runtime.backends import Backend
from eightbit.runtime.benchmark import OpCategory
from eightbit.runtime.profile import Kernel, KernelProfile
from tests.helpers import LinearGeluChain, ResidualNet, calibration_batches


def _kernel(name, category, ms, *sources):
    return Kernel(name=name, op_type=name, category=category, sources=sources, ms=ms)


def _profile(kernels, wall_ms):
    return KernelProfile(backend=Backend.ORT, batch=1, kernels=tuple(kernels), wall_ms=wall_ms, runs=10)


def test_injected_timings_report_the_op_whose_int8_version_costs_more():
    owner_of = {"q_1": "fc", "gemm_2": "fc", "conv_3": "conv", "dq_4": "conv", "add_5": "add"}
    int8 = _profile(
        [
            _kernel("q_1", OpCategory.QUANTIZE, 0.5, "q_1"),
            _kernel("gemm_2", OpCategory.INT8_COMPUTE, 0.4, "gemm_2"),
            _kernel("conv_3_token_1", OpCategory.INT8_COMPUTE, 1.0, "conv_3"),
            _kernel("dq_4", OpCategory.DEQUANTIZE, 0.1, "dq_4"),
            _kernel("add_5", OpCategory.INT8_COMPUTE, 0.2, "add_5"),
            _kernel("Transpose", OpCategory.LAYOUT, 0.3),
        ],
        wall_ms=3.0,
    )
    fp32 = _profile(
        [
            _kernel("gemm_2", OpCategory.FLOAT_COMPUTE, 0.6, "gemm_2"),
            _kernel("conv_3_nchwc", OpCategory.FLOAT_COMPUTE, 2.0, "conv_3"),  # the add fused into the conv
        ],
        wall_ms=2.8,
    )
    report = compare_ops(int8, fp32, owner_of, {"fc": "head.fc", "conv": "body"})
    assert [o.op for o in report.slow_ops] == ["fc"]
    (fc,) = report.slow_ops
    assert fc.int8_ms == pytest.approx(0.9) and fc.qdq_ms == pytest.approx(0.5) and fc.fp32_ms == pytest.approx(0.6)
    assert fc.ratio == pytest.approx(1.5)
    conv = next(o for o in report.ops if o.op == "conv")
    assert conv.int8_ms == pytest.approx(1.1) and conv.extra_ms == pytest.approx(-0.9)
    assert report.unmatched == ("add",) and report.unattributed_ms == pytest.approx(0.3)
    text = str(report)
    assert "slower in int8: fc (head.fc)" in text and "1.50x" in text and "+0.300 ms" in text
    assert "not compared" in text and "add" in text


def test_small_differences_are_not_reported():
    owner_of = {"a": "a", "b": "b"}
    int8 = _profile(
        [_kernel("a", OpCategory.INT8_COMPUTE, 1.05, "a"), _kernel("b", OpCategory.INT8_COMPUTE, 0.0015, "b")], 2
    )
    fp32 = _profile(
        [_kernel("a", OpCategory.FLOAT_COMPUTE, 1.0, "a"), _kernel("b", OpCategory.FLOAT_COMPUTE, 0.0005, "b")], 2
    )
    # a: 5% slower (within the 10% margin); b: 3x slower but only 1 microsecond (below min_extra_ms)
    assert compare_ops(int8, fp32, owner_of).slow_ops == ()
    assert [o.op for o in compare_ops(int8, fp32, owner_of, margin=0.01).slow_ops] == ["a"]


def test_every_exported_node_of_a_quantized_op_maps_back_to_it(tmp_path):
    qm = eightbit.quantize(ResidualNet().eval(), calibration_batches(), progress=False)
    owners = op_owners(qm.graph_module, qm.placement.quantized_ops)
    assert set(owners.values()) == set(qm.placement.quantized_ops)
    path = tmp_path / "m.onnx"
    qm.export_onnx(path, check=False)
    model = onnx.load(path)
    by_name = onnx_owners(model, qm.graph_module, owners)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert [by_name[c] for c in convs] == ["conv2d", "conv2d_1"]
    # the model input's QuantizeLinear exists for the stem conv; the stem's ReLU clamp (float twin) is the stem's
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert by_name[first_q.name] == "conv2d"
    assert any(name.endswith("_clamp") and op == "conv2d" for name, op in by_name.items())


@pytest.fixture(scope="module")
def chain_qm():
    torch.manual_seed(0)
    model = LinearGeluChain().eval()
    data = [torch.randn(4, 8) for _ in range(2)]
    return model, data, eightbit.quantize(model, data, progress=False)


def test_real_profile_reports_int8_linears_slower_than_float(chain_qm):
    _, _, qm = chain_qm
    report = measure_speed(qm, batch=1, runs=20)
    # each 8x8 int8 linear pays a QuantizeLinear of its own: about 2x its float time on ORT
    assert len(report.slow_ops) >= len(qm.placement.quantized_ops) // 2
    assert all(o.qdq_ms > 0 and o.module.startswith("fcs.") for o in report.slow_ops)
    qm.speed = report
    assert "slower in int8: linear" in qm.summary()


def test_openvino_per_layer_counters_map_to_graph_ops(chain_qm):
    _, _, qm = chain_qm
    report = measure_speed(qm, batch=4, backend="openvino", runs=5, rounds=1)
    assert report.backend is Backend.OPENVINO
    assert {o.op for o in report.ops} | set(report.unmatched) <= set(qm.placement.quantized_ops)
    assert len(report.ops) >= len(qm.placement.quantized_ops) // 2 and report.int8_wall_ms > 0


@pytest.mark.filterwarnings("ignore::eightbit.MostlyFloatWarning")  # keeping them float is the point
def test_speed_fallback_keeps_the_slow_modules_float(chain_qm):
    model, data, _ = chain_qm
    qm, first = quantize_without_slow_ops(model, data)
    slow = {o.module for o in first.slow_ops}
    assert slow, "the chain's int8 linears are slower than float"
    kept = {name for name, why in qm.placement.float_ops.items() if "kept float by config" in why}
    assert len(kept) == len(slow)
    assert any("kept float because their int8 version was slower" in n for n in qm.notes)
    assert qm.speed is not None and "speed (onnxruntime, batch 1" in qm.summary()


def test_a_top_level_op_cannot_be_kept_float_alone():
    qm = eightbit.quantize(ResidualNet().eval(), calibration_batches(), progress=False)
    owner_of = {"add": "add", "conv": "conv2d_1"}
    int8 = _profile(
        [_kernel("add", OpCategory.INT8_COMPUTE, 1.0, "add"), _kernel("conv", OpCategory.INT8_COMPUTE, 2.0, "conv")], 3
    )
    fp32 = _profile(
        [_kernel("add", OpCategory.FLOAT_COMPUTE, 0.1, "add"), _kernel("conv", OpCategory.FLOAT_COMPUTE, 0.1, "conv")],
        1,
    )
    keep, notes = slow_modules(compare_ops(int8, fp32, owner_of), qm)
    assert keep == ("conv",)
    assert notes == ["add is not kept float: its module (top level) also holds fast int8 ops"]


def test_a_file_without_eightbit_op_names_says_so_instead_of_reporting_nothing_slow():
    int8 = _profile([_kernel("MatMul_1", OpCategory.INT8_COMPUTE, 1.0, "MatMul_1")], 1.0)
    fp32 = _profile([_kernel("MatMul_1", OpCategory.FLOAT_COMPUTE, 0.1, "MatMul_1")], 0.2)
    text = str(compare_ops(int8, fp32, owner_of={}))
    assert "no kernel could be tied to a quantized op" in text and "no quantized op is slower" not in text
