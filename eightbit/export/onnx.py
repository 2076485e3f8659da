"""ONNX export of a converted graph: standard QuantizeLinear/DequantizeLinear with int8 initializers.

The converted FX graph is written directly by `eightbit.export.emit` (one handler per ATen op).  A graph with
an op it has no handler for is re-captured with `torch.export` and handed to the dynamo ONNX exporter, with
the Q/DQ handlers in `eightbit.graph.ops`.  Every export is checked: ONNX Runtime runs the file and its outputs are
compared with the PyTorch simulation, in quantization steps, and a file that disagrees by more than
`PARITY_MAX_STEPS` is refused (`ParityError`) rather than written.
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
from eightbit.fileio import atomic_path, check_output_path
from eightbit.graph import ops
from eightbit.graph.utils import output_names

DEFAULT_OPSET = 20
DIRECT = "eightbit"  # eightbit.export.emit: one handler per ATen op, no re-capture
DYNAMO = "torch.onnx (dynamo)"  # the fallback for graphs with ops that emit has no handler for

# The exporter logs a warning per missing torchvision op on every export; eightbit never uses torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


# Healthy exports differ from the simulation only by the runtime's own requantization rounding: at most 4.4 output
# steps in every test and demo (MiniLM 4.41, EfficientNet-Lite0 3.10-3.32); broken ones (a negated or random
# weight tensor, a 2x or 1.1x activation scale, a shifted zero point, Add written as Sub) measured 10.5 to 2e5.
PARITY_MAX_STEPS = 10.0


@dataclass
class ParityReport:
    """How far ONNX Runtime's outputs are from the PyTorch simulation of the same int8 model."""

    max_abs_diff: float
    max_steps: float  # max_abs_diff in units of the output's 8-bit step (its range, including 0, / 255)
    mismatched_fraction: float  # share of output values more than one step away

    @property
    def passed(self) -> bool:
        """Whether the file runs as the simulated model (False for NaN: a comparison that could not be made)."""
        return self.max_steps <= PARITY_MAX_STEPS

    def __str__(self) -> str:
        return (
            f"ONNX Runtime vs PyTorch simulation: max |diff| {self.max_abs_diff:.3g} = {self.max_steps:.2f} steps, "
            f"{100 * self.mismatched_fraction:.2f}% of values off by more than one step"
        )


class ParityError(RuntimeError):
    """ONNX Runtime runs the exported file differently from the simulated int8 model; `report` says by how much."""

    def __init__(self, report: ParityReport, path) -> None:
        super().__init__(
            f"{path} was not written: ONNX Runtime does not run it as the int8 model eightbit simulates. {report} "
            f"(more than {PARITY_MAX_STEPS:g} steps: the file does not compute that model, e.g. a wrong scale, weight "
            "or op, or a runtime kernel that saturates). Please report it with the model; to write the file anyway, "
            "pass check=False (CLI: --no-parity-check)."
        )
        self.report = report


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
    """Write `gm` to `path` as ONNX (atomically) and, if `check`, compare ONNX Runtime with PyTorch: a file off by
    more than `PARITY_MAX_STEPS` raises `ParityError` and is not written (an existing file at `path` is kept).

    float16: store weights and compute in float16 (inputs and outputs stay float32)."""
    check_output_path(path, overwrite)  # before the export work
    model, exporter, reason = _onnx_model(
        gm, example_args, input_names=input_names, dynamic_axes=dynamic_axes, opset=opset
    )
    if float16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
    with atomic_path(path, overwrite) as tmp:
        onnx.save(model, tmp)
        parity = check_parity(gm, tmp, example_args) if check else None
        if parity is not None and not parity.passed:
            raise ParityError(parity, path)
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
    _rename_io(model, input_names, dynamic_axes, output_names(gm) if isinstance(gm, fx.GraphModule) else None)
    for node in model.graph.node:  # exporter stack traces: ~5% of the file, useless at run time
        del node.metadata_props[:]
    model.producer_name = "eightbit"
    return model


def _rename_io(model: onnx.ModelProto, input_names: list[str], dynamic_axes: tuple, names=None) -> None:
    """Name inputs after forward()'s parameters, outputs after the model's output keys (`names`, when there is
    one per ONNX output) or output/output_i, and dynamic dims batch/sequence."""
    renames, dim_names = {}, {}
    for value, axes in zip(model.graph.input, dynamic_axes, strict=False):
        for axis, name in (axes or {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param:
                dim_names[dim.dim_param] = name
    for value, name in zip(model.graph.input, input_names, strict=False):
        renames[value.name] = name
    outputs = model.graph.output
    names = names if names is not None and len(names) == len(outputs) else None
    for i, value in enumerate(outputs):
        renames[value.name] = names[i] if names else "output" if len(outputs) == 1 else f"output_{i}"
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
        diff, step = _diff_and_step(g, w)
        worst = max(worst, float(diff.max(initial=0.0)))
        worst_steps = max(worst_steps, float(diff.max(initial=0.0)) / step)
        off = max(off, float((diff > step).mean()) if diff.size else 0.0)
    return ParityReport(worst, worst_steps, off)


def _diff_and_step(got: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, float]:
    """|got - want| and the output's 8-bit step.  The step spans the range extended to 0, as every eightbit range
    does, so a constant or one-sided output still has a step its size.  Values that are non-finite in one output
    only, or outputs of different shapes, count as infinitely far apart; NaN or inf in both at the same place
    agree."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return np.array([np.inf]), 1.0
    finite = np.isfinite(want)
    agree = (got == want) | (np.isnan(got) & np.isnan(want))
    if np.any(~np.isfinite(got) & ~agree) or np.any(~finite & ~agree):
        return np.array([np.inf]), 1.0
    got, want = got[finite], want[finite]
    if not want.size:
        return np.zeros(0), 1.0
    step = max((max(float(want.max()), 0.0) - min(float(want.min()), 0.0)) / 255.0, 1e-12)
    return np.abs(got - want), step
