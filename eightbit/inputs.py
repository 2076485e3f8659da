"""Calibration batches -> model inputs: the one place where a batch becomes forward()'s positional inputs.

A batch is a tensor (or array), a tuple/list of positional inputs, or a dict of keyword inputs; `input_fn`, when
given, maps each calibration batch to one of those first (as NNCF's `transform_fn`: `input_fn=lambda b: b[0]`
for a DataLoader of `(inputs, labels)` pairs).  `InputBinder` binds it to forward()'s signature, so the captured
graph is always called positionally, and refuses what would calibrate a silently wrong model:

- batch items that do not fit forward() (too many), or that bind only to optional parameters while they look
  like labels (a 1-D integer tensor of batch length): the message shows the `input_fn` that fixes it.  Batches
  that come through `input_fn` or as a dict are taken as the user's explicit choice.
- NaN/Inf, named by the user's batch index (calibration later merges small batches).
- a batch whose shape or dtype differs from the first batch's, other than along its dynamic axes.

Float inputs of another precision (float64, float16, bfloat16) are cast to the model's float dtype, with a
warning.  Integer image batches are not: whether 0..255 should become 0..1 or a normalized range is the user's
pipeline's decision, so `integer_image_error` names the fix instead (see `api._prepare`).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable

import torch
from torch import nn

from eightbit.calibration.calibrate import as_model_inputs

InputFn = Callable[[object], object]
LABEL_FIX = "input_fn=lambda batch: batch[0]"
_HALF = (torch.float16, torch.bfloat16)
_CAST = (torch.float16, torch.bfloat16, torch.float64)


def float32_model(model: nn.Module) -> tuple[nn.Module, str, torch.dtype | None]:
    """`model`, or a float32 copy of it when it holds float16/bfloat16 weights (calibration statistics and int8
    scales are computed in float32; an fp16 graph would also export Q/DQ that ONNX Runtime rejects).  Returns the
    model, a note for the summary ('' when nothing changed) and the half dtype converted from (or None).  The
    user's model is never modified."""
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    half = sorted(str(d).removeprefix("torch.") for d in dtypes if d in _HALF)
    if not half:
        return model, "", None
    note = (
        f"model weights are {'/'.join(half)}: calibrated and quantized in float32; the int8 model takes float32 inputs"
    )
    warnings.warn(f"eightbit: {note}", UserWarning, stacklevel=3)
    return copy.deepcopy(model).float(), note, next(d for d in _HALF if d in dtypes)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


