"""Calibration batches -> model inputs: the one place where a batch becomes forward()'s positional inputs.

A batch is a tensor (or array), a tuple/list of positional inputs, or a dict of keyword inputs; `input_fn`, when
given, maps each calibration batch to one of those first (as NNCF's `transform_fn`: `input_fn=lambda b: b[0]`
for a DataLoader of `(inputs, labels)` pairs).  `InputBinder` binds it to forward()'s signature by name (dict keys
that forward() does not name go to its **kwargs).  The first batch fixes the `CallPlan`: its tensor arguments are
the captured graph's positional inputs, named after their parameters; every other argument (bools, numbers, None,
config objects) is a constant of the capture that later calls may leave out but never change.  A decoder's KV
cache is turned off (`use_cache=False`).  The binder refuses what would calibrate a silently wrong model:

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
import keyword
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from eightbit.calibration.calibrate import as_model_inputs

InputFn = Callable[[object], object]
LABEL_FIX = "input_fn=lambda batch: batch[0]"
_HALF = (torch.float16, torch.bfloat16)
_CAST = (torch.float16, torch.bfloat16, torch.float64)


def float32_model(model: nn.Module) -> tuple[nn.Module, str, torch.dtype | None]:
    """`model`, or a float32 CPU copy of it when it holds float16/bfloat16 weights (calibration statistics and int8
    scales are computed in float32; an fp16 graph would also export Q/DQ that ONNX Runtime rejects) or lives on
    an accelerator (eightbit calibrates on the CPU, where the int8 model runs).  Returns the model, a note for
    the summary ('' when nothing changed) and the half dtype converted from (or None).  The user's model is
    never modified or moved."""
    tensors = [*model.parameters(), *model.buffers()]
    devices = sorted({str(t.device) for t in tensors})
    if "meta" in devices:
        raise ValueError(
            "the model has parameters on the meta device, which hold no values: load its weights first "
            "(e.g. model.to_empty(device='cpu') then load_state_dict, or load_state_dict(..., assign=True))"
        )
    off_cpu = [d for d in devices if d != "cpu"]
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    half = sorted(str(d).removeprefix("torch.") for d in dtypes if d in _HALF)
    notes = []
    if off_cpu:
        notes.append(
            f"model is on {'/'.join(off_cpu)}: calibrated and quantized on a CPU copy (int8 runs on CPU runtimes); "
            "calibration inputs are moved to the CPU, and your model stays where it is"
        )
    if half:
        notes.append(
            f"model weights are {'/'.join(half)}: calibrated and quantized in float32; the int8 model takes "
            "float32 inputs"
        )
    if not notes:
        return model, "", None
    note = "; ".join(notes)
    warnings.warn(f"eightbit: {note}", UserWarning, stacklevel=3)
    copied = copy.deepcopy(model).cpu()
    return (copied.float() if half else copied), note, next((d for d in _HALF if d in dtypes), None)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


class InputBinder:
    """Binds calibration batches (and example inputs) to `model.forward`; see the module docstring.  `plan` (the
    `CallPlan` of the first batch bound) says which arguments are graph inputs and which are constants."""

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
        self.plan: CallPlan | None = None
        self.names: list[str] | None = None

    def example(self, example_inputs) -> tuple:
        """Explicit example inputs (model inputs, not a calibration batch: `input_fn` does not apply)."""
        args, kwargs = as_model_inputs(example_inputs)
        return self._bind(args, kwargs, "example_inputs", trusted=True)

    def batch(self, batch, index: int) -> tuple:
        """Calibration batch number `index` (counted from 0, as the user's data yields them) as the graph's
        tensor inputs."""
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
        arguments = bind_arguments(self._signature, bound, where)
        if self.plan is None:
            planned = _without_cache(self._signature, arguments)
            self.plan = CallPlan(self._signature, planned)
            self.plan.cache_disabled = len(planned) > len(arguments)
            self.names = list(self.plan.names)
        return self.plan.inputs(arguments, where)

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
        model keeps its inputs.  Tensors on an accelerator come to the CPU, where the model is calibrated."""
        args = tuple(a.cpu() if isinstance(a, torch.Tensor) and a.device.type != "cpu" else a for a in args)
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


# --- forward()'s call as captured: tensor arguments are graph inputs, everything else a constant -----------------


@dataclass(frozen=True)
class Argument:
    """One argument of a forward() call: its name (the parameter, the `**kwargs` key, or `input_<i>` for an item
    of `*args`), its value, and whether it is passed positionally."""

    name: str
    value: object
    positional: bool
    extra: bool = False  # went to forward()'s **kwargs (no parameter of that name)


def bind_arguments(signature: inspect.Signature, bound: inspect.BoundArguments, where: str) -> list[Argument]:
    """The arguments of `bound` in forward()'s order, without defaults (forward() fills those in itself).
    Parameters are passed positionally up to the first one left out, by keyword after it."""
    out: list[Argument] = []
    positional = True
    for name, param in signature.parameters.items():
        if name not in bound.arguments:
            positional = positional and param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
            continue
        value = bound.arguments[name]
        if param.kind is param.VAR_POSITIONAL:
            out += [Argument(f"input_{len(out)}", v, True) for v in value]
        elif param.kind is param.VAR_KEYWORD:
            out += [Argument(str(k), v, False, extra=True) for k, v in value.items()]
        else:
            keyword_only = param.kind is param.KEYWORD_ONLY
            out.append(Argument(name, value, positional and not keyword_only))
    for a in out:
        if not isinstance(a.value, torch.Tensor) and _holds_tensors(a.value):
            raise TypeError(
                f"{where}: input {a.name!r} is a {type(a.value).__name__} holding tensors; eightbit binds tensors "
                "and constants (bools, numbers, None, configs) only: pass each tensor as its own input"
                + (
                    " (for a KV cache: quantize with use_cache=False and no past_key_values)"
                    if "past" in a.name
                    else ""
                )
            )
    return out


def _holds_tensors(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) or _holds_tensors(v) for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, torch.Tensor) or _holds_tensors(v) for v in value.values())
    is_cache = any(c.__name__.endswith("Cache") for c in type(value).__mro__)  # transformers' Cache objects
    return is_cache or any(isinstance(v, torch.Tensor) for v in getattr(value, "__dict__", {}).values())


