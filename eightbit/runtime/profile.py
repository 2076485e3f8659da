"""Per-kernel time of one model file on ONNX Runtime (its JSON profiler) or OpenVINO (per-layer performance
counters), each kernel tied to the ONNX nodes it executes, and the wall time of the same runs.

Runtimes fuse nodes (ORT: DequantizeLinear -> Conv -> QuantizeLinear becomes one QLinearConv named after the
Conv; OpenVINO: a FakeQuantize folded into a Convolution), so a kernel lists the names of the ONNX nodes it
came from: ORT keeps the original node name as a prefix of the fused kernel's name ("conv_5_token_2"), OpenVINO
records them in the execution graph's `originalLayersNames`.  Kernels that a runtime inserts itself (layout
Transposes, Reorders) come from no ONNX node and list none.

The difference between the wall time of a run and the sum of its kernel times is the per-call overhead
(input/output binding, memory planning, thread wake-up), measured on the same runs.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from eightbit.runtime.backends import Backend, OpenVinoPrecision, RuntimeOptions
from eightbit.runtime.benchmark import OpCategory, ort_kernel_events

__all__ = ["Kernel", "KernelProfile", "OVERHEAD", "profile_kernels"]

OVERHEAD = "per-call overhead"  # the split's key for wall time outside every kernel


@dataclass(frozen=True, kw_only=True)
class Kernel:
    """One executed kernel: mean milliseconds per run and the ONNX nodes it executes."""

    name: str
    op_type: str
    category: OpCategory
    sources: tuple[str, ...]
    ms: float


@dataclass(frozen=True, kw_only=True)
class KernelProfile:
    """Kernels of one model on one backend at one batch size (median call of each, per run), and the median wall
    time of the same runs."""

    backend: Backend
    batch: int
    kernels: tuple[Kernel, ...]
    wall_ms: float
    runs: int

    @property
    def kernel_ms(self) -> float:
        return sum(k.ms for k in self.kernels)

    def split(self) -> dict[str, float]:
        """Milliseconds per run by `OpCategory` value plus `OVERHEAD` (wall time outside all kernels); every key is
        present.  OpenVINO's counters can add up to more than the wall time (kernels that overlap on several
        threads); the overhead is then 0 and the kernel shares are scaled to the wall time, so the split always
        adds up to the measured wall time."""
        out = {c.value: 0.0 for c in OpCategory}
        for k in self.kernels:
            out[k.category.value] += k.ms
        total = sum(out.values())
        scale = self.wall_ms / total if total > self.wall_ms > 0 else 1.0
        out = {c: ms * scale for c, ms in out.items()}
        out[OVERHEAD] = max(self.wall_ms - total * scale, 0.0)
        return out


def profile_kernels(
    path: str | Path,
    backend: Backend,
    feeds: Mapping[str, np.ndarray],
    *,
    options: RuntimeOptions | None = None,
    runs: int = 10,
    warmup: int = 2,
) -> KernelProfile:
    """Profile `runs` calls (after `warmup` unprofiled-in-result calls) of the model at `path` on `backend`."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    options = options or RuntimeOptions()
    profiler = _PROFILERS.get(backend)
    if profiler is None:
        raise ValueError(f"no per-kernel profiler for {backend!r}; valid: {[b.value for b in _PROFILERS]}")
    return profiler(Path(path), dict(feeds), options, runs, max(warmup, 1))


