"""Direct ONNX emission vs the dynamo exporter on one quantized model: export time, outputs, ORT kernels, speed.

    .venv/bin/python bench/export_paths.py [--model minilm|resnet50] [--batch 32] [--rounds 10]

Both files come from the same quantized graph.  Latency is ORT (2 threads) on random inputs, alternating
the two sessions for `rounds` rounds after warm-up; the median is reported.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eightbit import QuantConfig, quantize  # noqa: E402
from eightbit.config import SmoothQuant  # noqa: E402
from eightbit.export import emit  # noqa: E402
from eightbit.export.onnx import _dynamo_model  # noqa: E402


def quantized(name: str):
    """The quantized model and a feed dict factory for `name`."""
    torch.set_num_threads(2)
    if name == "resnet50":
        from bench.models import resnet50

        data = [torch.randn(1, 3, 224, 224) for _ in range(8)]
        qm = quantize(resnet50(), data, progress=False)
        return qm, lambda b: {qm.input_names[0]: np.random.default_rng(0).standard_normal((b, 3, 224, 224), np.float32)}
    from bench.run_text import SEQ, feeds
    from eightbit import text
    from eightbit.demos import reviews, zoo

    tokenizer, bert = zoo.load_minilm()
    splits = reviews.sentiment_splits(reviews.movie_review_sentences(), n_calib=64)
    batches = text.token_batches(tokenizer, splits.calib_texts, batch_size=16, max_length=SEQ)
    config = QuantConfig(smooth_quant=SmoothQuant(alphas=(0.8,)))
    qm = quantize(text.SentenceEncoder(bert).eval(), batches, config=config, progress=False)
    return qm, feeds


def _optimized_ops(model: onnx.ModelProto) -> Counter:
    with tempfile.TemporaryDirectory() as work:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "resnet50"], default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    qm, make_feeds = quantized(args.model)
    kwargs = dict(input_names=qm.input_names, dynamic_axes=qm.dynamic_axes, opset=20)
    models, seconds = {}, {}
    for label, fn in (("direct", emit.emit_model), ("dynamo", _dynamo_model)):
        start = time.perf_counter()
        models[label] = fn(qm.graph_module, qm._example_args, **kwargs)
        seconds[label] = time.perf_counter() - start
    feeds = make_feeds(args.batch)
    sessions = {}
    for label, model in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        sessions[label] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = {label: s.run(None, feeds)[0] for label, s in sessions.items()}
    for s in sessions.values():
        s.run(None, feeds)  # warm-up
    times = {label: [] for label in sessions}
    for r in range(args.rounds):
        for label in sorted(sessions, reverse=bool(r % 2)):
            start = time.perf_counter()
            sessions[label].run(None, feeds)
            times[label].append(time.perf_counter() - start)
    ops = {label: _optimized_ops(m) for label, m in models.items()}
    print(f"{args.model}, batch {args.batch}, median of {args.rounds} alternating runs")
    print("| path | export s | ORT ms | nodes after ORT optimization |")
    print("|---|---|---|---|")
    for label in models:
        print(f"| {label} | {seconds[label]:.2f} | {1000 * np.median(times[label]):.1f} | {sum(ops[label].values())} |")
    print(f"max |direct - dynamo| output difference: {np.abs(outputs['direct'] - outputs['dynamo']).max():.3g}")
    print(
        f"only in direct: {dict(ops['direct'] - ops['dynamo'])}; only in dynamo: {dict(ops['dynamo'] - ops['direct'])}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
