"""Timing helpers, result tables, ORT op-time breakdown, and QDQ stripping."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eightbit.export.strip import strip_qdq
from eightbit.runtime.backends import Backend, load
from eightbit.runtime.benchmark import (
    OpCategory,
    Row,
    Timing,
    benchmark_models,
    categorize_op,
    format_table,
    latency,
    op_time_breakdown,
    profile_ops,
    throughput,
)

U8, S8, I32, F32 = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, TensorProto.FLOAT


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _act_qdq(name: str, scale: float, zp: int, nodes: list, inits: list) -> str:
    """Append uint8 QuantizeLinear -> DequantizeLinear on tensor `name`; return the DQ output name."""
    inits += [
        numpy_helper.from_array(np.float32(scale), f"{name}_s"),
        numpy_helper.from_array(np.uint8(zp), f"{name}_z"),
    ]
    nodes.append(helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]))
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"]))
    return f"{name}_dq"


def _weight_dq(name: str, w: np.ndarray, axis: int, nodes: list, inits: list) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 weight initializer + DequantizeLinear; returns (dequantized, scales)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=reduce) / 127.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    inits += [
        numpy_helper.from_array(q, f"{name}_q"),
        numpy_helper.from_array(scale, f"{name}_s"),
        numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_z"),
    ]
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name], axis=axis))
    return q.astype(np.float32) * scale.reshape(shape), scale


def _bias_dq(name: str, b: np.ndarray, scale: np.ndarray, nodes: list, inits: list) -> np.ndarray:
    q = np.round(b / scale).astype(np.int32)
    inits += [
        numpy_helper.from_array(q, f"{name}_q"),
        numpy_helper.from_array(scale.astype(np.float32), f"{name}_s"),
    ]
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [name], axis=0))
    return q.astype(np.float32) * scale.astype(np.float32)


def qdq_matmul_model(rng, absorb_relu: bool = False) -> tuple[onnx.ModelProto, callable]:
    """x -> Q/DQ -> MatMul(int8 W) + int32 bias -> Relu -> Q/DQ -> y; plus its fp32 numpy reference.

    With `absorb_relu` the Relu is left out, as ORT's quantizer does: the output Q's range [0, 2.55]
    (zero point 0) clamps instead.
    """
    nodes, inits = [], []
    x_dq = _act_qdq("x", 0.02, 128, nodes, inits)
    w, w_scale = _weight_dq("w", rng.normal(0, 0.2, (16, 8)).astype(np.float32), 1, nodes, inits)
    # Bias scale = input scale x weight scale, as every QDQ producer does (ORT's fusions assume it).
    b = _bias_dq("b", rng.normal(0, 0.1, 8).astype(np.float32), 0.02 * w_scale, nodes, inits)
    nodes += [
        helper.make_node("MatMul", [x_dq, "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["act" if absorb_relu else "pre"]),
    ]
    if not absorb_relu:
        nodes.append(helper.make_node("Relu", ["pre"], ["act"]))
    y_dq = _act_qdq("act", 0.01, 0, nodes, inits)
    nodes.append(helper.make_node("Identity", [y_dq], ["y"]))
    model = _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("x", F32, ["N", 16])],
        [helper.make_tensor_value_info("y", F32, ["N", 8])],
    )
    return model, lambda x: np.clip(x @ w + b, 0.0, 2.55)


def qdq_conv_model(rng, channels=64, hw=28, layers=3) -> onnx.ModelProto:
    """Chain of QDQ 3x3 convs: uint8 activations with zero point, int8 symmetric per-channel weights."""
    nodes, inits = [], []
    x_scale, cur = 0.05, "x"
    for i in range(layers):
        a = _act_qdq(cur, x_scale, 128, nodes, inits)
        w = rng.normal(0, 0.05, (channels, channels, 3, 3)).astype(np.float32)
        _, w_scale = _weight_dq(f"w{i}", w, 0, nodes, inits)
        _bias_dq(f"b{i}", rng.normal(0, 0.1, channels).astype(np.float32), x_scale * w_scale, nodes, inits)
        nodes.append(helper.make_node("Conv", [a, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        cur = f"c{i}"
    out = _act_qdq(cur, x_scale, 128, nodes, inits)
    nodes.append(helper.make_node("Identity", [out], ["y"]))
    shape = ["N", channels, hw, hw]
    return _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("x", F32, shape)],
        [helper.make_tensor_value_info("y", F32, shape)],
    )


@pytest.fixture(scope="module")
def conv_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "qdq_conv.onnx"
    onnx.save(qdq_conv_model(np.random.default_rng(0)), path)
    return path


def _feeds(runner, batch):
    return {"x": np.random.default_rng(batch).normal(size=(batch, 64, 28, 28)).astype(np.float32)}


# --- timing and tables ------------------------------------------------------------------------------


def test_latency_and_throughput(conv_path):
    runner = load(conv_path, Backend.ORT)
    t = latency(runner, _feeds(runner, 2), warmup=1, iters=5)
    assert t.iters == 5 and t.batch == 2
    assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms
    assert t.samples_per_s == pytest.approx(2000.0 / t.median_ms)
    assert throughput(runner, _feeds(runner, 2), warmup=1, iters=3) > 0
    with pytest.raises(ValueError):
        latency(runner, _feeds(runner, 1), iters=0)


def test_benchmark_models_and_table(conv_path, tmp_path):
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(strip_qdq(onnx.load(conv_path)), fp32)
    rows = benchmark_models(
        {"fp32": fp32, "int8": conv_path},
        [Backend.ORT, Backend.OPENVINO],
        [1, 4],
        _feeds,
        iters=lambda b: (1, 3),
    )
    assert len(rows) == 2 * 2 * 2
    assert {(r.label, r.backend, r.batch) for r in rows} >= {
        ("int8", Backend.OPENVINO, 4),
        ("fp32", Backend.ORT, 1),
    }
    text = format_table(rows, reference=("fp32", Backend.ORT))
    lines = text.splitlines()
    assert len(lines) == 2 + 4
    assert len({len(line.rstrip()) for line in lines[:2]}) == 1  # header and rule line up
    ref_line = next(line for line in lines if line.startswith("fp32") and "onnxruntime" in line)
    assert ref_line.split()[-1] == "1.00" and ref_line.split()[-3] == "1.00"
    md = format_table(rows, reference=("fp32", Backend.ORT), markdown=True)
    assert md.startswith("| model | backend |") and md.splitlines()[1].startswith("|---|")
    assert "x ref" not in format_table(rows)


def test_table_ratio_is_speedup():
    def row(label, ms):
        return Row(
            label=label,
            backend=Backend.ORT,
            timing=Timing(median_ms=ms, p10_ms=ms, p90_ms=ms, iters=1, batch=1),
        )

    text = format_table([row("ref", 10.0), row("fast", 2.5)], reference=("ref", Backend.ORT))
    assert text.splitlines()[-1].split()[-1] == "4.00"


# --- op-time breakdown ------------------------------------------------------------------------------


def test_categorize_op():
    assert categorize_op("QLinearConv") is OpCategory.INT8_COMPUTE
    assert categorize_op("MatMulIntegerToFloat") is OpCategory.INT8_COMPUTE
    assert categorize_op("FusedConv") is OpCategory.FLOAT_COMPUTE
    assert categorize_op("QuantizeLinear") is OpCategory.QUANTIZE
    assert categorize_op("DynamicQuantizeLinear") is OpCategory.QUANTIZE
    assert categorize_op("DequantizeLinear") is OpCategory.DEQUANTIZE
    assert categorize_op("ReorderInput") is OpCategory.LAYOUT
    assert categorize_op("MaxPool", ["uint8"]) is OpCategory.INT8_COMPUTE
    assert categorize_op("MaxPool", ["float"]) is OpCategory.FLOAT_COMPUTE
    assert categorize_op("NonZero", ["bool"]) is OpCategory.OTHER


def test_breakdown_of_fused_qdq_conv_is_mostly_int8(conv_path, tmp_path):
    # Confirm the premise: ORT's optimizer fuses the DQ -> Conv -> Q groups into QLinearConv.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(conv_path), so, providers=["CPUExecutionProvider"])
    assert sum(n.op_type == "QLinearConv" for n in onnx.load(tmp_path / "opt.onnx").graph.node) == 3

    feeds = _feeds(None, 1)
    assert set(op_time_breakdown(conv_path, feeds, threads=2, runs=2)) == {c.value for c in OpCategory}
    # Totals are compared within one profile: two sessions' run times differ on a shared machine.
    prof = profile_ops(conv_path, feeds, threads=2, runs=5)
    assert prof.runs == 5
    breakdown = prof.by_category()
    total = sum(breakdown.values())
    # Kernel time is part of a run; the rest is ORT's per-run overhead.
    assert 0 < total <= 1.0001 * prof.run_ms
    # Shares of time move with machine load; what cannot move: no float kernel ran, and int8 kernels dominate.
    assert breakdown[OpCategory.FLOAT_COMPUTE.value] == 0
    assert breakdown[OpCategory.INT8_COMPUTE.value] == max(breakdown.values())
    assert ("QLinearConv", OpCategory.INT8_COMPUTE) in prof.kernel_ms


def test_breakdown_of_float_model_is_float(conv_path, tmp_path):
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(strip_qdq(onnx.load(conv_path)), fp32)
    breakdown = op_time_breakdown(fp32, _feeds(None, 1), threads=2, runs=3)
    assert breakdown[OpCategory.FLOAT_COMPUTE.value] == max(breakdown.values())
    assert breakdown[OpCategory.INT8_COMPUTE.value] == 0.0


# --- strip_qdq --------------------------------------------------------------------------------------


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    # Unoptimized, so QDQ nodes run as written: the fused u8s8 kernels on AVX2 CPUs without VNNI can
    # saturate 16-bit intermediates with full-range int8 weights, which is a kernel property, not a
    # property of the QDQ graph that strip_qdq is tested against.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_strip_qdq_matches_numpy_fp32_reference():
    rng = np.random.default_rng(0)
    model, reference = qdq_matmul_model(rng)
    stripped = strip_qdq(model)
    onnx.checker.check_model(stripped, full_check=True)
    ops = [n.op_type for n in stripped.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert "Clip" not in ops  # the Relu is still there, so the zero-based output range adds nothing
    assert all(i.data_type == F32 for i in stripped.graph.initializer)
    assert [o.name for o in stripped.graph.output] == ["y"]
    x = rng.normal(0, 1, (5, 16)).astype(np.float32)
    np.testing.assert_allclose(_ort(stripped, x), reference(x), rtol=1e-5, atol=1e-5)
    # The QDQ original differs from fp32 only by activation rounding (~ one quantization step).
    assert np.abs(_ort(model, x) - reference(x)).max() < 0.05
    assert len(model.graph.node) > len(stripped.graph.node)  # input model untouched


def test_strip_qdq_restores_a_relu_absorbed_into_a_zero_based_range():
    rng = np.random.default_rng(2)
    model, reference = qdq_matmul_model(rng, absorb_relu=True)
    stripped = strip_qdq(model)
    ops = [n.op_type for n in stripped.graph.node]
    # Only the output pair (zero point 0) clamps; the input pair (zero point 128) is two-sided.
    assert ops.count("Clip") == 1 and "Relu" not in ops
    x = rng.normal(0, 1, (6, 16)).astype(np.float32)
    y = _ort(stripped, x)
    assert (y >= 0).all() and (reference(x) == 0).any()
    np.testing.assert_allclose(y, reference(x), rtol=1e-5, atol=1e-5)


def test_strip_qdq_keeps_graph_output_name_when_dq_is_the_output():
    rng = np.random.default_rng(1)
    model, reference = qdq_matmul_model(rng)
    # Make the last DequantizeLinear itself produce the graph output.
    graph = model.graph
    ident = next(n for n in graph.node if n.op_type == "Identity")
    graph.node.remove(ident)
    graph.output[0].name = ident.input[0]
    stripped = strip_qdq(model)
    assert [o.name for o in stripped.graph.output] == [ident.input[0]]
    x = rng.normal(0, 1, (3, 16)).astype(np.float32)
    sess = ort.InferenceSession(stripped.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], reference(x), rtol=1e-5, atol=1e-5)


def test_strip_qdq_conv_close_to_qdq_model(conv_path):
    model = onnx.load(conv_path)
    stripped = strip_qdq(model)
    assert [n.op_type for n in stripped.graph.node] == ["Conv"] * 3 + ["Identity"]
    x = _feeds(None, 2)["x"]
    a, b = _ort(model, x), _ort(stripped, x)
    # Per-layer rounding of activations (scale 0.05) is all that separates them.
    assert np.abs(a - b).mean() < 0.05


def _bench(*args: str) -> list[str]:
    return ["bench", *args, "--iters", "3", "--backends", "onnxruntime"]


def test_bench_of_a_float_model_says_so(tmp_path, capsys):
    from eightbit.cli import main

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    x = helper.make_tensor_value_info("x", F32, [None, 4])
    y = helper.make_tensor_value_info("y", F32, [None, 3])
    onnx.save(_model([node], [w], [x], [y]), tmp_path / "float.onnx")
    assert main(_bench(str(tmp_path / "float.onnx"))) == 2
    printed = capsys.readouterr()
    assert "no Q/DQ: this is a float model" in printed.err and "int8" not in printed.out


def test_bench_of_a_file_that_is_not_onnx(tmp_path, capsys):
    from eightbit.cli import main

    (tmp_path / "weights.onnx").write_bytes(b"\x00\x01 not a protobuf at all")
    assert main(_bench(str(tmp_path / "weights.onnx"))) == 2
    assert "is not an ONNX model" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--batch", "--iters", "--threads"])
def test_bench_refuses_non_positive_numbers(flag, tmp_path, capsys):
    from eightbit.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["bench", str(tmp_path / "m.onnx"), flag, "0"])
    assert exited.value.code == 2 and flag in capsys.readouterr().err
