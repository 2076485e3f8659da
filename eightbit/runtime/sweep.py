"""Batch sweep: fp32 vs int8 latency, throughput and speedup per batch size and runtime, and where the int8 (and
fp32) time goes at each batch size: int8 compute, float compute, quantize, dequantize, layout reorders, and per-call
overhead (the run's wall time minus its kernels, from the runtime's profiler on the same runs).

The report and plots are `eightbit.analysis.sweep`; this module only measures (a runtime sees files).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eightbit.runtime.backends import Backend, RuntimeOptions, load
from eightbit.runtime.benchmark import Timing, time_interleaved
from eightbit.runtime.profile import KernelProfile, profile_kernels

__all__ = ["SweepPoint", "default_iters", "parse_batches", "sweep"]


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    """One (backend, batch size) cell: call times of both models and their time splits (ms per call)."""

    backend: Backend
    batch: int
    fp32: Timing
    int8: Timing
    fp32_profile: KernelProfile
    int8_profile: KernelProfile

    @property
    def speedup(self) -> float:
        """fp32 time / int8 time (> 1: int8 is faster)."""
        return self.fp32.median_ms / self.int8.median_ms


def parse_batches(text: str) -> list[int]:
    """ "1,2,4,8" -> [1, 2, 4, 8]; a clear error for anything but positive integers."""
    try:
        batches = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        batches = []
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"--sweep takes positive batch sizes separated by commas, e.g. 1,8,32; got {text!r}")
    return sorted(set(batches))


def default_iters(batch: int) -> tuple[int, int, int]:
    """(warm-up calls, timed calls, profiled calls) at `batch`: fewer calls for large batches, whose per-call
    variance is small and whose calls are long (ResNet-50 at batch 128 takes seconds on 2 cores)."""
    timed = int(np.clip(64 // batch, 4, 30))
    return (2 if batch <= 8 else 1), timed, int(np.clip(64 // batch, 3, 10))  # median of >= 3: one stall is ignored


def sweep(
    int8_path: str | Path,
    fp32_path: str | Path,
    backends: Sequence[Backend],
    batches: Sequence[int],
    feeds_for: Callable[[int], dict[str, np.ndarray]],
    *,
    threads: int = 2,
    iters: Callable[[int], tuple[int, int, int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[SweepPoint]:
    """Time and profile both models at every batch size on every backend.  Timing interleaves the two models
    (A B / B A blocks, see `time_interleaved`) so that the speedup is a side-by-side ratio; the profile of each
    model is a separate pass (profilers slow kernels down a little, so its times feed only the split)."""
    iters = iters or default_iters
    options = RuntimeOptions(threads=threads)
    points = []
    for backend in backends:
        runners = {"fp32": load(fp32_path, backend, options), "int8": load(int8_path, backend, options)}
        for batch in batches:
            warmup, timed, profiled = iters(batch)
            feeds = feeds_for(batch)
            timings = time_interleaved(runners, lambda r, f=feeds: f, warmup=warmup, iters=timed, rounds=2)
            profiles = {
                label: profile_kernels(path, backend, feeds, options=options, runs=profiled, warmup=warmup)
                for label, path in (("fp32", fp32_path), ("int8", int8_path))
            }
            point = SweepPoint(
                backend=backend,
                batch=batch,
                fp32=timings["fp32"],
                int8=timings["int8"],
                fp32_profile=profiles["fp32"],
                int8_profile=profiles["int8"],
            )
            points.append(point)
            if progress:
                progress(
                    f"{backend.value} batch {batch}: fp32 {point.fp32.median_ms:.2f} ms, int8 "
                    f"{point.int8.median_ms:.2f} ms, speedup {point.speedup:.2f}x"
                )
    return points
