"""Model capture: one working IR, the ATen-level FX graph produced by `torch.export`.

The user's model is deep-copied first, so nothing done to the graph (BN folding, new buffers) can touch it.
The batch axis is captured as dynamic.  Where `torch.export` cannot capture a model for a reason other than
data-dependent control flow, capture falls back to `torch.fx.experimental.proxy_tensor.make_fx` (the same
ATen IR, traced with static shapes) and says so; data-dependent control flow is refused with advice, because
tracing it would silently freeze one branch.
"""

from __future__ import annotations

import copy
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


@dataclass
class Captured:
    """A captured graph and how it was obtained."""

    graph_module: fx.GraphModule
    method: CaptureMethod
    dynamic_batch: bool
    note: str = ""


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


def _batch_shapes(args: tuple, kwargs: dict, batch: torch.export.Dim) -> tuple:
    spec_args = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
    spec_kwargs = {k: ({0: batch} if isinstance(v, torch.Tensor) and v.dim() > 0 else None) for k, v in kwargs.items()}
    return spec_args, spec_kwargs


def capture(model: nn.Module, example_args: tuple, example_kwargs: dict | None = None) -> Captured:
    """Capture `model` (never modified) as an ATen FX graph with a dynamic batch axis where possible."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    kwargs = dict(example_kwargs or {})
    model = copy.deepcopy(model).eval()
    errors = []
    batch = torch.export.Dim("batch")
    # A batch of 1 would be specialised by export, so the dynamic attempt uses a batch of 2; the static
    # fallback keeps the example's own batch size (a saved program may only accept that one).
    grown_args = _with_batch(tuple(example_args), 2)
    grown_kwargs = dict(zip(kwargs, _with_batch(tuple(kwargs.values()), 2), strict=True))
    spec_args, spec_kwargs = _batch_shapes(grown_args, grown_kwargs, batch)
    attempts = [
        (grown_args, grown_kwargs, _merge_shapes(model, spec_args, spec_kwargs)),
        (tuple(example_args), kwargs, None),
    ]
    for args_i, kwargs_i, shapes in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(model, args_i, kwargs_i, dynamic_shapes=shapes)
            dynamic = shapes is not None
            note = "" if dynamic else f"batch axis captured static: {_first_line(errors[-1])}"
            return Captured(program.module(), CaptureMethod.EXPORT, dynamic, note)
        except Exception as exc:  # torch.export raises many unrelated types
            _raise_if_data_dependent(exc)
            errors.append(exc)
    return _capture_make_fx(model, tuple(example_args), kwargs, errors[-1])


def _merge_shapes(model: nn.Module, spec_args: tuple, spec_kwargs: dict):
    if not spec_kwargs:
        return spec_args
    import inspect

    names = list(inspect.signature(model.forward).parameters)
    return {**dict(zip(names, spec_args, strict=False)), **spec_kwargs}


def _capture_make_fx(model: nn.Module, args: tuple, kwargs: dict, export_error: Exception) -> Captured:
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        gm = make_fx(lambda *a: model(*a, **kwargs), pre_dispatch=True)(*args)
    except Exception as exc:
        _raise_if_data_dependent(exc)
        raise CaptureError(
            f"could not capture the model: torch.export failed with {_first_line(export_error)!r} and the "
            f"torch.fx fallback failed with {_first_line(exc)!r}. Make forward() traceable (tensor inputs and "
            "outputs, no Python side effects), or quantize a traceable submodule."
        ) from exc
    note = f"torch.export failed ({_first_line(export_error)}); captured with make_fx, shapes are static"
    warnings.warn(f"eightbit: {note}", stacklevel=3)
    return Captured(gm, CaptureMethod.MAKE_FX, False, note)


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
