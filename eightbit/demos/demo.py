"""`make demo`: EfficientNet-Lite0 (real ImageNet weights) to int8, evaluated and timed on ORT and OpenVINO.

Calibrates on augmented crops of the 20 labelled ImageNet photos, evaluates on the photos themselves, and
prints one table: fp32 vs int8 accuracy, agreement with fp32, logit cosine, file size, batch-1 latency and
batch-32 throughput on each runtime (2 threads).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from eightbit import quantize
from eightbit.analysis import metrics
from eightbit.demos import zoo
from eightbit.export.onnx import export_float
from eightbit.runtime.backends import Backend, RuntimeOptions, load
from eightbit.runtime.benchmark import latency, throughput


def _row(name, runner, x, labels, ref, size_mb, iters):
    logits = runner.run({runner.input_names[0]: x.numpy()})[0]
    single = {runner.input_names[0]: x[:1].numpy()}
    batch32 = {runner.input_names[0]: x.repeat(2, 1, 1, 1)[:32].numpy()}
    lat = latency(runner, single, warmup=5, iters=iters).median_ms
    tput = throughput(runner, batch32, warmup=2, iters=max(3, iters // 6))
    return dict(
        name=name,
        logits=logits,
        top1=metrics.topk_hits(logits, labels, 1),
        top5=metrics.topk_hits(logits, labels, 5),
        agree=metrics.top1_agreement(ref, logits),
        cosine=metrics.mean_cosine(ref, logits),
        size=size_mb,
        latency=lat,
        throughput=tput,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out", help="folder for the ONNX files")
    parser.add_argument("--calib", type=int, default=256, help="number of augmented calibration crops")
    parser.add_argument("--iters", type=int, default=30, help="timed batch-1 calls per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = zoo.efficientnet_lite0()
    images, labels = zoo.imagenet_photos()
    x = torch.stack([zoo.preprocess(im) for im in images])
    calibration = zoo.augmented_crops(images, args.calib, seed=1).split(32)

    start = time.perf_counter()
    qm = quantize(model, calibration)
    calibrated = time.perf_counter() - start
    int8_path, fp32_path = out / "efficientnet_lite0_int8.onnx", out / "efficientnet_lite0_fp32.onnx"
    report = qm.export_onnx(int8_path, overwrite=True)
    export_float(model, (torch.randn(1, 3, 224, 224),), fp32_path, overwrite=True)
    print(qm.summary().split("\n\n")[0])
    print(f"quantized in {calibrated:.1f} s; {report.parity}")

    with torch.no_grad():
        reference = model(x).numpy()
    labels_np = labels.numpy()
    rows = []
    options = RuntimeOptions(threads=2)
    for backend in (Backend.ORT, Backend.OPENVINO):
        for kind, path in (("fp32", fp32_path), ("int8", int8_path)):
            size = path.stat().st_size / 1e6
            rows.append(
                _row(
                    f"{kind} {backend.value}",
                    load(path, backend, options),
                    x,
                    labels_np,
                    reference,
                    size,
                    args.iters,
                )
            )
    print()
    print(render(rows, n=len(labels_np)))
    return 0


def render(rows: list[dict], n: int) -> str:
    """The demo table (markdown-compatible)."""
    head = [
        "model",
        "top-1",
        "top-5",
        "agree w/ fp32",
        "logit cos",
        "ONNX MB",
        "b1 ms",
        "b32 img/s",
        "speedup b1/b32",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {}
    for r in rows:
        runtime = r["name"].split(" ", 1)[1]
        base.setdefault(runtime, r)
        b = base[runtime]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    f"{r['top1']}/{n}",
                    f"{r['top5']}/{n}",
                    f"{r['agree']}/{n}",
                    f"{r['cosine']:.4f}",
                    f"{r['size']:.2f}",
                    f"{r['latency']:.2f}",
                    f"{r['throughput']:.0f}",
                    f"{b['latency'] / r['latency']:.2f}x / {r['throughput'] / b['throughput']:.2f}x",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
