"""Calibration cost: eightbit vs ONNX Runtime quantize_static, wall time and peak memory (issue: calibration zoo).

ResNet-50 (random weights, BatchNorm settled), calibration inputs of batch 1 generated lazily from a seed, so
the data itself costs no memory.  Every cell runs in a fresh worker process: wall time covers quantizing and
writing the int8 ONNX file (the fp32 ONNX that ORT starts from is exported beforehand, untimed), peak RSS is
the worker's maximum resident set.  ORT workers run under an address-space cap so a blow-up is reported as
out of memory instead of taking the machine down.

    .venv/bin/python bench/calib_cost.py [--samples 32 512] [--methods kl percentile]
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


def worker_eightbit(method: str, n: int, out: Path) -> None:
    import torch

    import eightbit

    model = _model()
    config = eightbit.QuantConfig(activations=eightbit.uint8_activations(method=method))
    data = (torch.from_numpy(x) for x in _inputs(n))
    qm = eightbit.quantize(model, data, config=config, progress=False)
    qm.export_onnx(out, check=False)


def worker_ort(method: str, n: int, out: Path, fp32: Path) -> None:
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


def run_worker(args) -> None:
    out = Path(args.workdir) / f"{args.tool}-{args.method}-{args.n}.onnx"
    start = time.perf_counter()
    status = "ok"
    try:
        if args.tool == "eightbit":
            worker_eightbit(args.method, args.n, out)
        else:
            cap = MEMORY_CAP_GB * 2**30
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            worker_ort(args.method, args.n, out, Path(args.workdir) / "fp32.onnx")
    except MemoryError:
        status = f"out of memory (> {MEMORY_CAP_GB} GB address space)"
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb, "status": status}))


def _failure(stderr: str) -> str:
    if "Failed to allocate memory" in stderr or "MemoryError" in stderr:
        return f"out of memory (> {MEMORY_CAP_GB} GB address space)"
    return f"crashed: {stderr[-300:]}"


def export_fp32(path: Path) -> None:
    import torch

    from eightbit.export.onnx import export_float

    export_float(_model(), (torch.randn(1, 3, 224, 224),), path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--methods", nargs="+", default=["kl", "percentile"])
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
        for method in args.methods:
            for n in args.samples:
                for tool in ("eightbit", "ort"):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--worker",
                        "--tool",
                        tool,
                        "--method",
                        method,
                        "--n",
                        str(n),
                        "--workdir",
                        work,
                    ]
                    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                    result = (
                        json.loads(lines[-1])
                        if lines
                        else {
                            "seconds": float("nan"),
                            "peak_gb": float("nan"),
                            "status": _failure(done.stderr),
                        }
                    )
                    rows.append({"tool": tool, "method": method, "samples": n, **result})
                    print(rows[-1], flush=True)
    print("\n| method | samples | eightbit s | ORT s | time ratio | eightbit GB | ORT GB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        for n in args.samples:
            eb = next(r for r in rows if r["tool"] == "eightbit" and r["method"] == method and r["samples"] == n)
            ort = next(r for r in rows if r["tool"] == "ort" and r["method"] == method and r["samples"] == n)
            note = "" if ort["status"] == "ok" else f" ({ort['status']})"
            print(
                f"| {method} | {n} | {eb['seconds']:.1f} | {ort['seconds']:.1f}{note} | "
                f"{eb['seconds'] / ort['seconds']:.2f} | {eb['peak_gb']:.2f} | {ort['peak_gb']:.2f} | "
                f"{eb['peak_gb'] / ort['peak_gb']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
