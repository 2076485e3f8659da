"""`make demo-text`: all-MiniLM-L6-v2 sentence embeddings to int8, judged on human-rated movie-review sentences.

Calibrates on sentences outside the test split, exports one int8 ONNX model and runs it on ONNX Runtime and
OpenVINO.  Prints one table: mean / min cosine of int8 vs fp32 embeddings over the test sentences, and the
accuracy of a sentiment probe (logistic regression fitted on fp32 embeddings of a fixed train split) applied
to each variant's test embeddings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from eightbit import quantize, text
from eightbit.config import QuantConfig, SmoothQuant
from eightbit.demos import reviews, zoo
from eightbit.runtime.backends import Backend, RuntimeOptions, load

CONFIG = QuantConfig(smooth_quant=SmoothQuant())


def _sorted_batches(tokenizer, texts: list[str], batch_size: int):
    """Batches of length-sorted sentences (little padding, fast) and the order that restores the input order."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    batches = text.token_batches(tokenizer, [texts[i] for i in order], batch_size=batch_size)
    return batches, np.argsort(order)


def _runtime_embed(runner, batches) -> np.ndarray:
    return np.concatenate([runner.run({k: v.numpy() for k, v in b.items()})[0] for b in batches])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="folder for the ONNX file")
    parser.add_argument("--test", type=int, default=2000, help="test sentences")
    parser.add_argument("--train", type=int, default=2000, help="probe training sentences")
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer, bert = zoo.load_minilm()
    model = text.SentenceEncoder(bert).eval()
    splits = reviews.sentiment_splits(
        reviews.movie_review_sentences(), n_test=args.test, n_train=args.train, n_calib=args.calib
    )
    test_batches, restore = _sorted_batches(tokenizer, splits.test_texts, 64)
    train_batches, restore_train = _sorted_batches(tokenizer, splits.train_texts, 64)
    print(f"embedding {args.train} + {args.test} sentences with fp32 PyTorch ...", flush=True)
    fp32_test = text.embed(model, test_batches)[restore]
    fp32_train = text.embed(model, train_batches)[restore_train]

    start = time.perf_counter()
    calibration = text.token_batches(tokenizer, splits.calib_texts, batch_size=16)
    qm = quantize(model, calibration, config=CONFIG)
    path = out / "minilm_int8.onnx"
    report = qm.export_onnx(path, overwrite=True)
    print(
        f"quantized and exported in {time.perf_counter() - start:.0f} s (SmoothQuant alpha {qm.smooth_alpha}); "
        f"{report.parity}",
        flush=True,
    )
    options = RuntimeOptions(threads=2)
    embeddings = {
        "fp32 (PyTorch)": fp32_test,
        "int8 simulated (PyTorch)": text.embed(qm, test_batches)[restore],
        "int8 ONNX Runtime": _runtime_embed(load(path, Backend.ORT, options), test_batches)[restore],
        "int8 OpenVINO": _runtime_embed(load(path, Backend.OPENVINO, options), test_batches)[restore],
    }
    accuracy = reviews.probe_accuracy(fp32_train, splits.train_labels, embeddings, splits.test_labels)
    base = accuracy["fp32 (PyTorch)"]
    print(
        f"\nall-MiniLM-L6-v2, {args.test} test sentences, probe fitted on {args.train} fp32 embeddings; "
        f"int8 file {report.size_bytes / 1e6:.1f} MB\n"
    )
    print(f"{'variant':<26} {'mean cos':>9} {'min cos':>8} {'probe acc':>10} {'drop (pt)':>10}")
    for name, emb in embeddings.items():
        cos = text.cosine_stats(fp32_test, emb)
        drop = 100 * (base - accuracy[name])
        print(f"{name:<26} {cos['mean']:>9.4f} {cos['min']:>8.4f} {accuracy[name]:>10.4f} {drop:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
