"""Smoke check of the transformer side of bench/peers.py on a tiny random BERT encoder (under 2 minutes).

Exports BertModel (2 layers, hidden 64) with two int64 inputs (input_ids, attention_mask) through eightbit's
fp32 exporter (dynamo), runs every peer with 8 dict calibration feeds (batch 1, sequence 16), then runs each
result on a batch of 2 x sequence 20 (the second row padded) to show that dynamic shapes survive, and prints
its distance from the fp32 model and the ORT fused / contrib operators in each ONNX file.

    python -m bench.text_peers_check [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `eightbit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import Peer, fused_op_counts, ort_optimized_fp32, quantize_peer  # noqa: E402
from eightbit.export.onnx import export_float  # noqa: E402

THREADS = 2
INPUTS = ("input_ids", "attention_mask")


class _Encoder(torch.nn.Module):
    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    return _Encoder(BertModel(config)).eval()


def _feed(rng: np.random.Generator, batch: int, seq: int, pad: int = 0) -> dict[str, np.ndarray]:
    ids = rng.integers(0, 1000, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad:
        mask[-1, seq - pad :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    if path.suffix == ".xml":
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": THREADS}
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        return np.asarray(compiled(feed)[0])
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


_QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QAttention",
    "FakeQuantize",
}


def _quant_ops(path: Path) -> dict[str, int]:
    """Quantization-related operators in an ONNX file or OpenVINO IR (shows that something was quantized)."""
    if path.suffix == ".xml":
        import openvino as ov

        types = [op.get_type_name() for op in ov.Core().read_model(str(path)).get_ordered_ops()]
    else:
        import onnx

        types = [n.op_type for n in onnx.load(str(path)).graph.node]
    return dict(sorted(Counter(t for t in types if t in _QUANT_OPS).items()))


def _compare(y: np.ndarray, ref: np.ndarray) -> str:
    y, ref = y.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    cos = float(y @ ref / max(np.linalg.norm(y) * np.linalg.norm(ref), 1e-30))
    rel = float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))
    return f"max|diff| {np.abs(y - ref).max():.3g}  rel L2 {rel:.3g}  cosine {cos:.6f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the models in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        return check(work)


def check(work: Path) -> int:
    rng = np.random.default_rng(0)
    model = tiny_bert()
    calib = [_feed(rng, 1, 16) for _ in range(8)]
    probe = _feed(rng, 2, 20, pad=5)  # other batch and sequence than the export / calibration

    t0 = time.perf_counter()
    fp32 = export_float(
        model,
        tuple(torch.from_numpy(calib[0][n]) for n in INPUTS),
        work / "bert.fp32.onnx",
        input_names=INPUTS,
        overwrite=True,
    )
    print(f"exported fp32 in {time.perf_counter() - t0:.1f}s")
    ref = _run(fp32, probe)
    with torch.no_grad():
        torch_out = model(*(torch.from_numpy(probe[n]) for n in INPUTS)).numpy()
    print(f"{'fp32 (ORT) vs PyTorch':32s} shape {ref.shape}  {_compare(ref, torch_out)}")

    t0 = time.perf_counter()
    opt = ort_optimized_fp32(fp32, work / "bert.fp32-ort-opt.onnx")
    print(f"{'fp32 ORT-optimized':32s} ({time.perf_counter() - t0:.1f}s)  {_compare(_run(opt, probe), ref)}")
    print(f"  contrib ops: {fused_op_counts(opt)}")

    failures = []
    for peer in Peer:
        t0 = time.perf_counter()
        try:
            res = quantize_peer(peer, fp32, calib, work / f"bert.{peer.value}.onnx")
            y = _run(res.path, probe)
        except Exception as e:  # report and go on with the other peers
            failures.append(peer.value)
            print(f"{peer.value:32s} FAILED after {time.perf_counter() - t0:.1f}s: {type(e).__name__}: {e}")
            continue
        ok = y.shape == ref.shape and np.isfinite(y).all() and bool(_quant_ops(res.path))
        if not ok:
            failures.append(peer.value)
        print(f"{peer.value:32s} ({res.seconds:.1f}s)  {_compare(y, ref)}{'' if ok else '  BAD OUTPUT'}")
        if res.fused_ops is not None:
            print(f"  optimizer fused: {res.fused_ops}")
        for note in res.notes:
            print(f"  note: {note}")
        print(f"  quantization ops: {_quant_ops(res.path)}")
        if res.path.suffix == ".onnx":
            print(f"  contrib ops: {fused_op_counts(res.path)}")
    print("OK" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
