"""Is this int8 ONNX file faster than its float twin?  The whole-model check behind `eightbit quantize`'s refusal to
write an int8 model that is slower than fp32 at the user's batch size.

Both files are timed side by side on one runtime (blocks interleaved A B / B A, see `time_interleaved`), so slow
drift of a shared machine hits both alike; the ratio of medians is what is judged, never an absolute time.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from eightbit.export.strip import strip_qdq
from eightbit.runtime.backends import Backend, RuntimeOptions, load
from eightbit.runtime.benchmark import Timing, time_interleaved

__all__ = [
    "SKIP_ENV", "SLOWER_TOLERANCE", "SpeedCheck", "compare_with_float", "model_feeds", "speed_check_skipped"
]  # fmt: skip

# An int8 model up to 5% slower than fp32 passes: medians of short runs on a loaded 2-core machine move by that much.
SLOWER_TOLERANCE = 0.05
# Set to 1 to skip the check (e.g. test suites that quantize toy models); `--no-speed-check` does the same.
SKIP_ENV = "EIGHTBIT_SKIP_SPEED_CHECK"


def speed_check_skipped() -> bool:
    """True when the environment asks to skip the int8-vs-fp32 speed check."""
    return os.environ.get(SKIP_ENV, "").strip().lower() in {"1", "true", "yes"}


@dataclass(frozen=True, kw_only=True)
class SpeedCheck:
    """Median call times of the int8 model and its float twin, measured side by side."""

    int8: Timing
    fp32: Timing
    backend: Backend
    tolerance: float = SLOWER_TOLERANCE

    @property
    def ratio(self) -> float:
        """int8 time / fp32 time (> 1: int8 is slower)."""
        return self.int8.median_ms / self.fp32.median_ms

    @property
    def slower(self) -> bool:
        """True when int8 takes more than (1 + tolerance) times the fp32 time."""
        return self.ratio > 1.0 + self.tolerance

    def line(self) -> str:
        """One line: both times and the ratio."""
        speed = f"{1 / self.ratio:.2f}x faster" if self.ratio <= 1 else f"{self.ratio:.2f}x slower"
        return (
            f"speed on {self.backend.value}, batch {self.int8.batch}: int8 {self.int8.median_ms:.3f} ms vs fp32 "
            f"{self.fp32.median_ms:.3f} ms per call (median of {self.int8.iters}): int8 is {speed}"
        )

    def advice(self) -> str:
        """What to try when int8 is slower."""
        return (
            "try: a larger batch (--deploy-batch; Q/DQ and per-call overhead shrink per sample), OpenVINO "
            "(`eightbit bench MODEL.onnx --sweep 1,8,32` compares both runtimes and shows where the time goes), or "
            "keeping the slow ops float (--keep-float MODULE, listed above); --allow-slower writes the model anyway"
        )


def compare_with_float(
    path: str | Path,
    batch: int = 1,
    *,
    backend: Backend = Backend.ORT,
    threads: int = 2,
    iters: int = 20,
    warmup: int = 3,
    rounds: int = 4,
) -> SpeedCheck:
    """Time the int8 QDQ model at `path` and its float twin (Q/DQ stripped) on random inputs at `batch`,
    interleaved."""
    model = onnx.load(path)
    feeds = model_feeds(model, batch)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save(strip_qdq(model), fp32)
        options = RuntimeOptions(threads=threads, ort_spinning=False)
        runners = {"int8": load(path, backend, options), "fp32": load(fp32, backend, options)}
        timings = time_interleaved(runners, lambda r: feeds, warmup=warmup, iters=iters, rounds=rounds)
    return SpeedCheck(int8=timings["int8"], fp32=timings["fp32"], backend=backend)


def model_feeds(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    """Random inputs (seeded) of the model's input shapes at `batch` (integer inputs, e.g. token ids, get zeros)."""
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        dims = [batch, *dims[1:]] if dims else []
        if any(d is None for d in dims):
            raise ValueError(f"input {value.name!r} has symbolic dims besides the batch axis ({dims})")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        feeds[value.name] = (
            rng.standard_normal(dims).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(dims, dtype)
        )
    return feeds