def _batch(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def onnx_node_names(path: Path) -> list[str]:
    """Names of the ONNX file's nodes (empty for an OpenVINO IR file)."""
    if path.suffix.lower() != ".onnx":
        return []
    return [n.name for n in onnx.load(path, load_external_data=False).graph.node if n.name]


def ort_sources(kernel_name: str, node_names: Iterable[str]) -> tuple[str, ...]:
    """The ONNX node an ORT kernel comes from: the longest node name that equals the kernel's name or is its prefix
    followed by "_" (ORT's fused and layout-transformed kernels append "_token_N" and similar)."""
    best = ""
    for name in node_names:
        if len(name) > len(best) and (kernel_name == name or kernel_name.startswith(name + "_")):
            best = name
    return (best,) if best else ()


def _profile_ort(path: Path, feeds, options: RuntimeOptions, runs: int, warmup: int) -> KernelProfile:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    names = onnx_node_names(path)
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort_profile")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inputs = {i.name: feeds[i.name] for i in sess.get_inputs()}
        for _ in range(warmup):
            sess.run(None, inputs)
        wall = _timed(lambda: sess.run(None, inputs), runs)
        events = json.loads(Path(sess.end_profiling()).read_text())
    windows, events_in_runs = ort_kernel_events(events, skip_runs=warmup)  # the timed runs only
    per_kernel: dict[str, tuple[str, OpCategory, list[float]]] = {}
    for name, op, category, us in events_in_runs:
        per_kernel.setdefault(name, (op, category, []))[2].append(us)
    n = max(len(windows), 1)
    kernels = tuple(
        Kernel(name=name, op_type=op, category=cat, sources=ort_sources(name, names), ms=_per_run_ms(us, n))
        for name, (op, cat, us) in per_kernel.items()
    )
    return KernelProfile(backend=Backend.ORT, batch=_batch(feeds), kernels=kernels, wall_ms=wall, runs=runs)


def _timed(call, runs: int) -> float:
    """Median wall milliseconds of `runs` calls."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0


def _per_run_ms(durations_us: list[float], runs: int) -> float:
    """Milliseconds per run of a kernel from its durations over `runs` runs: the median call (robust to the
    stalls of a shared machine) times the calls per run."""
    return float(np.median(durations_us)) / 1000.0 * len(durations_us) / runs


# OpenVINO's node types that only move or re-lay out data, and those that convert between int8 and float.
_OV_LAYOUT = {"Reorder", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Concatenation", "Split", "Gather", "Pad"}
_OV_QUANTIZE = {"FakeQuantize", "Quantize"}
_OV_INT8_MARKS = ("I8", "U8", "i8", "u8")


def ov_category(node_type: str, exec_type: str) -> OpCategory:
    """Category of an OpenVINO CPU primitive from its type and implementation (e.g. "brgconv_avx512_I8": the
    suffix is the precision it runs in)."""
    if node_type in _OV_QUANTIZE:
        return OpCategory.QUANTIZE
    if node_type == "Convert":  # int8 codes -> float (weights or activations)
        return OpCategory.DEQUANTIZE
    if node_type in _OV_LAYOUT:
        return OpCategory.LAYOUT
    if exec_type.endswith(_OV_INT8_MARKS):
        return OpCategory.INT8_COMPUTE
    return OpCategory.FLOAT_COMPUTE


def _profile_openvino(path: Path, feeds, options: RuntimeOptions, runs: int, warmup: int) -> KernelProfile:
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hint

    core = ov.Core()
    precision = {OpenVinoPrecision.F32: ov.Type.f32, OpenVinoPrecision.BF16: ov.Type.bf16}
    config = {
        props.inference_num_threads: options.threads,
        hint.performance_mode: hint.PerformanceMode.LATENCY,
        hint.inference_precision: precision[options.openvino_precision],
        props.enable_profiling: True,
    }
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    names = [p.get_any_name() if p.get_names() else f"input_{i}" for i, p in enumerate(compiled.inputs)]
    ordered = [np.ascontiguousarray(feeds[n]) for n in names]
    for _ in range(warmup):
        request.infer(ordered, share_inputs=True)
    originals = _ov_original_names(compiled, set(onnx_node_names(path)))
    # The CPU plugin's counters are running means over every inference of the request (measured: a kernel's
    # value falls from its first, slow call towards its steady time run after run), so the timed runs' mean is
    # recovered from the totals before and after them.
    before = _ov_counters(request)
    wall = []
    for _ in range(runs):
        t0 = time.perf_counter()
        request.infer(ordered, share_inputs=True)
        wall.append(time.perf_counter() - t0)
    after = _ov_counters(request)
    kernels = []
    for name, (op, category, mean_us) in after.items():
        us = (mean_us * (warmup + runs) - before.get(name, (op, category, 0.0))[2] * warmup) / runs
        kernels.append(
            Kernel(name=name, op_type=op, category=category, sources=originals.get(name, ()), ms=max(us, 0.0) / 1e3)
        )
    kernels = tuple(kernels)
    wall_ms = float(np.median(wall)) * 1000.0  # robust to the stalls of a shared machine
    return KernelProfile(backend=Backend.OPENVINO, batch=_batch(feeds), kernels=kernels, wall_ms=wall_ms, runs=runs)


def _ov_counters(request) -> dict[str, tuple[str, OpCategory, float]]:
    """Executed primitive -> (type, category, microseconds) as the request's performance counters report it."""
    out = {}
    for info in request.profiling_info:
        if info.status == info.Status.EXECUTED:
            category = ov_category(info.node_type, info.exec_type)
            out[info.node_name] = (info.node_type, category, info.real_time.total_seconds() * 1e6)
    return out


def _ov_original_names(compiled, known: set[str]) -> dict[str, tuple[str, ...]]:
    """Execution-graph node -> the ONNX node names fused into it (`originalLayersNames`).  OpenVINO names the
    pieces it splits a node into "conv_5/WithoutBiases"; the part before the first "/" is the ONNX node.  Names
    that are not nodes of the ONNX file (OpenVINO's own constants and converts) are dropped when `known` is given."""
    out = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        heads = (n.split("/")[0] for n in names.split(",") if n)
        out[op.get_friendly_name()] = tuple(dict.fromkeys(n for n in heads if not known or n in known))
    return out


_PROFILERS = {Backend.ORT: _profile_ort, Backend.OPENVINO: _profile_openvino}