class InputBinder:
    """Binds calibration batches (and example inputs) to `model.forward`; see the module docstring."""

    def __init__(self, model: nn.Module, input_fn: InputFn | None = None, *, model_dtype: torch.dtype | None = None):
        """model_dtype: the float dtype of the user's model when `model` is its float32 copy (inputs in that
        dtype are cast without a second warning)."""
        if input_fn is not None and not callable(input_fn):
            raise TypeError(f"input_fn must be a function from a calibration batch to model inputs, got {input_fn!r}")
        self._signature = inspect.signature(model.forward)
        self._input_fn = input_fn
        floats = [p.dtype for p in [*model.parameters(), *model.buffers()] if p.is_floating_point()]
        self._float = floats[0] if floats else torch.float32
        self._reference: tuple | None = None
        self._dynamic: tuple = ()
        self._warned: set[torch.dtype] = {model_dtype} if model_dtype is not None else set()
        self.names: list[str] | None = None

    def example(self, example_inputs) -> tuple:
        """Explicit example inputs (model inputs, not a calibration batch: `input_fn` does not apply)."""
        args, kwargs = as_model_inputs(example_inputs)
        return self._bind(args, kwargs, "example_inputs", trusted=True)

    def batch(self, batch, index: int) -> tuple:
        """Calibration batch number `index` (counted from 0, as the user's data yields them) as positional inputs."""
        trusted = self._input_fn is not None
        if trusted:
            batch = self._input_fn(batch)
        args, kwargs = as_model_inputs(batch)
        trusted = trusted or bool(kwargs)
        where = f"calibration batch {index}"
        bound = self._bind(args, kwargs, where, trusted=trusted)
        _check_finite(bound, where)
        if self._reference is not None:
            self._check_like_first(bound, where)
        return bound

    def expect(self, args: tuple, dynamic_axes: tuple) -> None:
        """Later batches must match `args` (the captured example) except along `dynamic_axes` and the batch axis."""
        self._reference, self._dynamic = args, dynamic_axes

    def _bind(self, args: tuple, kwargs: dict, where: str, *, trusted: bool) -> tuple:
        args, kwargs = self._cast(args), dict(zip(kwargs, self._cast(tuple(kwargs.values())), strict=True))
        params = self._signature.parameters
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
            self.names = self.names or [f"input_{i}" for i in range(len(args))]
            return args
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"{where} does not fit forward{self._signature}: {exc}. It has {len(args)} items "
                f"({', '.join(map(_describe, args))}){f' and keywords {sorted(kwargs)}' if kwargs else ''}. "
                f"If the batches are (inputs, labels) pairs, pass {LABEL_FIX}; in general input_fn maps a batch "
                "to a tensor, a tuple of positional inputs or a dict of keyword inputs"
            ) from None
        if not trusted:
            self._refuse_labels(args, bound, where)
        bound.apply_defaults()
        names, values = list(bound.arguments), tuple(bound.arguments.values())
        while values and values[-1] is None:  # trailing optional inputs left unset
            values, names = values[:-1], names[:-1]
        if self.names is None:
            self.names = [n for n, v in zip(names, values, strict=True) if isinstance(v, torch.Tensor)]
        return values

    def _refuse_labels(self, args: tuple, bound: inspect.BoundArguments, where: str) -> None:
        """A 1-D integer tensor of batch length bound to an optional parameter is almost surely a label."""
        first = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0 else None
        if first is None:
            return
        for name, value in list(bound.arguments.items())[1 : len(args)]:
            param = self._signature.parameters[name]
            looks_like_label = (
                isinstance(value, torch.Tensor)
                and value.dim() == 1
                and not value.is_floating_point()
                and value.shape[0] == first.shape[0]
            )
            if param.default is not param.empty and looks_like_label:
                raise ValueError(
                    f"{where} has {len(args)} items; item {list(bound.arguments).index(name)} "
                    f"({_describe(value)}) would be passed as forward()'s optional input {name!r}, but it looks "
                    f"like a label. If the batches are (inputs, labels) pairs, pass {LABEL_FIX}; if it is "
                    "an input, pass input_fn=lambda batch: batch (or a dict of keyword inputs) to say so"
                )

    def _cast(self, args: tuple) -> tuple:
        """Float inputs in another precision become float32, the model's dtype (one warning per dtype); a float64
        model keeps its inputs."""
        if self._float != torch.float32:
            return args
        out = []
        for a in args:
            if isinstance(a, torch.Tensor) and a.dtype in _CAST:
                if a.dtype not in self._warned:
                    self._warned.add(a.dtype)
                    warnings.warn(
                        f"eightbit: calibration inputs are {str(a.dtype).removeprefix('torch.')}; cast to "
                        "float32, the dtype the model is calibrated in",
                        UserWarning,
                        stacklevel=4,
                    )
                a = a.float()
            out.append(a)
        return tuple(out)

    def _check_like_first(self, args: tuple, where: str) -> None:
        ref = self._reference
        if len(args) != len(ref):
            raise ValueError(f"{where} has {len(args)} model inputs, the first batch had {len(ref)}")
        for i, (a, r) in enumerate(zip(args, ref, strict=True)):
            if not isinstance(r, torch.Tensor) or not isinstance(a, torch.Tensor):
                continue
            name = self.names[i] if self.names and i < len(self.names) else f"input {i}"
            if a.dtype != r.dtype:
                raise TypeError(
                    f"{where}: input {name!r} is {_describe(a)}, but the first batch's is {_describe(r)}; every "
                    "batch must have the same dtypes (convert them in input_fn, as the model's inputs will be)"
                )
            free = set((self._dynamic[i] or {}) if i < len(self._dynamic) else {}) | {0}
            fixed = [d for d in range(a.dim()) if d not in free]
            if a.dim() != r.dim() or any(a.shape[d] != r.shape[d] for d in fixed):
                raise ValueError(
                    f"{where}: input {name!r} has shape {tuple(a.shape)}, but the first batch's is "
                    f"{tuple(r.shape)}; only the batch axis{' and the sequence axis' if len(free) > 1 else ''} "
                    "may change between batches (resize or pad the samples as the model will see them)"
                )


def _check_finite(args: tuple, where: str) -> None:
    for value in args:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(
                f"{where} contains NaN or Inf; remove or repair those samples "
                "(calibration ranges computed from them would be meaningless)"
            )


def integer_image_error(args: tuple, names: list[str] | None) -> TypeError | None:
    """The error for integer image-like inputs (rank >= 3) that the float model could not take, or None."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() >= 3 and not a.is_floating_point() and a.dtype != torch.bool:
            name = names[i] if names and i < len(names) else f"input {i}"
            return TypeError(
                f"input {name!r} is an integer image batch ({_describe(a)}) but the model computes in float. "
                "eightbit does not guess its scaling (0..255 or normalized): convert it as your training "
                "pipeline does, e.g. input_fn=lambda batch: batch.float() / 255 (then normalize), or "
                "input_fn=lambda batch: batch.float() if the model expects 0..255"
            )
    return None
