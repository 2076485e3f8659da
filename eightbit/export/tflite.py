"""TFLite export of a converted graph: a fully int8 `.tflite` for LiteRT and TensorFlow Lite Micro.

The converted FX graph is written directly (`tflite_writer`, one handler per ATen op in `tflite_handlers*`):
int8 activations (eightbit's uint8 codes minus 128, zero points too), int8 symmetric weights per output
channel (axis 3 for DEPTHWISE_CONV_2D), int32 biases at input scale x weight scale, NHWC layout.  A graph with
ops the export cannot write is refused up front with every such op and where it is.  Every export is checked:
LiteRT and TFLM run the file and their output codes are compared with the codes the PyTorch simulation gives.
`tflite_bytes(..., float_model=True)` writes the float32 model of the same graph, the speed baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx

from eightbit.export import tflite_handlers, tflite_handlers_tensor  # noqa: F401  (they fill HANDLERS)
from eightbit.export.tflite_run import run_litert, run_tflm, tflm_arena_bytes
from eightbit.export.tflite_writer import (
    HANDLERS,
    NCHW_TO_NHWC,
    TFLiteWriter,
    Unsupported,
    code_shift,
    is_quantize,
    quantize_params,
    require_schema,
    schema,
    where,
)
from eightbit.fileio import atomic_path

__all__ = ["TFLiteReport", "Unsupported", "expected_codes", "export_tflite", "input_codes", "tflite_bytes"]

# Shape bookkeeping of a dynamic-batch capture: the file has static shapes (batch 1), recorded by running the graph.
_SKIPPED = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_size.int,
}


@dataclass
class CodeParity:
    """How far one runtime's output codes are from the codes the PyTorch simulation gives."""

    runtime: str
    max_steps: int  # largest |code difference|
    differing_fraction: float  # share of output codes that differ at all

    def __str__(self) -> str:
        return f"{self.runtime} vs PyTorch: max {self.max_steps} codes, {100 * self.differing_fraction:.2f}% differ"


@dataclass
class TFLiteReport:
    path: Path
    size_bytes: int
    parity: list[CodeParity] = field(default_factory=list)
    arena_bytes: int | None = None  # TFLM's tensor arena
    ops: dict[str, int] = field(default_factory=dict)  # TFLite operator -> count


def unsupported_ops(gm: fx.GraphModule) -> list[str]:
    """Every call in the graph that has no TFLite handler, with where it is."""
    return [
        where(n)
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target not in HANDLERS and n.target not in _SKIPPED
    ]


def _shapes(gm: fx.GraphModule, args: tuple) -> dict[fx.Node, tuple]:
    shapes: dict[fx.Node, tuple] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = tuple(out.shape)
            return out

    with torch.no_grad():
        Recorder(gm).run(*args)
    return shapes


def first_sample(args: tuple) -> tuple:
    """The example inputs with batch 1 (TFLite files have static shapes; TFLM runs one sample)."""
    return tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)


def tflite_bytes(
    gm: fx.GraphModule, example_args: tuple, *, float_io: bool = False, float_model: bool = False
) -> tuple[bytes, TFLiteWriter]:
    """The .tflite flatbuffer of `gm` at batch 1, and the writer (tensor of each node, operators of each node).

    float_io: float32 input/output through QUANTIZE/DEQUANTIZE at the edges (int8 otherwise).
    float_model: the float32 model of the same graph (dequantized weights, no activation rounding)."""
    require_schema()
    missing = unsupported_ops(gm)
    if missing:
        raise Unsupported("TFLite export has no handler for: " + "; ".join(missing))
    example = first_sample(example_args)
    w = TFLiteWriter(gm, _shapes(gm, example), float_model=float_model)
    inputs = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(_graph_input(w, node, float_io))
        elif node.op == "call_function" and node.target not in _SKIPPED:
            HANDLERS[node.target](w, node)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [a for a in torch.utils._pytree.tree_leaves(out_node.args[0]) if isinstance(a, fx.Node)]
    outputs = [_graph_output(w, leaf, float_io) for leaf in leaves]
    kind = "float32" if float_model else "int8"
    return w.finish(inputs, outputs, f"eightbit {kind}"), w


def _graph_input(w: TFLiteWriter, node: fx.Node, float_io: bool) -> int:
    users = [
        u
        for u in node.users
        if not (u.op == "call_module" and str(u.target).startswith("_guards")) and u.target not in _SKIPPED
    ]
    floats = [u.name for u in users if not is_quantize(u)]
    if floats or not users:
        raise Unsupported(f"input {node.name} is read in float by {floats}: the TFLite model must start in int8")
    params = {quantize_params(w.gm, q) for q in users}
    if len(params) > 1:
        raise Unsupported(f"input {node.name} is quantized with {len(params)} different parameter sets")
    shape = w.layout_shape(node)
    if w.float_model:
        index = w.activation(node.name, shape, None)
    else:
        index = w.activation(f"{node.name}_int8", shape, params.pop())
    for q in users:
        w.tensor_of[q] = index
    if not float_io or w.float_model:
        return index
    float_in = w.activation(node.name, shape, None)
    w.add_op(schema.BuiltinOperator.QUANTIZE, [float_in], [index], by=node)
    return float_in


