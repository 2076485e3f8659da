"""Latency / throughput measurement, result tables, and an ONNX Runtime per-op time breakdown.

Timing is a warm-up stage (discarded: first calls allocate buffers and, on OpenVINO, finish lazy
compilation) followed by a timed stage of single calls, each timed on its own so that medians and
percentiles are available; a median is far more stable than a mean on a shared 2-core machine.
"""

from __future__ import annotations

import enum
import json
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from eightbit.runtime.backends import Backend, Runner, RuntimeOptions, load

__all__ = [
    "OpCategory",
    "OpProfile",
    "Row",
    "Timing",
    "batch_of",
    "benchmark_models",
    "categorize_op",
    "format_table",
    "latency",
    "op_time_breakdown",
    "profile_ops",
    "throughput",
    "time_calls",
    "time_interleaved",
]


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Per-call wall times of the timed stage, in milliseconds, and the batch size they were run at."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iters: int
    batch: int

    @property
    def samples_per_s(self) -> float:
        """Throughput implied by the median call time."""
        return self.batch * 1000.0 / self.median_ms

    @classmethod
    def from_ms(cls, ms: Sequence[float] | np.ndarray, batch: int) -> Timing:
        """Summarise per-call times (ms), e.g. pooled from several interleaved `time_calls` rounds."""
        ms = np.asarray(ms, dtype=np.float64)
        if ms.size == 0:
            raise ValueError("no timed calls to summarise")
        return cls(
            median_ms=float(np.median(ms)),
            p10_ms=float(np.percentile(ms, 10)),
            p90_ms=float(np.percentile(ms, 90)),
            iters=int(ms.size),
            batch=batch,
        )


