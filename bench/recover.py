"""Accuracy recovery without training (issue 12): cross-layer equalization (+ high-bias absorption + bias
correction) for per-tensor int8 weights, AdaRound for 4-bit weights, on EfficientNet-Lite0.

Same protocol as bench/compare_methods.py: ImageNet weights, calibrated on 256 augmented crops of the 20 photos
(seed 1), judged on 200 other crops (seed 7) against fp32: top-1 agreement, mean softmax KL, mean logit cosine.
Each row is its own `eightbit.quantize` call (equalization rewrites the graph before calibration, so rows cannot
share one pass); its times are split into calibration (capture, equalization with its maxima pass, the
statistics pass) and convert (ranges, AdaRound, conversion).  Every row is exported to ONNX and checked against
ONNX Runtime (parity in output steps, and top-1 agreement of the ORT outputs with fp32).

    .venv/bin/python bench/recover.py --part cle        # per-tensor int8 weights: baseline vs CLE
    .venv/bin/python bench/recover.py --part adaround   # 4-bit per-channel weights: round-to-nearest vs AdaRound
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eightbit import Equalize, Granularity, QuantConfig, Relu6Handling, calibrate, int8_weights  # noqa: E402
from eightbit.analysis.compare import output_metrics  # noqa: E402
from eightbit.runtime import hw  # noqa: E402


def _adaround(**settings):
    from eightbit import AdaRound

    return AdaRound(**settings)


def _variants(part: str, iterations: int | None, samples: int | None) -> list[tuple[str, QuantConfig]]:
    if part == "cle":
        per_tensor = int8_weights(granularity=Granularity.PER_TENSOR)
        mse = int8_weights(granularity=Granularity.PER_TENSOR, method="mse")
        bounded = Equalize()
        return [
            ("per-tensor minmax, no CLE (baseline)", QuantConfig(weights=per_tensor)),
            ("per-tensor mse, no CLE", QuantConfig(weights=mse)),
            ("per-tensor minmax + CLE (ReLU6 bounded)", QuantConfig(weights=per_tensor, equalize=bounded)),
            ("per-tensor mse + CLE (ReLU6 bounded)", QuantConfig(weights=mse, equalize=bounded)),
            (
                "per-tensor minmax + CLE (ReLU6 -> ReLU, AIMET)",
                QuantConfig(weights=per_tensor, equalize=Equalize(relu6=Relu6Handling.TO_RELU)),
            ),
            ("per-tensor minmax + AdaRound, no CLE", QuantConfig(weights=per_tensor, adaround=_adaround())),
            (
                "per-tensor minmax + CLE (ReLU6 bounded) + AdaRound",
                QuantConfig(weights=per_tensor, equalize=bounded, adaround=_adaround()),
            ),
        ]
    from eightbit import AdaRound

    four = int8_weights(bits=4)
    settings = {k: v for k, v in (("iterations", iterations), ("samples", samples)) if v is not None}
    return [
        ("4-bit per-channel, round-to-nearest", QuantConfig(weights=four)),
        ("4-bit per-channel mse, round-to-nearest", QuantConfig(weights=int8_weights(bits=4, method="mse"))),
        ("4-bit per-channel, AdaRound", QuantConfig(weights=four, adaround=AdaRound(**settings))),
    ]


def _ort_top1(path: Path, inputs: torch.Tensor, reference: torch.Tensor) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = np.concatenate([session.run(None, {name: b.numpy()})[0] for b in inputs.split(25)])
    return float((torch.from_numpy(out).argmax(1) == reference.argmax(1)).double().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("cle", "adaround"), default="cle")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--only", type=int, nargs="*", help="row numbers to run (0-based)")
    parser.add_argument("--iterations", type=int, help="AdaRound iterations per layer (default: AdaRound's)")
    parser.add_argument("--samples", type=int, help="AdaRound calibration crops (default: AdaRound's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2: the 2-core machine's figures)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from eightbit.demos import zoo

    model, calibration, evaluation = zoo.efficientnet_protocol(args.calib, args.eval)
    with torch.no_grad():
        reference = model(evaluation)
    print(f"CPU: {hw.cpu_flags() and ('VNNI' if hw.has_vnni() else 'no VNNI (AVX2 path, 7-bit GEMM weight codes)')}")
    print(f"EfficientNet-Lite0, {args.calib} calibration crops, {args.eval} eval crops\n")
    print("| config | top-1 agreement | softmax KL | cosine | calibrate s | convert s | ORT top-1 | ORT parity steps |")
    print("|---|---|---|---|---|---|---|---|")
    variants = _variants(args.part, args.iterations, args.samples)
    for i, (title, config) in enumerate(variants):
        if args.only and i not in args.only:
            continue
        start = time.perf_counter()
        cal = calibrate(model, calibration, config=config, progress=False)
        calibrated = time.perf_counter() - start
        start, cpu_start = time.perf_counter(), time.process_time()
        qm = cal._quantize_once()
        converted, converted_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        with torch.no_grad():
            agreement, kl, cosine = output_metrics(reference, qm(evaluation))
        with tempfile.TemporaryDirectory() as tmp:
            report = qm.export_onnx(Path(tmp) / "model.onnx")
            ort_top1 = _ort_top1(report.path, evaluation, reference)
        steps = report.parity.max_steps if report.parity else float("nan")
        print(
            f"| {title} | {agreement:.3f} | {kl:.4f} | {cosine:.4f} | {calibrated:.1f} | {converted:.1f} | "
            f"{ort_top1:.3f} | {steps:.2f} |",
            flush=True,
        )
        # CPU seconds of the convert step over both threads: on a quiet 2-core machine the wall time is about
        # this divided by 2 (the load of other jobs inflates the wall time, not the CPU time).
        print(f"  convert CPU s: {converted_cpu:.1f} (load average {os.getloadavg()[0]:.1f})", flush=True)
        for note in qm.notes:
            print(f"  note: {note}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
