"""The state and registry behind direct ONNX emission (`eightbit.export.emit`).

An `Emitter` holds the ONNX nodes and initializers being written and the ONNX value name of each FX node.
Handlers, one per ATen op, live in `handlers_nn` (quantization, layers, elementwise math) and
`handlers_tensor` (shapes, indexing, masks, reductions) and register themselves in `HANDLERS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import fx

aten = torch.ops.aten


class Unsupported(Exception):
    """The graph holds an op (or an op variant) without a direct handler."""


class Emitter:
    """State of one emission: ONNX nodes and initializers, and the ONNX value name of each FX node."""

    def __init__(self, gm: fx.GraphModule, meta: dict):
        self.gm = gm
        self.meta = meta
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: dict[fx.Node, str] = {}
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def add(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def constant(self, value, dtype=None, hint: str = "const") -> str:
        array = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value, dtype=dtype)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, values) -> str:
        return self.constant(np.asarray(list(values), dtype=np.int64), hint="ints")

    def value(self, arg, like: torch.dtype | None = None) -> str:
        """The ONNX name of an FX node, or a new constant for a Python number (in dtype `like`)."""
        if isinstance(arg, fx.Node):
            return self.names[arg]
        if isinstance(arg, (int, float, bool)):
            return self.constant(arg, dtype=_np_dtype(like or torch.float32))
        raise Unsupported(f"argument {arg!r}")

    def dtype(self, arg) -> torch.dtype | None:
        meta = self.meta.get(arg) if isinstance(arg, fx.Node) else None
        return meta.dtype if isinstance(meta, torch.Tensor) else None

    def rank(self, arg) -> int:
        meta = self.meta.get(arg)
        if not isinstance(meta, torch.Tensor):
            raise Unsupported(f"no tensor shape for {arg}")
        return meta.dim()

    def cast_to(self, arg, dtype: torch.dtype) -> str:
        """`arg` as an ONNX value of `dtype` (a cast only when it differs)."""
        if not isinstance(arg, fx.Node):
            return self.value(arg, like=dtype)
        if self.dtype(arg) == dtype:
            return self.names[arg]
        return self.add("Cast", [self.names[arg]], "cast", to=_onnx_dtype(dtype))

    def shape_list(self, sizes) -> str:
        """A shape argument (ints and symbolic sizes) as a 1-D int64 ONNX value."""
        if all(isinstance(s, int) for s in sizes):
            return self.ints(sizes)
        parts = [self.ints([s]) if isinstance(s, int) else self.names[s] for s in sizes]
        return self.add("Concat", parts, "shape", axis=0)


Handler = Callable[[Emitter, fx.Node], str | None]
HANDLERS: dict[object, Handler] = {}


def handles(*targets):
    def register(fn: Handler) -> Handler:
        for target in targets:
            HANDLERS[target] = fn
        return fn

    return register


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _np_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


def _onnx_dtype(dtype: torch.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(_np_dtype(dtype))
