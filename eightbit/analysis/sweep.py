"""The batch-sweep report: one Markdown file with the fp32 vs int8 table per runtime and batch size, the time
split of each model per batch size, the host's CPU flags, and two kinds of PNG: speedup vs batch size (one line
per runtime) and the int8 model's stacked time shares per batch size (one figure per runtime).

`eightbit bench MODEL.onnx --sweep 1,2,4,8,16,32,64,128 [--report DIR]` measures (`eightbit.runtime.sweep`) and
writes it.
"""

from __future__ import annotations

import json
import platform
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import onnx

from eightbit.analysis.figures import check_png, pyplot, save_png
from eightbit.export.strip import strip_qdq
from eightbit.fileio import atomic_path
from eightbit.runtime import hw
from eightbit.runtime.backends import Backend
from eightbit.runtime.benchmark import OpCategory
from eightbit.runtime.profile import OVERHEAD
from eightbit.runtime.speedcheck import model_feeds
from eightbit.runtime.sweep import SweepPoint, sweep

__all__ = ["SPLIT_KEYS", "cpu_description", "format_points", "plot_speedup", "plot_split", "run_sweep", "write_report"]

# The split's parts in stacking order (bottom to top); OpCategory.OTHER is kept for completeness.
SPLIT_KEYS = (
    OpCategory.INT8_COMPUTE.value,
    OpCategory.FLOAT_COMPUTE.value,
    OpCategory.QUANTIZE.value,
    OpCategory.DEQUANTIZE.value,
    OpCategory.LAYOUT.value,
    OpCategory.OTHER.value,
    OVERHEAD,
)
_COLORS = ("#2b6cb0", "#9c9c9c", "#dd6b20", "#d69e2e", "#805ad5", "#cbd5e0", "#e53e3e")
# Flags that decide int8 kernel speed on x86 (VNNI: u8 x s8 dot products straight to int32; AMX: tile matmuls).
_INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_description() -> str:
    """CPU model name and the int8-relevant feature flags of this host."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = hw.cpu_flags()
    present = [f for f in _INT8_FLAGS if f in flags] or ["(none of " + ", ".join(_INT8_FLAGS) + ")"]
    return f"{name}; int8-relevant flags: {', '.join(present)}; VNNI: {'yes' if hw.has_vnni() else 'no'}"


def shares(point_split: dict[str, float]) -> dict[str, float]:
    """Split (ms) -> fraction of the total per key, in SPLIT_KEYS order."""
    total = sum(point_split.values()) or 1.0
    return {k: point_split.get(k, 0.0) / total for k in SPLIT_KEYS}


def plot_speedup(points: Sequence[SweepPoint], path: Path, model_name: str) -> Path:
    """Speedup (fp32 time / int8 time) vs batch size, one line per runtime, log2 batch axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for backend in dict.fromkeys(p.backend for p in points):
        mine = sorted((p for p in points if p.backend is backend), key=lambda p: p.batch)
        ax.plot([p.batch for p in mine], [p.speedup for p in mine], marker="o", label=backend.value)
        for p in mine:
            ax.annotate(f"{p.speedup:.2f}", (p.batch, p.speedup), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7)  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="int8 = fp32")
    ax.set_xscale("log", base=2)
    batches = sorted({p.batch for p in points})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (samples per call)")
    ax.set_ylabel("speedup (fp32 time / int8 time, x)")
    runtimes = ", ".join(dict.fromkeys(p.backend.value for p in points))
    ax.set_title(f"{model_name}: int8 speedup over fp32 vs batch size\n({runtimes}, CPU)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def plot_split(points: Sequence[SweepPoint], path: Path, model_name: str, backend: Backend) -> Path:
    """Stacked shares of the int8 model's call time per batch size on one runtime, with the fp32 split beside each
    bar (hatched) for comparison."""
    plt = pyplot()
    mine = sorted((p for p in points if p.backend is backend), key=lambda p: p.batch)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(mine) + 2), 4.4))
    width = 0.38
    for offset, label, hatch in ((-width / 2, "int8", None), (width / 2, "fp32", "//")):
        bottoms = [0.0] * len(mine)
        for key, color in zip(SPLIT_KEYS, _COLORS, strict=True):
            values = [shares(getattr(p, f"{label}_profile").split())[key] * 100 for p in mine]
            xs = [i + offset for i in range(len(mine))]
            ax.bar(xs, values, width, bottom=bottoms, color=color, hatch=hatch, edgecolor="white",
                   label=key if label == "int8" else None)  # fmt: skip
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_xticks(range(len(mine)), [f"{p.batch}\nint8 | fp32" for p in mine], fontsize=8)
    ax.set_xlabel("batch size (left bar int8, right hatched bar fp32)")
    ax.set_ylabel("share of the call's wall time (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{model_name}: where the time goes per batch size\n({backend.value}, CPU, share of wall time)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_png(fig, path)


def _table(points: Sequence[SweepPoint]) -> list[str]:
    lines = [
        "| runtime | batch | fp32 ms/call | int8 ms/call | fp32 samples/s | int8 samples/s | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.backend.value} | {p.batch} | {p.fp32.median_ms:.2f} | {p.int8.median_ms:.2f} | "
            f"{p.fp32.samples_per_s:.1f} | {p.int8.samples_per_s:.1f} | {p.speedup:.2f}x |"
        )
    return lines


def _split_table(points: Sequence[SweepPoint]) -> list[str]:
    header = "| runtime | batch | model | wall ms | " + " | ".join(SPLIT_KEYS) + " |"
    lines = [header, "|---|---:|---|---:|" + "---:|" * len(SPLIT_KEYS)]
    for p in points:
        for label in ("int8", "fp32"):
            profile = getattr(p, f"{label}_profile")
            share = shares(profile.split())
            cells = " | ".join(f"{share[k] * 100:.1f}%" for k in SPLIT_KEYS)
            lines.append(f"| {p.backend.value} | {p.batch} | {label} | {profile.wall_ms:.2f} | {cells} |")
    return lines


def write_report(
    points: Sequence[SweepPoint], out_dir: str | Path, model_name: str, *, threads: int, note: str = ""
) -> Path:
    """Write the PNGs and `<out_dir>/sweep.md` (atomically; the PNGs are checked before they are linked).
    Returns the Markdown file's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9-]+", "_", model_name).strip("_") or "model"
    images = [plot_speedup(points, out_dir / f"{stem}_speedup.png", model_name)]
    for backend in dict.fromkeys(p.backend for p in points):
        images.append(plot_split(points, out_dir / f"{stem}_split_{backend.name.lower()}.png", model_name, backend))
    for image in images:
        check_png(image)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# {model_name}: int8 vs fp32 batch sweep",
        "",
        f"Measured {when}, {threads} threads. CPU: {cpu_description()}.",
        *([note] if note else []),
        "",
        "Call times are medians of side-by-side runs (fp32 and int8 interleaved). The time split comes from the",
        "runtime's profiler (ONNX Runtime's kernel events, OpenVINO's per-layer counters) on separate runs; per-call",
        "overhead is the run's wall time minus its kernel times.",
        "",
        *_table(points),
        "",
        f"![speedup vs batch size]({images[0].name})",
        "",
        "## Where the time goes (share of the call's wall time)",
        "",
        *_split_table(points),
        "",
        *(f"![time split]({image.name})\n" for image in images[1:]),
    ]
    lines += ["", f"Raw numbers (ms per call, every kernel): [{stem}_sweep.json]({stem}_sweep.json)."]
    with atomic_path(out_dir / f"{stem}_sweep.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps({"model": model_name, "cpu": cpu_description(), "threads": threads,
                                   "points": [point_dict(p) for p in points]}, separators=(",", ":")))  # fmt: skip
    path = out_dir / f"{stem}_sweep.md"
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def point_dict(point: SweepPoint) -> dict:
    """A sweep point as JSON-ready data: timings, splits and every kernel of both models."""

    def profile(p) -> dict:
        kernels = [{"name": k.name, "op_type": k.op_type, "category": k.category.value, "sources": list(k.sources),
                    "ms": k.ms} for k in p.kernels]  # fmt: skip
        return {"wall_ms": p.wall_ms, "runs": p.runs, "split_ms": p.split(), "kernels": kernels}

    return {
        "backend": point.backend.value,
        "batch": point.batch,
        "speedup": point.speedup,
        "fp32": asdict(point.fp32),
        "int8": asdict(point.int8),
        "fp32_profile": profile(point.fp32_profile),
        "int8_profile": profile(point.int8_profile),
    }


def run_sweep(
    int8_path: str | Path,
    batches: Sequence[int],
    backends: Sequence[Backend],
    out_dir: str | Path,
    *,
    fp32_path: str | Path | None = None,
    model_name: str | None = None,
    threads: int = 2,
    note: str = "",
    feeds_for=None,
    progress=None,
) -> tuple[Path, list[SweepPoint]]:
    """Sweep an int8 QDQ ONNX file against its fp32 twin (Q/DQ stripped, or `fp32_path`) and write the report.
    feeds_for: batch -> inputs; default random inputs of the file's input shapes (which must be static apart from
    the batch axis; give feeds_for for e.g. a dynamic sequence length)."""
    int8_path = Path(int8_path)
    model = onnx.load(int8_path)
    with tempfile.TemporaryDirectory() as tmp:
        if fp32_path is None:
            fp32_path = Path(tmp) / "fp32.onnx"
            onnx.save(strip_qdq(model), fp32_path)
        points = sweep(
            int8_path,
            fp32_path,
            backends,
            batches,
            feeds_for or (lambda b: model_feeds(model, b)),
            threads=threads,
            progress=progress,
        )
    report = write_report(points, out_dir, model_name or int8_path.stem, threads=threads, note=note)
    return report, points


def format_points(points: Sequence[SweepPoint]) -> str:
    """The sweep table for the terminal."""
    rows = [f"{'runtime':<12} {'batch':>5} {'fp32 ms':>9} {'int8 ms':>9} {'int8 samples/s':>15} {'speedup':>8}"]
    for p in points:
        rows.append(
            f"{p.backend.value:<12} {p.batch:>5} {p.fp32.median_ms:9.2f} {p.int8.median_ms:9.2f} "
            f"{p.int8.samples_per_s:15.1f} {p.speedup:7.2f}x"
        )
    return "\n".join(rows)
