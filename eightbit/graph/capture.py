"""Model capture: one working IR, the ATen-level FX graph produced by `torch.export`.

The user's model is deep-copied first, so nothing done to the graph (BN folding, new buffers) can touch it.
The batch axis is captured as dynamic.  Where `torch.export` cannot capture a model for a reason other than
data-dependent control flow, capture falls back to `torch.fx.experimental.proxy_tensor.make_fx` (the same
ATen IR, traced with static shapes) and says so; data-dependent control flow is refused with advice, because
tracing it would silently freeze one branch.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn


class CaptureError(RuntimeError):
    """The model could not be turned into a graph; the message says why and what to do."""


class CaptureMethod(enum.Enum):
    EXPORT = "torch.export"
    MAKE_FX = "torch.fx (make_fx, static shapes)"


# Per positional input: axis -> name of the dynamic dimension ("batch", "sequence"), or None for a static input.
DynamicAxes = tuple


@dataclass
class Captured:
    """A captured graph and how it was obtained."""

    graph_module: fx.GraphModule
    method: CaptureMethod
    dynamic_axes: DynamicAxes
    note: str = ""

    @property
    def dynamic_batch(self) -> bool:
        return any(axes and 0 in axes for axes in self.dynamic_axes)


def default_dynamic_axes(args: tuple, *, sequence: bool = True) -> DynamicAxes:
    """Axis 0 of every tensor input is the batch; axis 1 of integer/bool rank-2 inputs (token ids, attention
    masks) is the sequence."""

    def axes(a):
        if not isinstance(a, torch.Tensor) or a.dim() == 0:
            return None
        tokens = sequence and a.dim() == 2 and not a.is_floating_point()
        return {0: "batch", 1: "sequence"} if tokens else {0: "batch"}

    return tuple(axes(a) for a in args)


def export_dynamic_shapes(axes: DynamicAxes):
    """`torch.export` dynamic_shapes for `axes`: one shared batch Dim; the sequence length is left for export
    to bound (e.g. at a model's maximum number of positions)."""
    batch = torch.export.Dim("batch")
    dims = {"batch": batch, "sequence": torch.export.Dim.AUTO}
    return tuple(None if a is None else {i: dims[name] for i, name in a.items()} for a in axes)


_DATA_DEPENDENT_MARKERS = (
    "data-dependent",
    "GuardOnDataDependentSymNode",
    "data dependent",
    "Dynamic control flow",
)


def _with_batch(args: tuple, size: int) -> tuple:
    """Copies of the tensor arguments with batch size `size` (a batch of 1 would be specialised by export)."""

    def grow(a):
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] < size:
            return a.repeat(size, *([1] * (a.dim() - 1)))[:size]
        return a

    return tuple(grow(a) for a in args)


def capture(model: nn.Module, example_args: tuple, *, names: list[str] | None = None) -> Captured:
    """Capture `model` (never modified) as an ATen FX graph, called with positional `example_args` (`names`:
    what the user calls them, for messages).

    Tries a dynamic batch and sequence axis (see `default_dynamic_axes`), then a dynamic batch only, then
    static shapes, then make_fx."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    _check_runs(model, tuple(example_args), names)
    errors = []
    # A batch of 1 would be specialised by export, so the dynamic attempts use a batch of 2; the static
    # fallback keeps the example's own batch size (a saved program may only accept that one).
    grown = _with_batch(tuple(example_args), 2)
    attempts = [(grown, default_dynamic_axes(grown)), (grown, default_dynamic_axes(grown, sequence=False))]
    attempts = [a for i, a in enumerate(attempts) if a not in attempts[:i]]
    attempts.append((tuple(example_args), tuple(None for _ in example_args)))
    for args_i, axes in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(model, args_i, dynamic_shapes=export_dynamic_shapes(axes))
            note = "" if any(axes) else f"shapes captured static: {_first_line(errors[-1])}"
            return Captured(program.module(), CaptureMethod.EXPORT, axes, note)
        except Exception as exc:  # torch.export raises many unrelated types
            _raise_if_data_dependent(exc)
            errors.append(exc)
    return _capture_make_fx(model, tuple(example_args), errors[-1])


def _check_runs(model: nn.Module, args: tuple, names: list[str] | None = None) -> None:
    """Run the model once in float: an input it cannot take is the input's fault, not the tracer's."""
    try:
        with torch.no_grad():
            out = model(*args)
    except Exception as exc:
        names = list(names or [])[: len(args)] + [f"input {i}" for i in range(len(names or []), len(args))]
        shapes = ", ".join(
            f"{name}: {list(a.shape)} {str(a.dtype).replace('torch.', '')}"
            if isinstance(a, torch.Tensor)
            else f"{name}: {type(a).__name__}"
            for name, a in zip(names, args, strict=True)
        )
        raise CaptureError(
            f"the model fails on the example inputs ({shapes}) before any capture: "
            f"{_first_line(exc)}. This is a problem of the input form, not of tracing: check the names, number, "
            "shape and dtype of the inputs each calibration batch gives forward() (a dict binds by name; "
            "keys forward() does not name go to its **kwargs); if your batches carry labels too, select the inputs."
        ) from exc
    _register_output_dataclasses(out)


def _register_output_dataclasses(value) -> None:
    """Plain dataclasses in the model's output become pytree nodes, so that the graph returns them as the
    model does (torch.export refuses types it cannot flatten; transformers registers its ModelOutputs itself)."""
    pytree = torch.utils._pytree
    if isinstance(value, (list, tuple)):
        for v in value:
            _register_output_dataclasses(v)
    elif isinstance(value, dict):
        for v in value.values():
            _register_output_dataclasses(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        if type(value) not in pytree.SUPPORTED_NODES:
            torch.export.register_dataclass(type(value))
        for f in dataclasses.fields(value):
            _register_output_dataclasses(getattr(value, f.name))


def _capture_make_fx(model: nn.Module, args: tuple, export_error: Exception) -> Captured:
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        gm = make_fx(lambda *a: model(*a), pre_dispatch=True)(*args)
    except Exception as exc:
        _raise_if_data_dependent(exc)
        raise CaptureError(
            f"could not capture the model: torch.export failed with {_first_line(export_error)!r} and the "
            f"torch.fx fallback failed with {_first_line(exc)!r}. Make forward() traceable (tensor inputs and "
            "outputs, no Python side effects), or quantize a traceable submodule."
        ) from exc
    note = f"torch.export failed ({_first_line(export_error)}); captured with make_fx, shapes are static"
    warnings.warn(f"eightbit: {note}", stacklevel=3)
    return Captured(gm, CaptureMethod.MAKE_FX, tuple(None for _ in args), note)


def _raise_if_data_dependent(exc: Exception) -> None:
    text = f"{type(exc).__name__}: {exc}"
    if any(marker in text for marker in _DATA_DEPENDENT_MARKERS):
        raise CaptureError(
            "the model has data-dependent control flow (a Python `if`/`while` on tensor values), which no "
            "graph capture can represent faithfully. Rewrite it with torch.where or torch.cond, move the branch "
            f"out of forward(), or quantize only a submodule without it. torch.export said: {_first_line(exc)}"
        ) from exc


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
