"""`make demo-mcu`: EfficientNet-Lite0 -> fully int8 TFLite, on LiteRT and TensorFlow Lite Micro.

Quantizes with `QuantConfig(target=Target.TFLITE)` on augmented crops of the 20 labelled ImageNet photos (as
`make demo`), writes the int8 .tflite and the float32 .tflite of the same graph, and prints: top-1 on the photos
for fp32 PyTorch, the same calibration's ONNX int8 model on ONNX Runtime, LiteRT int8, TFLM int8 and eightbit's
integer reference (with the number of output codes where it differs from TFLM), file sizes, TFLM's arena, how far
each LiteRT kernel set (XNNPACK, builtin, reference) is from TFLM and where the difference starts, and LiteRT int8
vs fp32 batch-1 latency (XNNPACK, 2 threads, interleaved rounds).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from eightbit import QuantConfig, Target, quantize
from eightbit.analysis import metrics
from eightbit.analysis.runtime_agreement import compare_runtimes
from eightbit.demos import zoo
from eightbit.export.tflite import input_codes
from eightbit.export.tflite_run import LiteRTKernels, run_litert, run_tflm
from eightbit.fileio import atomic_path
from eightbit.integer.executor import IntegerReference
from eightbit.runtime import hw
from eightbit.runtime.backends import Backend, RuntimeOptions, load
from eightbit.runtime.benchmark import time_interleaved
from eightbit.runtime.tflite import LiteRTRunner


def _top1(logits: np.ndarray, labels: np.ndarray) -> int:
    return metrics.topk_hits(logits.astype(np.float32), labels, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out", help="folder for the .tflite and ONNX files")
    parser.add_argument("--calib", type=int, default=256, help="number of augmented calibration crops")
    parser.add_argument("--iters", type=int, default=40, help="timed batch-1 calls per model")
    parser.add_argument(
        "--kernel-samples", type=int, default=4, help="photos on which each LiteRT kernel is checked alone"
    )
    parser.add_argument("--encodings", help="reuse quantization parameters saved by an earlier run (skips calibration)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = zoo.efficientnet_lite0()
    images, labels = zoo.imagenet_photos()
    labels_np = labels.numpy()
    x = torch.stack([zoo.preprocess(im) for im in images])
    config = QuantConfig(target=Target.TFLITE)
    start = time.perf_counter()
    if args.encodings:
        qm = quantize(model, encodings=args.encodings, example_inputs=x[:2], config=config)
    else:
        qm = quantize(model, zoo.augmented_crops(images, args.calib, seed=1).split(32), config=config)
        qm.save_encodings(out / "efficientnet_lite0_tflite.encodings.json", overwrite=True)
    print(f"quantized in {time.perf_counter() - start:.1f} s")

    int8_path, fp32_path = out / "efficientnet_lite0_int8.tflite", out / "efficientnet_lite0_fp32.tflite"
    onnx_path = out / "efficientnet_lite0_tflite_target_int8.onnx"
    report = qm.export_tflite(int8_path, overwrite=True)
    float_report = qm.export_tflite(fp32_path, float_model=True, overwrite=True)
    qm.export_onnx(onnx_path, overwrite=True)
    print("; ".join(str(p) for p in report.parity), f"(2 example inputs); operators {report.ops}")

    with torch.no_grad():
        fp32_logits = model(x).numpy()
    int8_model = int8_path.read_bytes()
    samples = [input_codes(qm.graph_module, (x[i : i + 1],)) for i in range(len(x))]
    with atomic_path(out / "photos_int8.npy", overwrite=True) as tmp, open(tmp, "wb") as f:
        np.save(f, np.concatenate([s[0] for s in samples]))  # the photos' int8 codes, for `eightbit report`
    litert = np.concatenate([run_litert(int8_model, s)[0] for s in samples])
    builtin = np.concatenate([run_litert(int8_model, s, kernels=LiteRTKernels.BUILTIN)[0] for s in samples])
    ref_kernels = np.concatenate([run_litert(int8_model, s, kernels=LiteRTKernels.REFERENCE)[0] for s in samples])
    tflm = np.concatenate([run_tflm(int8_model, s)[0] for s in samples])
    reference = IntegerReference(int8_model)
    integer = np.concatenate([reference.run(s)[0][0] for s in samples])
    ort = load(onnx_path, Backend.ORT, RuntimeOptions(threads=2))
    ort_logits = ort.run({ort.input_names[0]: x.numpy()})[0]
    nhwc = x.permute(0, 2, 3, 1).contiguous().numpy()
    fp32_tflite = np.concatenate([run_litert(fp32_path.read_bytes(), [nhwc[i : i + 1]])[0] for i in range(len(x))])

    n = len(labels_np)
    rows = [
        ("fp32 PyTorch", _top1(fp32_logits, labels_np), "", ""),
        (
            "fp32 LiteRT (.tflite, same graph)",
            _top1(fp32_tflite, labels_np),
            f"{float_report.size_bytes / 1e6:.2f}",
            "",
        ),
        (
            "int8 ONNX Runtime (same calibration)",
            _top1(ort_logits, labels_np),
            f"{onnx_path.stat().st_size / 1e6:.2f}",
            "",
        ),
        ("int8 LiteRT (XNNPACK)", _top1(litert, labels_np), f"{report.size_bytes / 1e6:.2f}", ""),
        ("int8 LiteRT (builtin kernels)", _top1(builtin, labels_np), f"{report.size_bytes / 1e6:.2f}", ""),
        ("int8 LiteRT (reference kernels)", _top1(ref_kernels, labels_np), f"{report.size_bytes / 1e6:.2f}", ""),
        ("int8 TFLM", _top1(tflm, labels_np), f"{report.size_bytes / 1e6:.2f}", f"{report.arena_bytes / 1e6:.2f}"),
        ("int8 eightbit.integer", _top1(integer, labels_np), "", ""),
    ]
    print()
    print("| model | top-1 | file MB | TFLM arena MB |")
    print("|---|---|---|---|")
    for name, top1, size, arena in rows:
        print(f"| {name} | {top1}/{n} | {size} | {arena} |")
    print()
    print(f"integer reference vs TFLM: {int((integer != tflm).sum())} of {tflm.size} output codes differ")
    for agreement in compare_runtimes(int8_model, samples, kernel_samples=args.kernel_samples):
        print(agreement)
    ort_top1 = ort_logits.argmax(1)
    for name, codes in (("XNNPACK", litert), ("builtin", builtin), ("reference", ref_kernels)):
        same = int((codes.argmax(1) == ort_top1).sum())
        print(f"LiteRT {name} int8 top-1 equals the ONNX int8 model's on {same}/{n} photos")

    runners = {"int8": LiteRTRunner(int8_path, threads=2), "fp32": LiteRTRunner(fp32_path, threads=2)}
    feeds = {"int8": samples[0][0], "fp32": nhwc[:1]}
    timings = time_interleaved(
        runners,
        lambda r: {r.input_names[0]: feeds["int8" if r is runners["int8"] else "fp32"]},
        warmup=5,
        iters=args.iters,
    )
    flags = "AVX-512 VNNI" if hw.has_vnni() else "AVX2 (no VNNI)"
    print()
    print(f"LiteRT batch-1 latency, XNNPACK, 2 threads, {args.iters} calls each in interleaved rounds ({flags}):")
    for name, timing in timings.items():
        print(f"  {name}: median {timing.median_ms:.2f} ms (p10 {timing.p10_ms:.2f}, p90 {timing.p90_ms:.2f})")
    print(f"  int8 speedup: {timings['fp32'].median_ms / timings['int8'].median_ms:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
