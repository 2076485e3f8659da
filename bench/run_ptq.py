"""Post-training int8 benchmark: eightbit vs ORT quantize_static and NNCF on CNNs, 2 threads.

For each model (random weights, 224x224): export fp32 ONNX (dynamic batch), quantize it with eightbit, ORT
QDQ U8S8, ORT QDQ default (S8S8) and NNCF, then time every variant on ONNX Runtime (ONNX files) and OpenVINO
(all, f32 precision hint): batch-1 median latency and batch-32 throughput. Output agreement with the fp32
model (ORT) is measured on held-out random inputs to catch broken quantization (e.g. u8s8 saturation).

    python -m bench.run_ptq [--models resnet18 ...] [--variants ...] [--calib 32] [--quick] [--out DIR]

Writes results.md (tables) and results.json (raw numbers) to --out. Numbers from one process: treat
differences under ~20% as noise (see the shared baseline notes).
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `eightbit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import BenchModel, build  # noqa: E402
from bench.peers import Peer, quantize_peer  # noqa: E402
from eightbit.export.onnx import export_float  # noqa: E402
from eightbit.runtime.backends import Backend, RuntimeOptions, load  # noqa: E402
from eightbit.runtime.benchmark import time_interleaved  # noqa: E402

THREADS = 2
BATCH_THROUGHPUT = 32
EFFICIENTNET = "efficientnet_lite0"


class Variant(enum.Enum):
    """One model file per variant; the reference is FP32 on ONNX Runtime."""

    FP32 = "fp32"
    EIGHTBIT = "eightbit"
    ORT_U8S8 = Peer.ORT_U8S8.value
    ORT_DEFAULT = Peer.ORT_DEFAULT.value
    NNCF = Peer.NNCF.value


_PEER_OF = {Variant.ORT_U8S8: Peer.ORT_U8S8, Variant.ORT_DEFAULT: Peer.ORT_DEFAULT, Variant.NNCF: Peer.NNCF}


@dataclass(frozen=True, kw_only=True)
class Iters:
    """Warm-up / timed call counts for the two measurements."""

    b1: tuple[int, int]
    bulk: tuple[int, int]
    rounds: int  # the timed calls are split into this many rounds, interleaved across variants


FULL = Iters(b1=(10, 40), bulk=(2, 8), rounds=2)
QUICK = Iters(b1=(3, 10), bulk=(1, 2), rounds=2)


@dataclass(frozen=True, kw_only=True)
class Record:
    """Measurements of one (model, variant, backend)."""

    model: str
    variant: str
    backend: str
    b1_ms: float
    b1_p10_ms: float
    b1_p90_ms: float
    bulk_samples_per_s: float
    rel_err: float  # ||y - y_fp32|| / ||y_fp32|| on held-out inputs, fp32 ORT as reference
    top1_agree: float
    quantize_s: float | None
    cpu_busy_before: float | None  # machine-wide CPU use just before this model's timings (0..1)


def make_eightbit(model: torch.nn.Module, calib: list[np.ndarray], example: torch.Tensor, path: Path) -> bool:
    """Quantize with eightbit's public API and export to `path`; False (with a message) if unavailable."""
    import eightbit

    quantize = getattr(eightbit, "quantize", None)
    if quantize is None:
        print("  eightbit API not available (eightbit.quantize missing): skipping the eightbit row")
        return False
    try:
        qmodel = quantize(model, [torch.from_numpy(x) for x in calib], (example,))
        qmodel.export_onnx(path)
    except Exception:  # a broken eightbit row must not cost the peers' numbers
        print("  eightbit quantization failed, skipping its row:")
        traceback.print_exc()
        return False
    return True


def _load_model(name: str) -> torch.nn.Module | None:
    if name != EFFICIENTNET:
        return build(BenchModel(name))
    try:
        from eightbit.demos.zoo import efficientnet_lite0
    except ImportError as e:
        print(f"skipping {EFFICIENTNET}: eightbit.demos.zoo.efficientnet_lite0 unavailable ({e})")
        return None
    try:
        return efficientnet_lite0().eval()
    except Exception as e:  # e.g. the weights package is not installed
        print(f"skipping {EFFICIENTNET}: could not build it ({type(e).__name__}: {e})")
        return None


def _agreement(y: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    rel = float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-12))
    return rel, float(np.mean(y.argmax(-1) == ref.argmax(-1)))


