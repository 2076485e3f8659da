"""Runner parity between ONNX Runtime and OpenVINO, dynamic batch, and load errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eightbit.runtime.backends import Backend, OpenVinoPrecision, RuntimeOptions, load


def _tiny_cnn(path) -> None:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm with a symbolic batch dimension."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.3, (5, 8)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "tiny.onnx"
    _tiny_cnn(path)
    return path


def test_parity_ort_openvino_two_batch_sizes(tiny_path):
    ort_runner = load(tiny_path, Backend.ORT)
    ov_runner = load(tiny_path, Backend.OPENVINO)  # compiled once, used for both batch sizes
    assert ort_runner.input_names == ov_runner.input_names == ["x"]
    assert ort_runner.output_names == ov_runner.output_names == ["y"]
    rng = np.random.default_rng(1)
    for batch in (1, 7):
        x = rng.normal(size=(batch, 3, 12, 12)).astype(np.float32)
        (a,) = ort_runner.run({"x": x})
        (b,) = ov_runner.run({"x": x})
        assert a.shape == b.shape == (batch, 5)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_openvino_outputs_are_not_overwritten_by_next_call(tiny_path):
    runner = load(tiny_path, Backend.OPENVINO)
    x = np.ones((2, 3, 12, 12), np.float32)
    (first,) = runner.run({"x": x})
    kept = first.copy()
    runner.run({"x": -x})
    np.testing.assert_array_equal(first, kept)


def test_bf16_is_opt_in_and_runs(tiny_path):
    assert RuntimeOptions().openvino_precision is OpenVinoPrecision.F32
    runner = load(tiny_path, Backend.OPENVINO, RuntimeOptions(threads=1, openvino_precision=OpenVinoPrecision.BF16))
    (y,) = runner.run({"x": np.zeros((1, 3, 12, 12), np.float32)})
    assert y.shape == (1, 5)


def test_options_are_frozen_and_validated():
    opts = RuntimeOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.threads = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="threads"):
        RuntimeOptions(threads=0)
    with pytest.raises(TypeError):
        RuntimeOptions(2)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize("backend", list(Backend))
def test_missing_file(tmp_path, backend):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope.onnx", backend)


@pytest.mark.parametrize("backend", list(Backend))
def test_corrupt_file(tmp_path, tiny_path, backend):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny_path.read_bytes()[:100])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffthis is not a protobuf" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match="re-export"):
            load(bad, backend)


def test_ort_rejects_openvino_ir(tmp_path):
    xml = tmp_path / "model.xml"
    xml.write_text("<net/>")
    with pytest.raises(ValueError, match="OpenVINO IR"):
        load(xml, Backend.ORT)


def test_missing_feed_names_inputs(tiny_path):
    runner = load(tiny_path, Backend.ORT)
    with pytest.raises(KeyError, match="'x'"):
        runner.run({"input": np.zeros((1, 3, 12, 12), np.float32)})