CACHE_NOTE = (
    "use_cache=False: the model was captured without its KV cache (past_key_values); the int8 model computes "
    "every position of its input on each call"
)


def _without_cache(signature: inspect.Signature, arguments: list[Argument]) -> list[Argument]:
    """A decoder's KV cache cannot be captured (a Cache object is neither a tensor nor a constant): when forward()
    has a `use_cache` parameter that the inputs leave unset, capture with use_cache=False; use_cache=True is
    refused with the way out."""
    given = {a.name: a.value for a in arguments}
    if "use_cache" not in signature.parameters:
        return arguments
    if given.get("use_cache"):
        raise ValueError(
            "use_cache=True makes forward() build and return a KV cache (past_key_values), which a captured graph "
            "can neither return nor take back; leave use_cache out of the inputs (eightbit then captures with "
            "use_cache=False) or pass use_cache=False"
        )
    if "use_cache" in given:
        return arguments
    return [*arguments, Argument("use_cache", False, False)]


def kv_cache_notes(model: nn.Module, plan: CallPlan, tensors: tuple) -> list[str]:
    """The summary note when eightbit turned a KV cache off that the model would have built (GPT-2, Llama: not
    BERT, whose forward() also has use_cache): one float run of the model as the user would call it."""
    if not plan.cache_disabled:
        return []
    was_training = model.training
    try:
        model.eval()  # dropout off, BatchNorm statistics untouched; the mode is restored below
        with torch.no_grad():
            out = plan.call(model.forward, tensors, leave_out=("use_cache",))
    except Exception:
        return [CACHE_NOTE]
    finally:
        model.train(was_training)
    cache = out.get("past_key_values") if isinstance(out, Mapping) else getattr(out, "past_key_values", None)
    return [CACHE_NOTE] if cache is not None else []


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # objects whose == is not a bool
        return False