def batch_of(feeds: Mapping[str, np.ndarray]) -> int:
    """Leading dimension of the first feed (the batch size the feeds run at)."""
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def time_calls(runner: Runner, feeds: dict[str, np.ndarray], warmup: int, iters: int) -> np.ndarray:
    """Wall time in ms of each of `iters` calls, after `warmup` untimed calls."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        runner.run(feeds)
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        runner.run(feeds)
        times[i] = time.perf_counter() - t0
    return times * 1000.0


def latency(runner: Runner, feeds: dict[str, np.ndarray], warmup: int = 10, iters: int = 50) -> Timing:
    """Time `iters` single calls of `runner.run(feeds)` after `warmup` untimed calls."""
    return Timing.from_ms(time_calls(runner, feeds, warmup, iters), batch_of(feeds))


def throughput(runner: Runner, feeds: dict[str, np.ndarray], warmup: int = 3, iters: int = 10) -> float:
    """Samples per second at the batch size of `feeds` (leading dimension), from the median call time."""
    return latency(runner, feeds, warmup=warmup, iters=iters).samples_per_s


@dataclass(frozen=True, kw_only=True)
class Row:
    """One measured (model, backend, batch size) cell."""

    label: str
    backend: Backend
    timing: Timing

    @property
    def batch(self) -> int:
        """Batch size the row was measured at."""
        return self.timing.batch


FeedMaker = Callable[[Runner, int], dict[str, np.ndarray]]
K = TypeVar("K", bound=Hashable)


def time_interleaved(
    runners: Mapping[K, Runner],
    feeds_for: Callable[[Runner], dict[str, np.ndarray]],
    *,
    warmup: int,
    iters: int,
    rounds: int = 4,
) -> dict[K, Timing]:
    """Time several runners in blocks, round by round, reversing the order every other round (A B C, C B A):
    slow drift of the machine's speed then hits every runner alike instead of whichever ran last.

    Every block starts with its own full warm-up: the previous runner's threads (ORT spins after each run)
    and evicted caches slow the first calls after a switch (measured: one warm-up call was not enough for
    OpenVINO after ORT).
    """
    per_round = max(1, -(-iters // max(rounds, 1)))
    feeds = {k: feeds_for(r) for k, r in runners.items()}
    times: dict[K, list[np.ndarray]] = {k: [] for k in runners}
    order = list(runners.items())
    for i in range(max(rounds, 1)):
        for key, runner in order if i % 2 == 0 else reversed(order):
            times[key].append(time_calls(runner, feeds[key], warmup, per_round))
    return {k: Timing.from_ms(np.concatenate(v), batch_of(feeds[k])) for k, v in times.items()}


def benchmark_models(
    paths: Mapping[str, str | Path],
    backends: Sequence[Backend],
    batch_sizes: Sequence[int],
    make_feeds: FeedMaker,
    *,
    options: RuntimeOptions | None = None,
    iters: Callable[[int], tuple[int, int]] | None = None,
    rounds: int = 2,
) -> list[Row]:
    """Time every (model, backend, batch size) combination, models interleaved (see `time_interleaved`).

    Args:
        paths: label -> model file. OpenVINO IR (.xml) files are only run on OpenVINO.
        backends: engines to run each model on.
        batch_sizes: leading dimension of the feeds.
        make_feeds: (runner, batch) -> feeds; receives the runner so it can use its input names.
        options: threads / precision, shared by all runs.
        iters: batch -> (warmup, timed iterations); default 10/50 at batch 1 and 3/10 above, because
            large batches are slow and their per-call variance is small.
        rounds: how many blocks the timed calls are split into, in A B C / C B A order (see
            `time_interleaved`); 2 cancels linear drift of the machine's speed.
    """
    iters = iters or (lambda b: (10, 50) if b == 1 else (3, 10))
    runners = {
        (label, backend): load(path, backend, options)
        for label, path in paths.items()
        for backend in backends
        if not (backend is Backend.ORT and Path(path).suffix.lower() == ".xml")
    }
    rows = []
    for batch in batch_sizes:
        warmup, n = iters(batch)
        timings = time_interleaved(runners, lambda r, b=batch: make_feeds(r, b), warmup=warmup, iters=n, rounds=rounds)
        rows += [Row(label=lb, backend=be, timing=t) for (lb, be), t in timings.items()]
    # Order rows by model, then backend, then batch, as callers list them.
    order = {k: i for i, k in enumerate(runners)}
    return sorted(rows, key=lambda r: (order[(r.label, r.backend)], r.batch))


def _render(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(c) for c in col) for col in zip(header, *body, strict=True)]

    def fmt(cells: list[str]) -> str:
        # Text columns left-aligned, numeric columns right-aligned so decimal places line up.
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


def format_table(rows: Sequence[Row], reference: tuple[str, Backend] | None = None, *, markdown: bool = False) -> str:
    """Table with one line per (label, backend) and, per batch size, the time and a speed ratio.

    Batch 1 shows median latency in ms (with p10-p90); larger batches show samples/s. Ratios are speedups
    over the `reference` (label, backend) at the same batch size (>1 = faster); omitted without a reference.
    """
    batches = sorted({r.batch for r in rows})
    cells = {(r.label, r.backend, r.batch): r.timing for r in rows}
    keys = list(dict.fromkeys((r.label, r.backend) for r in rows))
    header = ["model", "backend"]
    for b in batches:
        header.append("b1 ms (p10-p90)" if b == 1 else f"b{b} samples/s")
        if reference:
            header.append(f"b{b} x ref")
    body = []
    for label, backend in keys:
        line = [label, backend.value]
        for b in batches:
            t = cells.get((label, backend, b))
            ref = cells.get((*reference, b)) if reference else None
            if t is None:
                line.append("-")
            elif b == 1:
                line.append(f"{t.median_ms:.2f} ({t.p10_ms:.2f}-{t.p90_ms:.2f})")
            else:
                line.append(f"{t.samples_per_s:.1f}")
            if reference:
                line.append(f"{ref.median_ms / t.median_ms:.2f}" if t and ref else "-")
        body.append(line)
    return _render(header, body, markdown)


class OpCategory(enum.Enum):
    """Where kernel time goes in a (quantized) model."""

    INT8_COMPUTE = "int8 compute"
    FLOAT_COMPUTE = "float compute"
    QUANTIZE = "quantize"
    DEQUANTIZE = "dequantize"
    LAYOUT = "reorder/layout"
    OTHER = "other"


_QUANTIZE_OPS = {"QuantizeLinear", "DynamicQuantizeLinear"}
_DEQUANTIZE_OPS = {"DequantizeLinear"}
# Integer-arithmetic kernels whose name does not start with "QLinear".
_INT8_OPS = {
    "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QAttention", "QEmbedLayerNormalization", "QOrderedMatMul", "QOrderedAttention",
}  # fmt: skip
# Float kernels that dominate compute; elementwise float ops are classified by their input type instead.
_FLOAT_OPS = {
    "Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
    "Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization", "BatchNormalization",
}  # fmt: skip
_LAYOUT_OPS = {
    "Transpose", "ReorderInput", "ReorderOutput", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat",
    "Split", "Slice", "Pad", "Identity", "Shape", "Expand", "Tile", "Gather", "DepthToSpace", "SpaceToDepth",
}  # fmt: skip
_INT8_TYPES = {"int8", "uint8"}
_FLOAT_TYPES = {"float", "float16", "bfloat16", "double"}


def categorize_op(op_type: str, input_types: Iterable[str] = ()) -> OpCategory:
    """Category of one kernel; `input_types` (ORT profile names, e.g. "uint8") decide generic ops."""
    if op_type in _QUANTIZE_OPS:
        return OpCategory.QUANTIZE
    if op_type in _DEQUANTIZE_OPS:
        return OpCategory.DEQUANTIZE
    if op_type.startswith("QLinear") or op_type in _INT8_OPS:
        return OpCategory.INT8_COMPUTE
    if op_type in _LAYOUT_OPS:
        return OpCategory.LAYOUT
    if op_type in _FLOAT_OPS:
        return OpCategory.FLOAT_COMPUTE
    types = set(input_types)
    if types & _INT8_TYPES:  # e.g. MaxPool on a uint8 tensor
        return OpCategory.INT8_COMPUTE
    if types & _FLOAT_TYPES:
        return OpCategory.FLOAT_COMPUTE
    return OpCategory.OTHER


@dataclass(frozen=True, kw_only=True)
class OpProfile:
    """ORT profile averaged over the profiled runs: kernel ms per (op type, category), and run ms."""

    kernel_ms: dict[tuple[str, OpCategory], float]
    run_ms: float
    runs: int

    def by_category(self) -> dict[str, float]:
        """Kernel ms per run summed per `OpCategory` value; every category is present (0.0 if unused)."""
        out = {c.value: 0.0 for c in OpCategory}
        for (_, cat), ms in self.kernel_ms.items():
            out[cat.value] += ms
        return out


def ort_kernel_events(
    events: list[dict], skip_runs: int
) -> tuple[list[tuple[float, float]], list[tuple[str, str, OpCategory, float]]]:
    """From ONNX Runtime's profile events: the (start, end) windows in us of the runs after the first
    `skip_runs` (warm-up), and each kernel event inside them as (node name, op type, category, microseconds)."""
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in model_runs[skip_runs:]]
    kernels = []
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in windows):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        types = [t for shape in args.get("input_type_shape", []) for t in shape]
        kernels.append((e["name"][: -len("_kernel_time")], op, categorize_op(op, types), e["dur"]))
    return windows, kernels


def profile_ops(path: str | Path, feeds: dict[str, np.ndarray], threads: int = 2, runs: int = 10) -> OpProfile:
    """Profile `runs` calls on ONNX Runtime (after one unprofiled-in-result warm-up call)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort_profile")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    # The first run pays for buffer allocation; keep only kernels inside the later runs' windows.
    windows, kernels = ort_kernel_events(events, skip_runs=1)
    kernel_us: dict[tuple[str, OpCategory], float] = {}
    for _, op, category, us in kernels:
        kernel_us[(op, category)] = kernel_us.get((op, category), 0.0) + us
    n = max(len(windows), 1)
    return OpProfile(
        kernel_ms={k: v / 1000.0 / n for k, v in kernel_us.items()},
        run_ms=sum(hi - lo for lo, hi in windows) / 1000.0 / n,
        runs=len(windows),
    )


def op_time_breakdown(
    path: str | Path, feeds: dict[str, np.ndarray], threads: int = 2, runs: int = 10
) -> dict[str, float]:
    """Mean kernel milliseconds per run on ONNX Runtime, grouped by `OpCategory` value (all keys present).

    The values add up to slightly less than the model's run time; the difference is ORT's per-run
    overhead (input/output binding, memory planning), not attributed to any kernel.
    """
    return profile_ops(path, feeds, threads=threads, runs=runs).by_category()
