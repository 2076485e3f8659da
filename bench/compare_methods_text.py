"""Calibration methods compared on all-MiniLM-L6-v2 sentence embeddings (mean cosine against fp32).

One calibration pass per smoothing setting collects the statistics of every activation method; each row is
then quantized from them and judged on held-out movie-review sentences (PyTorch simulation of the int8 model,
which matches ONNX Runtime to 4 decimals of cosine: see `make demo-text`).

    .venv/bin/python bench/compare_methods_text.py [--calib 128] [--test 500]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eightbit import QuantConfig, SmoothQuant, calibrate, text  # noqa: E402
from eightbit.calibration.methods import METHODS  # noqa: E402
from eightbit.demos import reviews, zoo  # noqa: E402

ACTIVATION_METHODS = ("minmax", "ema", "percentile", "mse", "kl", "eq")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--test", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer, bert = zoo.load_minilm()
    model = text.SentenceEncoder(bert).eval()
    splits = reviews.sentiment_splits(reviews.movie_review_sentences(), n_test=args.test, n_train=0, n_calib=args.calib)
    calibration = text.token_batches(tokenizer, splits.calib_texts, batch_size=16)
    test = text.token_batches(tokenizer, splits.test_texts, batch_size=64)
    reference = text.embed(model, test)
    methods = [m for m in ACTIVATION_METHODS if m in METHODS]
    print(f"all-MiniLM-L6-v2, {args.calib} calibration / {args.test} test sentences; weights int8 per-channel\n")
    print("| activations | smoothing | mean cosine | min cosine | convert s |")
    print("|---|---|---|---|---|")
    for smoothing in (None, SmoothQuant()):
        base = QuantConfig(smooth_quant=smoothing)
        start = time.perf_counter()
        cal = calibrate(model, calibration, config=base, methods=methods, progress=False)
        label = "none" if smoothing is None else "SmoothQuant"
        print(f"| (one calibration pass) | {label} | | | {time.perf_counter() - start:.1f} |", flush=True)
        for method in methods:
            config = replace(base, activations=replace(base.activations, method=method))
            start = time.perf_counter()
            qm = cal.quantize(config)
            seconds = time.perf_counter() - start
            cos = text.cosine_stats(reference, text.embed(qm, test))
            alpha = "" if qm.smooth_alpha is None else f" (alpha {qm.smooth_alpha})"
            print(f"| {method} | {label}{alpha} | {cos['mean']:.4f} | {cos['min']:.4f} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
