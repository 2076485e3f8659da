"""Calibration cost: eightbit vs ONNX Runtime quantize_static, wall time and peak memory (issue: calibration zoo).

ResNet-50 (random weights, BatchNorm settled), calibration inputs of batch 1 generated lazily from a seed, so
the data itself costs no memory.  Every cell runs in a fresh worker process.  The timer covers one call, from
the model in hand to the int8 ONNX file on disk: `eightbit.quantize` + `export_onnx` for eightbit,
`quantize_static` for ORT.  Outside the timer, for both: importing the libraries, and building the input each
tool starts from (the PyTorch model; the fp32 ONNX file, exported beforehand).  Peak RSS is the worker's
maximum resident set.  ORT workers run under an address-space cap so a blow-up is reported as out of memory
instead of taking the machine down.

    .venv/bin/python bench/calib_cost.py [--samples 32 512] [--methods kl percentile] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ORT_METHODS = {"kl": "Entropy", "percentile": "Percentile", "minmax": "MinMax"}
MEMORY_CAP_GB = 20


def _inputs(n: int):
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield rng.standard_normal((1, 3, 224, 224), dtype=np.float32)


def _model():
    import torch

    from bench.models import resnet50

    torch.set_num_threads(2)
    return resnet50()


def worker_eightbit(method: str, n: int, out: Path) -> tuple[float, str]:
    """Seconds from the model in hand to the written int8 ONNX file, and the exporter that wrote it."""
    import torch

    import eightbit

    model = _model()
    config = eightbit.QuantConfig(activations=eightbit.uint8_activations(method=method))
    data = (torch.from_numpy(x) for x in _inputs(n))
    start = time.perf_counter()
    qm = eightbit.quantize(model, data, config=config, progress=False)
    report = qm.export_onnx(out, check=False, overwrite=True)
    return time.perf_counter() - start, report.exporter


def worker_ort(method: str, n: int, out: Path, fp32: Path) -> tuple[float, str]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = ({"input": x} for x in _inputs(n))

        def get_next(self):
            return next(self.it, None)

    start = time.perf_counter()
    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]),
    )
    return time.perf_counter() - start, "quantize_static"


def run_worker(args) -> None:
    out = Path(args.workdir) / f"{args.tool}-{args.method}-{args.n}.onnx"
    status, seconds, path = "ok", float("nan"), ""
    try:
        if args.tool == "eightbit":
            seconds, path = worker_eightbit(args.method, args.n, out)
        else:
            cap = MEMORY_CAP_GB * 2**30
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            seconds, path = worker_ort(args.method, args.n, out, Path(args.workdir) / "fp32.onnx")
    except MemoryError:
        status = f"out of memory (> {MEMORY_CAP_GB} GB address space)"
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb, "status": status, "path": path}))


def _failure(stderr: str) -> str:
    if "Failed to allocate memory" in stderr or "MemoryError" in stderr:
        return f"out of memory (> {MEMORY_CAP_GB} GB address space)"
    return f"crashed: {stderr[-300:]}"


def export_fp32(path: Path) -> None:
    import torch

    from eightbit.export.onnx import export_float

    export_float(_model(), (torch.randn(1, 3, 224, 224),), path)


def _run_cell(tool: str, method: str, n: int, work: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--tool", tool, "--method", method, "--n", str(n)]
    done = subprocess.run([*cmd, "--workdir", work], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"seconds": float("nan"), "peak_gb": float("nan"), "status": _failure(done.stderr), "path": ""}


def _summary(rows: list[dict], tool: str, method: str, n: int) -> dict:
    cell = [r for r in rows if r["tool"] == tool and r["method"] == method and r["samples"] == n]
    ok = [r for r in cell if r["status"] == "ok"]
    if not ok:
        return {"seconds": float("nan"), "peak_gb": float("nan"), "status": cell[0]["status"]}
    return {
        "seconds": float(np.median([r["seconds"] for r in ok])),
        "peak_gb": max(r["peak_gb"] for r in ok),
        "status": "ok",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--methods", nargs="+", default=["kl", "percentile"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the table shows the median")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool")
    parser.add_argument("--method")
    parser.add_argument("--n", type=int)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="eightbit-calib-") as work:
        export_fp32(Path(work) / "fp32.onnx")
        for tool in ("eightbit", "ort"):  # untimed: the first process of each tool reads its files from disk
            _run_cell(tool, args.methods[0], min(args.samples), work)
        for method in args.methods:
            for n in args.samples:
                for _repeat in range(args.repeats):  # tools alternate, so slow drifts hit both alike
                    for tool in ("eightbit", "ort"):
                        rows.append({"tool": tool, "method": method, "samples": n, **_run_cell(tool, method, n, work)})
                        print(rows[-1], flush=True)
    print(f"\nmedian of {args.repeats} run(s) per cell; peak RSS is the largest of them\n")
    print("| method | samples | eightbit s | ORT s | time ratio | eightbit GB | ORT GB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        for n in args.samples:
            eb = _summary(rows, "eightbit", method, n)
            ort = _summary(rows, "ort", method, n)
            note = "" if ort["status"] == "ok" else f" ({ort['status']})"
            print(
                f"| {method} | {n} | {eb['seconds']:.1f} | {ort['seconds']:.1f}{note} | "
                f"{eb['seconds'] / ort['seconds']:.2f} | {eb['peak_gb']:.2f} | {ort['peak_gb']:.2f} | "
                f"{eb['peak_gb'] / ort['peak_gb']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
