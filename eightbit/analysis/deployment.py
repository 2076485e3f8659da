"""Deployment report of an int8 .tflite for microcontrollers and NPUs.

Per layer: channel counts against the multiplier array's alignment (16 or 32 lanes: the share of multiply slots
an NPU wastes on padding), weight bytes, the largest accumulator partial sum on the given inputs and whether an
int16 accumulator would overflow; for the model: TFLM's tensor arena (its planner reuses memory between
tensors) and the first layer where TFLite Micro differs from eightbit's integer reference.

`python -m eightbit.analysis.deployment model.tflite [--inputs samples.npy] [--alignment 16]`
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import numpy as np

from eightbit.analysis.runtime_agreement import Mismatch, RuntimeAgreement, compare_runtimes
from eightbit.export.tflite_run import run_tflm, tflm_arena_bytes
from eightbit.integer.executor import IntegerReference
from eightbit.integer.fixed_point import int16_products_that_fit
from eightbit.integer.kernels import Accumulator

_DOT = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclass
class LayerRow:
    index: int
    op: str
    output: str
    in_channels: int
    out_channels: int
    alignment_waste: float  # share of multiply slots spent on padding channels up to the alignment
    weight_bytes: int
    products: int | None = None  # products per output value (dot-product layers)
    max_partial: int | None = None  # largest |partial sum of products| on the inputs
    int16_overflow: bool | None = None


@dataclass
class DeploymentReport:
    alignment: int
    layers: list[LayerRow] = field(default_factory=list)
    arena_bytes: int = 0
    weight_bytes: int = 0
    first_mismatch: Mismatch | None = None  # first layer where TFLM differs from the integer reference
    n1: int = int16_products_that_fit()
    runtimes: list[RuntimeAgreement] = field(default_factory=list)  # LiteRT kernel sets vs TFLM

    def __str__(self) -> str:
        columns = ["#", "op", "output", "in ch", "out ch", f"waste @{self.alignment}", "weight B", "products"]
        head = "| " + " | ".join([*columns, "max partial", "int16"]) + " |"
        lines = [head, "|" + "---|" * 10]
        for r in self.layers:
            partial = "" if r.max_partial is None else str(r.max_partial)
            overflow = "" if r.int16_overflow is None else ("OVERFLOW" if r.int16_overflow else "fits")
            lines.append(
                f"| {r.index} | {r.op} | {r.output} | {r.in_channels} | {r.out_channels} | "
                f"{100 * r.alignment_waste:.0f}% | {r.weight_bytes} | {r.products or ''} | {partial} | {overflow} |"
            )
        dot = [r for r in self.layers if r.op in _DOT]
        overflowing = [r for r in dot if r.int16_overflow]
        mismatch = (
            "none: TFLM equals the integer reference on every tensor"
            if self.first_mismatch is None
            else f"op {self.first_mismatch.index} {self.first_mismatch.op} ({self.first_mismatch.output}): "
            f"{self.first_mismatch.differing} values differ, by up to {self.first_mismatch.max_codes} codes"
        )
        lines += [
            "",
            f"weights {self.weight_bytes / 1e6:.3f} MB; TFLM arena {self.arena_bytes / 1e6:.3f} MB",
            f"int16 accumulation (n1 = {self.n1} int8 x int8 products surely fit): "
            f"{len(overflowing)} of {len(dot)} dot-product layers overflow on these inputs",
            f"first layer where TFLM differs from eightbit.integer: {mismatch}",
        ]
        lines += [str(r) for r in self.runtimes]
        return "\n".join(lines)


def alignment_waste(op: str, in_channels: int, out_channels: int, alignment: int) -> float:
    """Share of multiply slots wasted when channels are padded to multiples of `alignment`: input x output
    channels for convolutions and fully connected layers, channels alone for depthwise ones."""
    pad = lambda c: math.ceil(c / alignment) * alignment  # noqa: E731
    if op == "DEPTHWISE_CONV_2D" or op not in _DOT:
        return 1 - out_channels / pad(out_channels)
    return 1 - (in_channels * out_channels) / (pad(in_channels) * pad(out_channels))


def deployment_report(
    model: bytes, samples: list[list[np.ndarray]], *, alignment: int = 16, runtimes: bool = True
) -> DeploymentReport:
    """The report for `model` on `samples` (each a list of int8 NHWC input arrays, as the file takes them);
    `runtimes` adds LiteRT (XNNPACK, builtin and reference kernels) against TFLM."""
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, got {alignment}")
    measured = IntegerReference(model, Accumulator(measure=True))
    for sample in samples:
        measured.run(sample)
    graph = measured.graph
    report = DeploymentReport(alignment, arena_bytes=tflm_arena_bytes(model, samples[0]))
    for i, op in enumerate(graph.operators):
        name = measured.op_name(i)
        out_t, in_t = graph.tensors[int(op.outputs[0])], graph.tensors[int(op.inputs[0])]
        weight_bytes = sum(
            _buffer_bytes(measured.model.buffers[graph.tensors[int(k)].buffer])
            for k in op.inputs[1:]
            if k >= 0 and name in _DOT
        )
        row = LayerRow(
            i,
            name,
            _name(out_t.name),
            int(in_t.shape[-1]),
            int(out_t.shape[-1]),
            alignment_waste(name, int(in_t.shape[-1]), int(out_t.shape[-1]), alignment),
            weight_bytes,
        )
        if i in measured.layers:
            layer = measured.layers[i]
            row.products = layer.products_per_output
            row.max_partial, row.int16_overflow = layer.stats.max_abs_partial, layer.stats.int16_overflow
        report.layers.append(row)
        report.weight_bytes += weight_bytes
    report.first_mismatch = first_mismatch(model, samples[0])
    if runtimes:
        report.runtimes = compare_runtimes(model, samples)
    return report


def first_mismatch(model: bytes, inputs: list[np.ndarray]) -> Mismatch | None:
    """The first operator (in execution order) whose output differs between TFLM and the integer reference."""
    reference = IntegerReference(model)
    _, tflm = run_tflm(model, inputs, all_tensors=True)
    _, ours = reference.run(inputs)
    for i, op in enumerate(reference.graph.operators):
        index = int(op.outputs[0])
        got, want = tflm[index].reshape(-1).astype(np.int64), ours[index].reshape(-1).astype(np.int64)
        if not np.array_equal(got, want):
            name = _name(reference.graph.tensors[index].name)
            diff = np.abs(got - want)
            return Mismatch(i, reference.op_name(i), name, int((diff > 0).sum()), int(diff.max()))
    return None


def _buffer_bytes(buffer) -> int:
    return 0 if buffer.data is None else len(buffer.data)


def _name(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's command-line arguments (shared with `eightbit report`)."""
    parser.add_argument("model", help="an int8 .tflite file")
    parser.add_argument("--inputs", help=".npy of int8 NHWC inputs (batch of samples); default: 4 random samples")
    parser.add_argument("--alignment", type=int, default=16, help="multiplier-array width in channels (16 or 32)")
    parser.add_argument(
        "--no-runtimes", action="store_true", help="skip the LiteRT (XNNPACK, builtin, reference) vs TFLM comparison"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Print the report for parsed arguments (`add_arguments`)."""
    if args.alignment < 1:
        raise ValueError(f"--alignment must be >= 1, got {args.alignment}")
    with open(args.model, "rb") as f:
        model = f.read()
    graph = IntegerReference(model).graph
    shape = [int(s) for s in graph.tensors[int(graph.inputs[0])].shape]
    if args.inputs:
        batch = np.load(args.inputs)
        if batch.dtype != np.int8 or batch.shape[1:] != tuple(shape[1:]):
            raise ValueError(
                f"{args.inputs} holds {batch.dtype} {batch.shape}; the report needs the file's int8 input codes, "
                f"shape (samples, {', '.join(map(str, shape[1:]))}) (eightbit.export.tflite.input_codes)"
            )
    else:
        batch = np.random.default_rng(0).integers(-128, 128, (4, *shape[1:])).astype(np.int8)
    samples = [[batch[i : i + 1]] for i in range(len(batch))]
    print(deployment_report(model, samples, alignment=args.alignment, runtimes=not args.no_runtimes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