def run_model(name: str, calib_n: int, iters: Iters, work: Path, variants: list[Variant]) -> list[Record]:
    """Build, export, quantize and time one model; returns one record per (variant, backend)."""
    model = _load_model(name)
    if model is None:
        return []
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((1, 3, 224, 224), dtype=np.float32) for _ in range(calib_n)]
    held_out = rng.standard_normal((8, 3, 224, 224), dtype=np.float32)
    bulk = rng.standard_normal((BATCH_THROUGHPUT, 3, 224, 224), dtype=np.float32)
    example = torch.from_numpy(calib[0])

    t0 = time.perf_counter()
    paths: dict[Variant, Path] = {Variant.FP32: work / f"{name}.fp32.onnx"}
    export_float(model, (example,), paths[Variant.FP32])
    print(f"  exported fp32 in {time.perf_counter() - t0:.1f}s")
    qtime: dict[Variant, float] = {}
    t0 = time.perf_counter()
    if Variant.EIGHTBIT in variants and make_eightbit(model, calib, example, work / f"{name}.eightbit.onnx"):
        paths[Variant.EIGHTBIT] = work / f"{name}.eightbit.onnx"
        qtime[Variant.EIGHTBIT] = time.perf_counter() - t0
    for variant, peer in _PEER_OF.items():
        if variant not in variants:
            continue
        try:
            res = quantize_peer(peer, paths[Variant.FP32], calib, work / f"{name}.{variant.value}.onnx")
        except Exception:  # report and keep going with the other peers
            print(f"  {variant.value} failed:")
            traceback.print_exc()
            continue
        paths[variant], qtime[variant] = res.path, res.seconds
        print(f"  {variant.value}: quantized in {res.seconds:.1f}s")

    options = RuntimeOptions(threads=THREADS)
    runners = {
        (variant, backend): load(path, backend, options)
        for variant, path in paths.items()
        for backend in Backend
        if not (backend is Backend.ORT and path.suffix == ".xml")
    }
    reference = runners[(Variant.FP32, Backend.ORT)].run({"input": held_out})[0]
    agreement = {k: _agreement(r.run({r.input_names[0]: held_out})[0], reference) for k, r in runners.items()}
    busy = cpu_busy_fraction()
    if busy is not None and busy > 0.1:
        print(f"  WARNING: {busy:.0%} of the CPUs were busy before timing; numbers below are distorted")
    # Two rounds in A B C / C B A order, each block fully warmed up: cancels drift of the machine's speed;
    # full warm-ups absorb the previous variant's spinning ORT threads (see RuntimeOptions.ort_spinning).
    b1 = time_interleaved(
        runners,
        lambda r: {r.input_names[0]: calib[0]},
        warmup=iters.b1[0],
        iters=iters.b1[1],
        rounds=iters.rounds,
    )
    bulk_t = time_interleaved(
        runners,
        lambda r: {r.input_names[0]: bulk},
        warmup=iters.bulk[0],
        iters=iters.bulk[1],
        rounds=iters.rounds,
    )
    records = []
    for (variant, backend), t1 in b1.items():
        tb, (rel, top1) = bulk_t[(variant, backend)], agreement[(variant, backend)]
        rec = Record(
            model=name, variant=variant.value, backend=backend.value,
            b1_ms=t1.median_ms, b1_p10_ms=t1.p10_ms, b1_p90_ms=t1.p90_ms,
            bulk_samples_per_s=tb.samples_per_s, rel_err=rel, top1_agree=top1,
            quantize_s=qtime.get(variant), cpu_busy_before=busy,
        )  # fmt: skip
        records.append(rec)
        print(
            f"  {variant.value:>14} {backend.value:<11} b1 {t1.median_ms:7.2f} ms"
            f"  b{BATCH_THROUGHPUT} {tb.samples_per_s:7.1f} /s  rel.err {rel:.3f}  top1 {top1:.2f}"
        )
    return records


def _speedups(r: Record, ref: Record | None) -> tuple[str, str]:
    if ref is None:
        return "-", "-"
    return f"{ref.b1_ms / r.b1_ms:.2f}", f"{r.bulk_samples_per_s / ref.bulk_samples_per_s:.2f}"


