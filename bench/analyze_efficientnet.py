"""Which layers lose accuracy in int8 EfficientNet-Lite0, and what keeping them float buys (issue 13).

Same protocol as bench/compare_methods.py and bench/recover.py: ImageNet weights, calibrated on 256 augmented
crops of the 20 photos (seed 1), judged on 200 other crops (seed 7) against fp32 (top-1 agreement, mean softmax
KL, mean logit cosine).  The per-layer analysis runs on the first `--analysis-batches` batches of 8 calibration
crops.

    .venv/bin/python bench/analyze_efficientnet.py --part analysis   # per-channel: top-5 ops, keep 1/2/4 float
    .venv/bin/python bench/analyze_efficientnet.py --part fallback   # per-tensor + fallback to per-channel - 1%

The analysis figures go to bench/results/analyze_efficientnet/ (committed); the fallback's best model and log to
a temporary folder (printed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eightbit import Granularity, QuantConfig, int8_weights, quantize  # noqa: E402
from eightbit.analysis.compare import output_metrics  # noqa: E402
from eightbit.analysis.reference import Reference  # noqa: E402
from eightbit.runtime import hw  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _row(title: str, reference: torch.Tensor, model, evaluation: torch.Tensor) -> tuple[float, float, float]:
    with torch.no_grad():
        got = torch.cat([model(b) for b in evaluation.split(50)])
    agreement, kl, cosine = output_metrics(reference, got)
    print(f"| {title} | {agreement:.3f} | {kl:.4f} | {cosine:.4f} |", flush=True)
    return agreement, kl, cosine


def analysis_part(model, calibration, evaluation, reference, batches: int) -> float:
    start = time.perf_counter()
    qm = quantize(model, calibration, progress=False)
    print(f"quantized (per-channel, minmax) in {time.perf_counter() - start:.1f} s")
    small = list(torch.cat(calibration).split(8))
    start = time.perf_counter()
    result = qm.analyze(small, model, batches=batches, progress=False, name="EfficientNet-Lite0")
    print(f"analysis ({batches} x 8 crops, {len(result.ops)} int8 ops): {time.perf_counter() - start:.1f} s")
    print(f"reproduction check: rebuilt graph vs int8 model {result.reproduction_db:.1f} dB")
    folder = result.save(RESULTS / "analyze_efficientnet", overwrite=True)
    print(f"wrote {folder}\n")
    print(result.headline(), "\n")
    rows = {r.name: r for r in result.ops}
    tensors = {t.group: t for t in result.tensors}
    print("| rank | op | kind | alone SQNR dB | alone cos | worst tensor: range chosen / seen | clipped | codes |")
    print("|---|---|---|---|---|---|---|---|")
    for i, name in enumerate(result.ranking[:5], 1):
        r = rows[name]
        t = min((tensors[g] for g in r.groups), key=lambda t: t.sqnr_db, default=None)
        span = "" if t is None else f"{t.tensor}: [{t.chosen[0]:.3g}, {t.chosen[1]:.3g}] / [{t.observed[0]:.3g}, "
        span += "" if t is None else f"{t.observed[1]:.3g}]"
        clipped = "" if t is None or t.clipped is None else f"{100 * t.clipped:.3f}%"
        codes = "" if t is None or t.codes_used is None else f"{t.codes_used}/{t.codes_available}"
        print(
            f"| {i} | {name} | {r.kind} | {r.alone_sqnr_db:.1f} | {r.alone_cosine:.4f} | {span} | {clipped} | {codes} |"
        )
    print("\n| int8 model | top-1 agreement | softmax KL | cosine |\n|---|---|---|---|")
    ref = Reference(qm, model)
    per_channel, _, _ = _row("all int8 (per-channel)", reference, qm, evaluation)
    for k in (1, 2, 4):
        _row(f"{k} most sensitive float", reference, ref.variant(result.ranking[:k]), evaluation)
    return per_channel


def fallback_part(model, calibration, evaluation, reference, batches: int, per_channel: float | None) -> None:
    if per_channel is None:
        per_channel, _, _ = _row(
            "all int8 (per-channel)", reference, quantize(model, calibration, progress=False), evaluation
        )
    config = QuantConfig(weights=int8_weights(granularity=Granularity.PER_TENSOR))
    start = time.perf_counter()
    qm = quantize(model, calibration, config=config, progress=False)
    print(f"quantized (per-tensor weights) in {time.perf_counter() - start:.1f} s")
    _row("all int8 (per-tensor)", reference, qm, evaluation)
    start = time.perf_counter()
    small = list(torch.cat(calibration).split(8))
    ranking = qm.analyze(small, model, batches=batches, progress=False).ranking
    analysis_s = time.perf_counter() - start
    print(f"per-tensor analysis {analysis_s:.1f} s; top-5: {ranking[:5]}")

    def agreement(candidate) -> float:
        with torch.no_grad():
            got = torch.cat([candidate(b) for b in evaluation.split(50)])
        return float((got.argmax(1) == reference.argmax(1)).double().mean())

    target = per_channel - 0.01
    out = Path(tempfile.mkdtemp(prefix="fallback_efficientnet_"))
    start = time.perf_counter()
    result = qm.fallback(agreement, max_drop=1.0 - target, out=out, model=model, ranking=ranking)
    print(
        f"\nfallback to top-1 agreement >= {target:.3f} (per-channel {per_channel:.3f} - 0.01): "
        f"{time.perf_counter() - start:.1f} s, {result.evaluations} metric evaluations, written to {out}"
    )
    print(result.summary())
    if result.model is not None:
        _row(f"per-tensor, {len(result.best.float_ops)} ops float (fallback)", reference, result.model, evaluation)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("analysis", "fallback", "both"), default="both")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--analysis-batches", type=int, default=4, help="batches of 8 calibration crops")
    parser.add_argument(
        "--fallback-batches", type=int, default=None, help="batches of 8 crops for the per-tensor ranking"
    )
    parser.add_argument(
        "--per-channel-agreement", type=float, help="skip the per-channel model: its top-1 agreement (fallback part)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2: the 2-core machine's figures)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from eightbit.demos import zoo

    model, calibration, evaluation = zoo.efficientnet_protocol(args.calib, args.eval)
    with torch.no_grad():
        reference = model(evaluation)
    print(f"CPU: {'VNNI' if hw.has_vnni() else 'no VNNI (AVX2 path, 7-bit GEMM weight codes)'}")
    print(f"EfficientNet-Lite0, {args.calib} calibration crops, {args.eval} eval crops\n")
    per_channel = args.per_channel_agreement
    if args.part in ("analysis", "both"):
        per_channel = analysis_part(model, calibration, evaluation, reference, args.analysis_batches)
    if args.part in ("fallback", "both"):
        batches = args.fallback_batches or args.analysis_batches
        fallback_part(model, calibration, evaluation, reference, batches, per_channel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
