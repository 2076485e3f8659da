"""Per-kernel profiles on ONNX Runtime and OpenVINO: kernels tied to ONNX nodes, split against the wall time."""

import numpy as np
import pytest

import eightbit
from eightbit.runtime.backends import Backend
from eightbit.runtime.benchmark import OpCategory, Timing
from eightbit.runtime.profile import (
    OVERHEAD,
    Kernel,
    KernelProfile,
    onnx_node_names,
    ort_sources,
    ov_category,
    profile_kernels,
)
from eightbit.runtime.speedcheck import SpeedCheck, compare_with_float
from tests.helpers import LinearGeluChain, ResidualNet, calibration_batches


@pytest.fixture(scope="module")
def residual_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "residual.onnx"
    eightbit.quantize(ResidualNet().eval(), calibration_batches(), progress=False).export_onnx(path, check=False)
    return path


@pytest.mark.parametrize("backend", list(Backend))
def test_kernels_name_their_onnx_nodes_and_the_split_adds_up_to_the_wall_time(residual_onnx, backend):
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)}
    profile = profile_kernels(residual_onnx, backend, feeds, runs=10)
    names = set(onnx_node_names(residual_onnx))
    convs = [k for k in profile.kernels if k.category is OpCategory.INT8_COMPUTE and k.sources]
    assert convs and all(set(k.sources) <= names for k in profile.kernels)
    assert {s for k in profile.kernels for s in k.sources} & {n for n in names if n.startswith("conv_")}
    split = profile.split()
    assert set(split) == {c.value for c in OpCategory} | {OVERHEAD}
    assert all(v >= 0 for v in split.values())
    assert sum(split.values()) == pytest.approx(profile.wall_ms, rel=1e-6)
    # measured, not forced: the kernels fit inside the wall time of the same runs (20% slack for OpenVINO's
    # counters of kernels that overlap on two threads)
    assert profile.kernel_ms <= profile.wall_ms * 1.2 and profile.batch == 4


def test_split_scales_kernels_that_overlap_beyond_the_wall_time():
    kernels = (Kernel(name="a", op_type="Conv", category=OpCategory.FLOAT_COMPUTE, sources=(), ms=3.0),)
    split = KernelProfile(backend=Backend.OPENVINO, batch=1, kernels=kernels, wall_ms=2.0, runs=1).split()
    assert split["float compute"] == 2.0 and split[OVERHEAD] == 0.0


def test_ort_kernel_names_map_to_the_longest_matching_node():
    names = ["conv_5", "conv_50", "q_6", "q_6_clamp"]
    assert ort_sources("conv_5_token_2", names) == ("conv_5",)
    assert ort_sources("conv_50_nchwc", names) == ("conv_50",)
    assert ort_sources("q_6_clamp_nchwc", names) == ("q_6_clamp",)
    assert ort_sources("Transpose_token_13", names) == ()


@pytest.mark.parametrize(
    "node_type, exec_type, category",
    [
        ("Convolution", "brgconv_avx512_I8", OpCategory.INT8_COMPUTE),
        ("Convolution", "brgconv_avx512_f32", OpCategory.FLOAT_COMPUTE),
        ("FakeQuantize", "jit_avx512_f32", OpCategory.QUANTIZE),
        ("Convert", "ref_I8", OpCategory.DEQUANTIZE),
        ("Reorder", "jit_uni_I8", OpCategory.LAYOUT),
    ],
)
def test_openvino_primitive_categories(node_type, exec_type, category):
    assert ov_category(node_type, exec_type) is category


def test_unknown_backend_and_bad_runs_are_refused(residual_onnx):
    with pytest.raises(ValueError, match="runs must be >= 1"):
        profile_kernels(residual_onnx, Backend.ORT, {}, runs=0)
    with pytest.raises(ValueError, match="valid"):
        profile_kernels(residual_onnx, "tensorrt", {})


def _timing(ms):
    return Timing(median_ms=ms, p10_ms=ms, p90_ms=ms, iters=10, batch=1)


def test_speed_check_judges_the_ratio_with_a_tolerance():
    assert not SpeedCheck(int8=_timing(1.04), fp32=_timing(1.0), backend=Backend.ORT).slower
    slow = SpeedCheck(int8=_timing(1.5), fp32=_timing(1.0), backend=Backend.ORT)
    assert slow.slower and "1.50x slower" in slow.line() and "--allow-slower" in slow.advice()
    assert "2.00x faster" in SpeedCheck(int8=_timing(1.0), fp32=_timing(2.0), backend=Backend.ORT).line()


def test_measured_chain_of_tiny_int8_linears_is_slower(tmp_path):
    path = tmp_path / "chain.onnx"
    qm = eightbit.quantize(LinearGeluChain().eval(), [np.ones((4, 8), np.float32)], progress=False)
    qm.export_onnx(path, check=False)
    check = compare_with_float(path, batch=1)
    assert check.slower and check.ratio > 1.2, check.line()