def markdown(records: list[Record]) -> str:
    """Per-model detail tables (absolute + speedup vs ORT fp32) and a summary matrix like the notes'."""
    b = BATCH_THROUGHPUT
    models = list(dict.fromkeys(r.model for r in records))
    refs = {r.model: r for r in records if r.variant == Variant.FP32.value and r.backend == Backend.ORT.value}
    out = []
    for m in models:
        out += [
            f"### {m}",
            "",
            f"| variant | backend | b1 ms (p10-p90) | b1 speedup | b{b} /s | b{b} speedup | rel. err vs fp32 "
            "| top-1 agree | quantize s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in records if r.model == m):
            s1, sb = _speedups(r, refs.get(m))
            qs = "-" if r.quantize_s is None else f"{r.quantize_s:.1f}"
            out.append(
                f"| {r.variant} | {r.backend} | {r.b1_ms:.2f} ({r.b1_p10_ms:.2f}-{r.b1_p90_ms:.2f}) | {s1} | "
                f"{r.bulk_samples_per_s:.1f} | {sb} | {r.rel_err:.3f} | {r.top1_agree:.2f} | {qs} |"
            )
        out.append("")

    absolute = [f"{refs[m].b1_ms:.1f} ms / {refs[m].bulk_samples_per_s:.0f} /s" if m in refs else "-" for m in models]
    out += [
        f"### Summary: speedup over ONNX Runtime fp32 (batch-1 latency / batch-{b} throughput)",
        "",
        "| path | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
        "| ORT fp32 (absolute) | " + " | ".join(absolute) + " |",
    ]
    cells = {(r.variant, r.backend, r.model): r for r in records}
    for variant, backend in dict.fromkeys((r.variant, r.backend) for r in records):
        if (variant, backend) == (Variant.FP32.value, Backend.ORT.value):
            continue
        row = []
        for m in models:
            r = cells.get((variant, backend, m))
            row.append(" / ".join(_speedups(r, refs.get(m))) if r else "-")
        out.append(f"| {variant} on {backend} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all CPUs used by *other* processes over `seconds` (Linux /proc/stat; else None).

    Other processes (or other sessions sharing the machine) competing for the 2 cores distort timings,
    ORT's spinning intra-op threads most of all, so the figure is recorded next to the results. This
    process's own CPU time (e.g. thread pools still spinning) is subtracted.
    """

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total (in clock ticks)

    try:
        idle0, total0 = sample()
        own0, wall0 = time.process_time(), time.perf_counter()
        time.sleep(seconds)
        idle1, total1 = sample()
        own1, wall1 = time.process_time(), time.perf_counter()
    except (OSError, ValueError, IndexError):
        return None
    ncpu = os.cpu_count() or 1
    busy = 1.0 - (idle1 - idle0) / max(total1 - total0, 1)
    own = (own1 - own0) / ((wall1 - wall0) * ncpu)
    return max(0.0, busy - own)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    valid = [m.value for m in BenchModel] + [EFFICIENTNET]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[m.value for m in BenchModel], choices=valid)
    parser.add_argument("--calib", type=int, default=32, help="number of random calibration inputs")
    parser.add_argument("--quick", action="store_true", help="few timing iterations (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    quantized = [v.value for v in Variant if v is not Variant.FP32]
    parser.add_argument(
        "--variants", nargs="+", default=quantized, choices=quantized, help="int8 variants (fp32 always runs)"
    )
    args = parser.parse_args(argv)
    variants = [Variant(v) for v in args.variants]

    torch.set_num_threads(THREADS)
    args.out.mkdir(parents=True, exist_ok=True)
    iters = QUICK if args.quick else FULL
    records: list[Record] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eightbit-bench-") as tmp:
        for name in args.models:
            print(f"== {name}")
            t0 = time.perf_counter()
            records += run_model(name, args.calib, iters, Path(tmp), variants)
            print(f"  {name} done in {time.perf_counter() - t0:.0f}s")
    text = markdown(records)
    busy = {r.model: r.cpu_busy_before for r in records}
    busy_text = ", ".join(f"{m} {b:.0%}" if b is not None else f"{m} unknown" for m, b in busy.items()) or "-"
    print("\n" + text)
    header = (
        f"# int8 PTQ benchmark\n\n{THREADS} threads, calibration {args.calib} random inputs, "
        f"{'quick' if args.quick else 'full'} timing (b1 {iters.b1[1]} calls, b{BATCH_THROUGHPUT} "
        f"{iters.bulk[1]} calls after warm-up, interleaved across variants in {iters.rounds} rounds); "
        f"CPU: {_cpu_name()}; other load on the CPUs before timing: {busy_text}.\n\n"
    )
    (args.out / "results.md").write_text(header + text)
    meta = {
        "threads": THREADS, "calib": args.calib, "quick": args.quick, "iters": asdict(iters),
        "batch_throughput": BATCH_THROUGHPUT, "total_s": time.perf_counter() - t_start, "cpu": _cpu_name(),
        "variants": [v.value for v in variants],
    }  # fmt: skip
    payload = {"meta": meta, "records": [asdict(r) for r in records]}
    (args.out / "results.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
