"""Transformer int8 speed benchmark: eightbit vs ORT fp32, ORT quantize_dynamic and NNCF + OpenVINO, 2 threads.

Models: all-MiniLM-L6-v2 (its real weights) and BERT-base (random init from `BertConfig()`), both wrapped as
sentence encoders (mean pooling + L2 norm), at sequence length 128. Every variant starts from the same fp32
ONNX file (dynamic batch and sequence). Calibration: real movie-review sentences for every tool. Timing:
batch-1 median latency and batch-32 throughput (samples/s), all variants interleaved in one process.

    python bench/run_text.py [--models minilm bert_base] [--calib 64] [--quick] [--out DIR]

Writes text_results.md and text_results.json to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `eightbit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import Peer, ort_optimized_fp32, quantize_peer  # noqa: E402
from eightbit import text  # noqa: E402
from eightbit.api import quantize  # noqa: E402
from eightbit.config import QuantConfig, SmoothQuant  # noqa: E402
from eightbit.demos import reviews, zoo  # noqa: E402
from eightbit.export.onnx import export_float  # noqa: E402
from eightbit.runtime.backends import Backend, RuntimeOptions, load  # noqa: E402
from eightbit.runtime.benchmark import time_interleaved  # noqa: E402

SEQ = 128
THREADS = 2
INPUTS = ("input_ids", "attention_mask")


def build(name: str) -> torch.nn.Module:
    """The fp32 sentence encoder for `name`."""
    if name == "minilm":
        _, bert = zoo.load_minilm()
    elif name == "bert_base":
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        bert = BertModel(BertConfig(), add_pooling_layer=False).eval()
    else:
        raise ValueError(f"unknown model {name!r}; valid: minilm, bert_base")
    return text.SentenceEncoder(bert).eval()


def feeds(batch: int, vocab: int = 30000, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids at full sequence length (speed only)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, (batch, SEQ)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((batch, SEQ), np.int64)}


def variants(name: str, calib_n: int, work: Path) -> dict[str, Path]:
    """Model files per variant label."""
    model = build(name)
    tokenizer, _ = zoo.load_minilm()  # BERT-base and MiniLM share the uncased WordPiece vocabulary
    splits = reviews.sentiment_splits(reviews.movie_review_sentences(), n_calib=calib_n)
    batches = text.token_batches(tokenizer, splits.calib_texts, batch_size=16, max_length=SEQ)
    example = tuple(batches[0][k] for k in INPUTS)
    paths = {"fp32": export_float(model, example, work / f"{name}_fp32.onnx", input_names=INPUTS, overwrite=True)}
    paths["fp32 ORT-optimized"] = ort_optimized_fp32(paths["fp32"], work / f"{name}_fp32_opt.onnx")
    qm = quantize(model, batches, config=QuantConfig(smooth_quant=SmoothQuant()), progress=False)
    print(f"{name}: SmoothQuant alpha {qm.smooth_alpha}", flush=True)
    report = qm.export_onnx(work / f"{name}_eightbit.onnx", overwrite=True)
    print(f"{name}: eightbit {report.parity}", flush=True)
    paths["eightbit"] = report.path
    per_sample = [{k: b[k][i : i + 1].numpy() for k in INPUTS} for b in batches for i in range(len(b["input_ids"]))]
    for peer in (Peer.ORT_DYNAMIC, Peer.NNCF_TRANSFORMER):
        paths[peer.value] = quantize_peer(
            peer, paths["fp32"], per_sample[:calib_n], work / f"{name}_{peer.value}.onnx"
        ).path
    return paths


def measure(paths: dict[str, Path], batches: list[int], quick: bool) -> list[dict]:
    """Throughput (samples/s) and median latency of every (variant, runtime) at each batch size."""
    options = RuntimeOptions(threads=THREADS)
    runners = {}
    for label, path in paths.items():
        for backend in (Backend.ORT, Backend.OPENVINO):
            if backend is Backend.ORT and path.suffix == ".xml":
                continue
            if backend is Backend.OPENVINO and label.startswith(("fp32 ORT", Peer.ORT_DYNAMIC.value)):
                continue  # ORT contrib ops: OpenVINO cannot read them
            runners[(label, backend.value)] = load(path, backend, options)
    rows = []
    for batch in batches:
        warmup, iters = (2, 6) if quick else ((10, 40) if batch == 1 else (3, 12))
        timings = time_interleaved(runners, lambda r, b=batch: feeds(b), warmup=warmup, iters=iters, rounds=2)
        for (label, backend), t in timings.items():
            rows.append(
                {
                    "variant": label,
                    "runtime": backend,
                    "batch": batch,
                    "median_ms": t.median_ms,
                    "samples_per_s": t.samples_per_s,
                }
            )
    return rows


def markdown(name: str, rows: list[dict]) -> str:
    ref = {r["batch"]: r for r in rows if r["variant"] == "fp32" and r["runtime"] == Backend.ORT.value}
    nncf = {}
    for r in rows:
        if r["variant"] == Peer.NNCF_TRANSFORMER.value:
            nncf[r["batch"]] = r
    lines = [
        f"#### {name}, sequence length {SEQ}",
        "",
        "| variant | runtime | batch | median ms | samples/s | vs ORT fp32 | vs NNCF+OV |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["batch"], -r["samples_per_s"])):
        vs_ref = r["samples_per_s"] / ref[r["batch"]]["samples_per_s"]
        vs_nncf = r["samples_per_s"] / nncf[r["batch"]]["samples_per_s"] if r["batch"] in nncf else float("nan")
        lines.append(
            f"| {r['variant']} | {r['runtime']} | {r['batch']} | {r['median_ms']:.1f} | "
            f"{r['samples_per_s']:.1f} | {vs_ref:.2f} | {vs_nncf:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "bert_base"])
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--quick", action="store_true", help="few timed calls (smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    args.out.mkdir(parents=True, exist_ok=True)
    sections, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            paths = variants(name, args.calib, Path(tmp))
            rows = measure(paths, args.batches, args.quick)
            raw[name] = rows
            sections.append(markdown(name, rows))
            print(sections[-1], flush=True)
    header = f"Command: `python bench/run_text.py {' '.join(argv or sys.argv[1:])}`; {platform.processor() or 'x86_64'}"
    (args.out / "text_results.md").write_text(header + "\n\n" + "\n\n".join(sections) + "\n")
    (args.out / "text_results.json").write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
