"""`eightbit bench MODEL.onnx`: fp32 vs int8 on each runtime, with a loud warning when int8 is not faster."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from eightbit.export.strip import strip_qdq
from eightbit.runtime.backends import Backend, RuntimeOptions
from eightbit.runtime.benchmark import benchmark_models, format_table, op_time_breakdown

_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def load_onnx(path: Path, role: str = "model") -> onnx.ModelProto:
    """The ONNX model at `path` (without external data), or a clear error for a missing file, a folder, or a
    file that is not ONNX."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the {role} .onnx file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(
            f"{path} is not an ONNX model ({type(exc).__name__}: {exc}); give the {role} .onnx file"
        ) from exc
    if not model.graph.node:  # protobuf parses some foreign bytes as an empty message
        raise ValueError(f"{path} is not an ONNX model (it has no graph); give the {role} .onnx file")
    return model


def check_quantized(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a model without QuantizeLinear/DequantizeLinear: it would be benchmarked, and labelled, as int8."""
    if not any(node.op_type in _QDQ_OPS for node in model.graph.node):
        raise ValueError(
            f"no Q/DQ: this is a float model ({path}). `eightbit bench` compares an int8 QDQ model with its float "
            "counterpart; quantize it first (`eightbit quantize`)"
        )


def input_shapes(path: Path | onnx.ModelProto) -> dict[str, list[int | None]]:
    """Input name -> shape (None for symbolic dims) of an ONNX file or model."""
    model = path if isinstance(path, onnx.ModelProto) else onnx.load(path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def random_feeds(shapes: dict[str, list[int | None]], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float inputs with the batch axis set; other dims must be static."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape in shapes.items():
        dims = [batch, *shape[1:]]
        if any(d is None for d in dims):
            raise ValueError(
                f"input {name!r} has symbolic dims besides the batch axis ({shape}); "
                "benchmark a model with static non-batch dims"
            )
        feeds[name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def slower_than_fp32(rows) -> list[str]:
    """Warnings for every (backend, batch) where int8 is not faster than fp32."""
    times = {(r.label, r.backend, r.batch): r.timing.median_ms for r in rows}
    notes = []
    for (label, backend, batch), ms in times.items():
        ref = times.get(("fp32", backend, batch))
        if label == "int8" and ref is not None and ms >= ref:
            notes.append(
                f"WARNING: int8 is {ms / ref:.2f}x the time of fp32 on {backend.value} at batch {batch}; "
                "see --breakdown for where the time goes"
            )
    return notes


def bench_cli(args) -> int:
    """Entry point of `eightbit bench`."""
    int8 = Path(args.model)
    model = load_onnx(int8, "int8")
    check_quantized(model, int8)
    if args.fp32:
        load_onnx(Path(args.fp32), "fp32")
    backends = [Backend(b) for b in args.backends]
    shapes = input_shapes(model)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(args.fp32) if args.fp32 else Path(tmp) / "fp32.onnx"
        if not args.fp32:
            onnx.save(strip_qdq(onnx.load(int8)), fp32)
        rows = benchmark_models(
            {"fp32": fp32, "int8": int8},
            backends,
            [1, args.batch],
            lambda runner, b: random_feeds(shapes, b),
            options=RuntimeOptions(threads=args.threads),
            iters=lambda b: (5, args.iters) if b == 1 else (2, max(3, args.iters // 5)),
        )
        print(format_table(rows, reference=("fp32", backends[0])))
        for note in slower_than_fp32(rows):
            print(note)
        if args.breakdown:
            print("\nONNX Runtime time per run by op category (ms, batch 1):")
            for label, path in (("fp32", fp32), ("int8", int8)):
                parts = op_time_breakdown(path, random_feeds(shapes, 1), threads=args.threads)
                print(f"  {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if v > 0.005))
    return 0