def _graph_output(w: TFLiteWriter, leaf: fx.Node, float_io: bool) -> int:
    if leaf not in w.tensor_of:
        raise Unsupported(
            f"output {where(leaf)} is float: quantize with QuantConfig(target=Target.TFLITE) for an int8 output"
        )
    index = w.tensor_of[leaf]
    if not float_io or w.float_model:
        return index
    out = w.activation(f"{leaf.name}_float", w.tensors[index].shape, None)
    w.add_op(schema.BuiltinOperator.DEQUANTIZE, [index], [out], by=leaf)
    return out


# ------------------------------------------------------------------------------------------- expected codes


def _codes(gm: fx.GraphModule, args: tuple) -> dict[fx.Node, torch.Tensor]:
    """The integer output of every quantize node (and integer pad) when the simulation runs on `args`."""
    found: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and not out.is_floating_point() and n.op == "call_function":
                found[n] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*args)
    return found


def _int8_layout(codes: torch.Tensor, shift: int) -> np.ndarray:
    array = (codes.to(torch.int32) - shift).to(torch.int8)
    if array.dim() == 4:
        array = array.permute(*NCHW_TO_NHWC)
    return array.contiguous().numpy()


def input_codes(gm: fx.GraphModule, args: tuple) -> list[np.ndarray]:
    """The int8 NHWC input tensors of the .tflite file for the model inputs `args` (batch 1)."""
    codes = _codes(gm, args)
    found = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        q = next(u for u in node.users if is_quantize(u))
        found.append(_int8_layout(codes[q], code_shift(gm, q)))
    return found


def expected_codes(gm: fx.GraphModule, args: tuple) -> list[np.ndarray]:
    """The int8 (NHWC) output codes the PyTorch simulation gives for `args`: what the runtimes should give."""
    codes = _codes(gm, args)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    found = []
    for leaf in torch.utils._pytree.tree_leaves(out_node.args[0]):
        q = leaf.args[0]
        quantize = q if is_quantize(q) else None
        found.append(_int8_layout(codes[q], code_shift(gm, quantize) if quantize is not None else 0))
    return found


def code_parity(runtime: str, got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> CodeParity:
    diffs = [
        np.abs(g.astype(np.int32) - e.astype(np.int32)).reshape(-1)
        for gs, es in zip(got, want, strict=True)
        for g, e in zip(gs, es, strict=True)
    ]
    flat = np.concatenate(diffs)
    return CodeParity(runtime, int(flat.max(initial=0)), float((flat > 0).mean()))


def check_runtimes(gm: fx.GraphModule, model: bytes, samples: list[tuple]) -> list[CodeParity]:
    """Run the int8 file on LiteRT and TFLM for each sample and compare the output codes with the simulation."""
    inputs = [input_codes(gm, s) for s in samples]
    want = [expected_codes(gm, s) for s in samples]
    litert = [run_litert(model, x) for x in inputs]
    tflm = [run_tflm(model, x) for x in inputs]
    return [code_parity("LiteRT", litert, want), code_parity("TFLM", tflm, want)]


def samples_of(example_args: tuple, count: int = 2) -> list[tuple]:
    """Up to `count` batch-1 samples from the example batch."""
    batch = next(a.shape[0] for a in example_args if isinstance(a, torch.Tensor) and a.dim() > 0)
    return [
        tuple(a[i : i + 1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in example_args)
        for i in range(min(batch, count))
    ]


def export_tflite(
    gm: fx.GraphModule,
    path,
    example_args: tuple,
    *,
    float_io: bool = False,
    float_model: bool = False,
    overwrite: bool = False,
    check: bool = True,
) -> TFLiteReport:
    """Write `gm` as a .tflite file (atomically; batch 1) and, if `check`, run it on LiteRT and TFLM and compare
    their output codes with the PyTorch simulation (int8 models with int8 input/output only)."""
    model, writer = tflite_bytes(gm, example_args, float_io=float_io, float_model=float_model)
    with atomic_path(path, overwrite) as tmp:
        Path(tmp).write_bytes(model)
    report = TFLiteReport(Path(path), len(model), ops=_op_counts(writer))
    samples = samples_of(example_args)
    if check and not float_model and not float_io:
        report.parity = check_runtimes(gm, model, samples)
        report.arena_bytes = tflm_arena_bytes(model, input_codes(gm, samples[0]))
    return report


def _op_counts(w: TFLiteWriter) -> dict[str, int]:
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = {index: code for code, index in w.opcodes.items()}
    counts: dict[str, int] = {}
    for op in w.operators:
        name = names[codes[op.opcodeIndex]]
        counts[name] = counts.get(name, 0) + 1
    return counts