class CallPlan:
    """How the captured graph's positional tensor inputs become a call of the user's forward(): the tensors in
    graph order (`names`), and the non-tensor arguments fixed as constants of the capture (`constants`)."""

    def __init__(self, signature: inspect.Signature, arguments: list[Argument]):
        self.signature = signature
        self._layout = [(a.name, a.positional, isinstance(a.value, torch.Tensor)) for a in arguments]
        self.names = tuple(a.name for a in arguments if isinstance(a.value, torch.Tensor))
        self.constants = {a.name: a.value for a in arguments if not isinstance(a.value, torch.Tensor)}
        self.extras = frozenset(a.name for a in arguments if a.extra)  # inputs that went to **kwargs
        self.cache_disabled = False  # use_cache=False was added by eightbit (see `kv_cache_notes`)
        if not self.names:
            raise TypeError(
                f"forward{signature} got no tensor inputs (only {sorted(self.constants) or 'nothing'}); pass the "
                "model's input tensors (a tensor, a tuple of positional inputs or a dict of keyword inputs)"
            )

    def call(self, forward: Callable, tensors: tuple, *, leave_out: tuple[str, ...] = ()):
        """forward() called with `tensors` (graph order) and the constants, each as it was passed at capture
        (except the constants named in `leave_out`)."""
        values = iter(tensors)
        args, kwargs = [], {}
        for name, positional, is_tensor in self._layout:
            if name in leave_out and not is_tensor:
                continue
            value = next(values) if is_tensor else self.constants[name]
            if positional:
                args.append(value)
            else:
                kwargs[name] = value
        return forward(*args, **kwargs)

    def __deepcopy__(self, memo) -> CallPlan:
        # Immutable once made; the constants are the user's objects (a config compared by identity must stay it).
        return self

    def graph_inputs(self, args: tuple, kwargs: dict) -> tuple:
        """The graph inputs of a call of the quantized model with forward()'s own arguments."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"this model takes forward{self.signature} (tensor inputs {list(self.names)}): {exc}"
            ) from None
        return self.inputs(bind_arguments(self.signature, bound, "this call"), "this call")

    def inputs(self, arguments: list[Argument], where: str) -> tuple:
        """The graph inputs of another call of the same forward(): every captured tensor input, by name; a
        constant may be left out or repeated, never changed."""
        given = {a.name: a.value for a in arguments}
        missing = [n for n in self.names if not isinstance(given.get(n), torch.Tensor)]
        if missing:
            got = {n: _describe(given[n]) for n in missing if n in given}
            raise TypeError(
                f"{where} lacks the input{'s' if len(missing) > 1 else ''} {missing}"
                + (f" (got {got})" if got else "")
                + f"; the model was captured with the tensor inputs {list(self.names)}"
            )
        for name, value in given.items():
            if name not in self.names:
                self._check_constant(name, value, where)
        return tuple(given[n] for n in self.names)

    def _check_constant(self, name: str, value, where: str) -> None:
        param = self.signature.parameters.get(name)
        default = param.default if param is not None and param.default is not param.empty else inspect.Parameter.empty
        if isinstance(value, torch.Tensor):
            raise TypeError(
                f"{where} gives the tensor input {name!r}, which the model was not captured with (it was "
                f"{_describe(self.constants[name]) if name in self.constants else 'not given'}), so the int8 graph "
                f"has no input for it; its inputs are {list(self.names)}. Pass {name!r} in the calibration batches "
                "to quantize with it"
            )
        fixed = self.constants.get(name, default)
        if name not in self.constants and default is inspect.Parameter.empty:
            raise TypeError(
                f"{where} gives {name!r}, which forward() received neither at capture nor as a default; the model's "
                f"inputs are {list(self.names)}"
            )
        if not _same(value, fixed):
            how = "was fixed at capture" if name in self.constants else "was left at its default at capture"
            raise ValueError(
                f"{where} passes {name}={value!r}, but {name!r} is not a tensor, so it {how} as {fixed!r} and is "
                "part of the int8 graph; leave it out, or quantize again with the value you need"
            )

    def module(self, model: nn.Module) -> nn.Module:
        """A view of `model` (same submodules, parameters and names; `model` itself is not changed) whose
        forward() takes the tensor inputs positionally, in graph order, and calls `model.forward` as planned."""
        params = _identifiers(self.names)
        plan, cls = self, type(model)
        source = f"def forward(self, {', '.join(params)}):\n    return _call(self, ({', '.join(params)},))\n"
        scope = {"_call": lambda self, tensors: plan.call(super(bound, self).forward, tensors)}
        exec(source, scope)  # a real signature: export names the graph's inputs after it
        bound = type(cls.__name__, (cls,), {"forward": scope["forward"], "__module__": cls.__module__})
        bound.__qualname__ = cls.__qualname__
        view = object.__new__(bound)
        view.__dict__.update(model.__dict__)
        return view


def _identifiers(names) -> list[str]:
    """Python parameter names for `names` (a **kwargs key may be any string)."""
    out = []
    for i, name in enumerate(names):
        ok = name.isidentifier() and not keyword.iskeyword(name) and name not in ("self", "_call") and name not in out
        out.append(name if ok else f"input_{i}")
    return out


def check_inputs_used(gm, plan: CallPlan) -> None:
    """Inputs that went to forward()'s **kwargs and that the captured graph never reads were most likely
    misspelled or meant for another model: refused, by name."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    unused = [name for name, node in zip(plan.names, placeholders, strict=False) if not _readers(node)]
    unused = [n for n in unused if n in plan.extras]
    if unused:
        params = [n for n, p in plan.signature.parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        raise ValueError(
            f"the inputs {unused} went to forward()'s **kwargs and the model does not use them (forward() names "
            f"{params}); remove them from the batches (or fix their names)"
        )


def _readers(node) -> list:
    """The nodes that read `node`, apart from torch.export's input guards."""
    return [u for u in node.users if not (u.op == "call_module" and str(u.target).startswith("_guards"))]
