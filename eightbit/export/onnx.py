"""ONNX export of a converted graph: standard QuantizeLinear/DequantizeLinear with int8 initializers.

The converted FX graph is written directly by `eightbit.export.emit` (one handler per ATen op).  A graph with
an op it has no handler for is re-captured with `torch.export` and handed to the dynamo ONNX exporter, with
the Q/DQ handlers in `eightbit.graph.ops`.  Every export is checked: ONNX Runtime runs the file and its outputs are
compared with the PyTorch simulation, in quantization steps.
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import fx

from eightbit.export.emit import Unsupported, emit_model
from eightbit.fileio import atomic_path
from eightbit.graph import ops

DEFAULT_OPSET = 20
DIRECT = "eightbit"  # eightbit.export.emit: one handler per ATen op, no re-capture
DYNAMO = "torch.onnx (dynamo)"  # the fallback for graphs with ops that emit has no handler for

# The exporter logs a warning per missing torchvision op on every export; eightbit never uses torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


@dataclass
class ParityReport:
    """How far ONNX Runtime's outputs are from the PyTorch simulation of the same int8 model."""

    max_abs_diff: float
    max_steps: float  # max_abs_diff in units of the output's 8-bit step (its range / 255)
    mismatched_fraction: float  # share of output values more than one step away

    def __str__(self) -> str:
        return (
            f"ONNX Runtime vs PyTorch simulation: max |diff| {self.max_abs_diff:.3g} = {self.max_steps:.2f} steps, "
            f"{100 * self.mismatched_fraction:.2f}% of values off by more than one step"
        )


@dataclass
class ExportReport:
    path: Path
    size_bytes: int
    parity: ParityReport | None
    exporter: str = DIRECT  # which path wrote the file: DIRECT or DYNAMO
    fallback_reason: str = ""  # why the direct path was not taken (the op without a handler), if it was not


def export_onnx(
    gm: fx.GraphModule,
    path,
    example_args: tuple,
    *,
    input_names: list[str],
    dynamic_axes: tuple,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    check: bool = True,
    float16: bool = False,
) -> ExportReport:
    """Write `gm` to `path` as ONNX (atomically) and, if `check`, compare ONNX Runtime with PyTorch.

    float16: store weights and compute in float16 (inputs and outputs stay float32)."""
    model, exporter, reason = _onnx_model(
        gm, example_args, input_names=input_names, dynamic_axes=dynamic_axes, opset=opset
    )
    if float16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
    with atomic_path(path, overwrite) as tmp:
        onnx.save(model, tmp)
        parity = check_parity(gm, tmp, example_args) if check else None
    return ExportReport(Path(path), Path(path).stat().st_size, parity, exporter, reason)


def to_onnx_model(
    gm: fx.GraphModule, example_args: tuple, *, input_names, dynamic_axes: tuple, opset: int
) -> tuple[onnx.ModelProto, str]:
    """The ONNX ModelProto of a converted graph and the exporter that wrote it; `dynamic_axes` as in
    `eightbit.graph.capture.DynamicAxes`.  Graphs whose every op has a direct handler are emitted directly;
    others go through the dynamo exporter (~10 s more on a ResNet-50)."""
    model, exporter, _ = _onnx_model(gm, example_args, input_names=input_names, dynamic_axes=dynamic_axes, opset=opset)
    return model, exporter


def _onnx_model(gm, example_args, *, input_names, dynamic_axes: tuple, opset: int) -> tuple[onnx.ModelProto, str, str]:
    """`to_onnx_model`, plus one line on why the direct path was not taken ('' when it was)."""
    try:
        direct = emit_model(gm, example_args, input_names=input_names, dynamic_axes=dynamic_axes, opset=opset)
        return direct, DIRECT, ""
    except Unsupported as exc:
        reason = f"the direct ONNX emitter cannot write {exc}"
    except Exception as exc:  # a handler bug must not stop the export: the dynamo path is slower, not worse
        reason = f"direct ONNX emission failed ({exc!r})"
    warnings.warn(f"eightbit: {reason}; using the dynamo exporter (slower, same model)", stacklevel=3)
    model = _dynamo_model(gm, example_args, input_names=input_names, dynamic_axes=dynamic_axes, opset=opset)
    return model, DYNAMO, reason


def _dynamo_model(gm: fx.GraphModule, example_args: tuple, *, input_names, dynamic_axes: tuple, opset: int):
    from eightbit.graph.capture import export_dynamic_shapes

    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        shapes = export_dynamic_shapes(dynamic_axes) if any(dynamic_axes) else None
        program = torch.export.export(gm, tuple(example_args), dynamic_shapes=shapes)
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            custom_translation_table=ops.ONNX_TRANSLATIONS,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    model = onnx_program.model_proto
    _rename_io(model, input_names, dynamic_axes)
    for node in model.graph.node:  # exporter stack traces: ~5% of the file, useless at run time
        del node.metadata_props[:]
    model.producer_name = "eightbit"
    return model


def _rename_io(model: onnx.ModelProto, input_names: list[str], dynamic_axes: tuple) -> None:
    """Name inputs after forward()'s parameters, outputs output/output_i, and dynamic dims batch/sequence."""
    renames, dim_names = {}, {}
    for value, axes in zip(model.graph.input, dynamic_axes, strict=False):
        for axis, name in (axes or {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param:
                dim_names[dim.dim_param] = name
    for value, name in zip(model.graph.input, input_names, strict=False):
        renames[value.name] = name
    outputs = model.graph.output
    for i, value in enumerate(outputs):
        renames[value.name] = "output" if len(outputs) == 1 else f"output_{i}"
    for value in [*model.graph.input, *model.graph.output]:
        value.name = renames.get(value.name, value.name)
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in dim_names:
                dim.dim_param = dim_names[dim.dim_param]
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def export_float(
    model: torch.nn.Module, example_args: tuple, path, *, input_names=("input",), overwrite: bool = False
) -> Path:
    """The float model as ONNX with a dynamic batch axis, through the same exporter as the int8 model (the fp32
    reference for accuracy and speed comparisons).  Written atomically."""
    from eightbit.graph.capture import _with_batch, default_dynamic_axes

    example = _with_batch(tuple(example_args), 2)  # export specialises a batch of 1
    axes = default_dynamic_axes(example)
    model_proto = _dynamo_model(
        model.eval(), example, input_names=list(input_names), dynamic_axes=axes, opset=DEFAULT_OPSET
    )
    with atomic_path(path, overwrite) as tmp:
        onnx.save(model_proto, tmp)
    return Path(path)


def check_parity(gm: fx.GraphModule, path, example_args: tuple) -> ParityReport:
    """Run the ONNX file in ONNX Runtime and compare with the simulated PyTorch model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), example_args, strict=False)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = gm(*example_args)
    want = [w.numpy() for w in torch.utils._pytree.tree_leaves(want) if isinstance(w, torch.Tensor)]
    worst, worst_steps, off = 0.0, 0.0, 0.0
    for g, w in zip(got, want, strict=True):
        diff = np.abs(g.astype(np.float64) - w)
        step = max(float(w.max() - w.min()) / 255.0, 1e-12)
        worst = max(worst, float(diff.max()))
        worst_steps = max(worst_steps, float(diff.max()) / step)
        off = max(off, float((diff > step).mean()))
    return ParityReport(worst, worst_steps, off)
