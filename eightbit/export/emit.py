"""Direct ONNX emission of a converted graph: one small handler per ATen op, no re-capture.

The dynamo exporter re-captures the graph with `torch.export` and decomposes it again, which costs ~10 s on a
ResNet-50, longer than the calibration itself.  The converted graph is already ATen, with constant weights
and the two eightbit Q/DQ ops, so for the ops below a handler writes the ONNX node(s) directly (~0.2 s).
A graph with any other op raises `Unsupported`, and `eightbit.export.onnx` falls back to the dynamo exporter;
tests check that both paths give the same ONNX Runtime outputs and the same operator counts.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx

from eightbit import ops

aten = torch.ops.aten


class Unsupported(Exception):
    """The graph holds an op (or an op variant) without a direct handler."""


class _ValueInfo(fx.Interpreter):
    """Runs the graph once on the example and records each node's output dtype and shape."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.meta: dict[fx.Node, torch.Tensor | object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.meta[n] = torch.empty(out.shape, dtype=out.dtype, device="meta") if isinstance(out, torch.Tensor) else out
        return out


def _recorded_meta(gm: fx.GraphModule, example_args: tuple) -> dict | None:
    """Each node's dtype and rank (as an empty meta tensor) from what capture recorded (`meta["val"]`) and the
    known outputs of the Q/DQ ops, without running anything; None when some node has neither."""
    meta: dict[fx.Node, object] = {}
    args = iter(example_args)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = next(args, None)
            if isinstance(value, torch.Tensor):  # inputs keep their sizes: static dims go into the ONNX input
                meta[node] = torch.empty(value.shape, dtype=value.dtype, device="meta")
                continue
        elif node.op == "get_attr":
            value = _attr(gm, node.target)
        elif node.op == "output" or (node.op == "call_module" and str(node.target).startswith("_guards")):
            continue
        elif (
            node.target in (ops.QUANTIZE, ops.DEQUANTIZE)
            and isinstance(meta.get(node.args[0]), torch.Tensor)
            and node.args[2].op == "get_attr"
        ):
            dtype = _attr(gm, node.args[2].target).dtype if node.target == ops.QUANTIZE else torch.float32
            value = torch.empty((0,) * meta[node.args[0]].dim(), dtype=dtype)
        else:
            value = node.meta.get("val")
            if value is None and node.target not in _SKIPPED:
                return None
        meta[node] = (
            torch.empty((0,) * value.dim(), dtype=value.dtype, device="meta")
            if isinstance(value, torch.Tensor)
            else value
        )
    return meta


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


# ------------------------------------------------------------------------------------------- quantization


@handles(ops.QUANTIZE)
def _quantize(em: Emitter, node: fx.Node) -> str:
    x, scale, zero_point, qmin, qmax, axis = node.args
    x = em.value(x)
    scale_t, zp_t = _constant(em, scale), _constant(em, zero_point)
    info = np.iinfo(_np_dtype(zp_t.dtype))
    if (qmin, qmax) != (info.min, info.max):
        # Fewer bits than the container: QuantizeLinear saturates only at the type's limits, so clip first.
        if scale_t.numel() > 1:
            raise Unsupported("per-channel activations with fewer bits than their container")
        x = em.add("Max", [x, em.constant((qmin - zp_t.float()) * scale_t, np.float32)], "clip_lo")
        x = em.add("Min", [x, em.constant((qmax - zp_t.float()) * scale_t, np.float32)], "clip_hi")
    return em.add("QuantizeLinear", [x, em.names[scale], em.names[zero_point]], "q", **_axis(scale_t, axis))


@handles(ops.DEQUANTIZE)
def _dequantize(em: Emitter, node: fx.Node) -> str:
    q, scale, zero_point, axis = node.args
    scale_t = _constant(em, scale)
    inputs = [em.value(q), em.names[scale], em.names[zero_point]]
    return em.add("DequantizeLinear", inputs, "dq", **_axis(scale_t, axis))


def _axis(scale: torch.Tensor, axis: int) -> dict:
    return {"axis": axis} if scale.numel() > 1 else {}


def _constant(em: Emitter, arg) -> torch.Tensor:
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        raise Unsupported("quantization parameters that are not constants")
    return _attr(em.gm, arg.target)


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


@handles(ops.ROUND_FP16)
def _round_fp16(em: Emitter, node: fx.Node) -> str:
    half = em.add("Cast", [em.value(node.args[0])], "fp16", to=TensorProto.FLOAT16)
    return em.add("Cast", [half], "fp32", to=TensorProto.FLOAT)


# ------------------------------------------------------------------------------------------- layers


@handles(aten.conv2d.default, aten.conv1d.default)
def _conv(em: Emitter, node: fx.Node) -> str:
    x, w = node.args[:2]
    bias = _arg(node, 2, "bias")
    dims = em.rank(x) - 2
    stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
    dilation = _arg(node, 5, "dilation", 1)
    if isinstance(padding, str):
        raise Unsupported("string padding")
    inputs = [em.value(x), em.value(w)] + ([em.value(bias)] if bias is not None else [])
    pads = _per_dim(padding, dims)
    return em.add(
        "Conv",
        inputs,
        "conv",
        strides=_per_dim(stride, dims),
        pads=pads + pads,
        dilations=_per_dim(dilation, dims),
        group=int(_arg(node, 6, "groups", 1)),
    )


@handles(ops.CONV2D_PADDED)
def _conv_padded(em: Emitter, node: fx.Node) -> str:
    x, w, bias, stride, pads, dilation, groups = node.args
    inputs = [em.value(x), em.value(w)] + ([em.value(bias)] if bias is not None else [])
    return em.add("Conv", inputs, "conv", strides=list(stride), pads=list(pads), dilations=list(dilation), group=groups)


def _per_dim(value, dims: int) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return values * dims if len(values) == 1 else values


@handles(aten.linear.default)
def _linear(em: Emitter, node: fx.Node) -> str:
    x, w = node.args[:2]
    bias = _arg(node, 2, "bias")
    if em.rank(x) == 2:
        inputs = [em.value(x), em.value(w)] + ([em.value(bias)] if bias is not None else [])
        return em.add("Gemm", inputs, "gemm", transB=1)
    out = em.add("MatMul", [em.value(x), em.add("Transpose", [em.value(w)], "wt", perm=[1, 0])], "matmul")
    return out if bias is None else em.add("Add", [out, em.value(bias)], "bias")


@handles(aten.matmul.default)
def _matmul(em: Emitter, node: fx.Node) -> str:
    return em.add("MatMul", [em.value(a) for a in node.args[:2]], "matmul")


@handles(aten.max_pool2d.default)
def _max_pool(em: Emitter, node: fx.Node) -> str:
    x, kernel = node.args[:2]
    stride = _arg(node, 2, "stride", []) or kernel
    padding, dilation = _arg(node, 3, "padding", 0), _arg(node, 4, "dilation", 1)
    pads = _per_dim(padding, 2)
    return em.add(
        "MaxPool",
        [em.value(x)],
        "maxpool",
        kernel_shape=_per_dim(kernel, 2),
        strides=_per_dim(stride, 2),
        pads=pads + pads,
        dilations=_per_dim(dilation, 2),
        ceil_mode=int(bool(_arg(node, 5, "ceil_mode", False))),
    )


@handles(aten.avg_pool2d.default)
def _avg_pool(em: Emitter, node: fx.Node) -> str:
    x, kernel = node.args[:2]
    stride = _arg(node, 2, "stride", []) or kernel
    pads = _per_dim(_arg(node, 3, "padding", 0), 2)
    if _arg(node, 6, "divisor_override") is not None:
        raise Unsupported("avg_pool2d divisor_override")
    return em.add(
        "AveragePool",
        [em.value(x)],
        "avgpool",
        kernel_shape=_per_dim(kernel, 2),
        strides=_per_dim(stride, 2),
        pads=pads + pads,
        ceil_mode=int(bool(_arg(node, 4, "ceil_mode", False))),
        count_include_pad=int(bool(_arg(node, 5, "count_include_pad", True))),
    )


@handles(aten.adaptive_avg_pool2d.default)
def _adaptive_avg_pool(em: Emitter, node: fx.Node) -> str:
    if list(node.args[1]) != [1, 1]:
        raise Unsupported("adaptive_avg_pool2d to a size other than 1x1")
    return em.add("GlobalAveragePool", [em.value(node.args[0])], "gap")


@handles(aten.mean.dim)
def _mean(em: Emitter, node: fx.Node) -> str:
    x, dims = node.args[:2]
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if _arg(node, 3, "dtype") is not None:
        raise Unsupported("mean with dtype")
    rank = em.rank(x)
    dims = [int(d) % rank for d in ([dims] if isinstance(dims, int) else dims)]
    if rank == 4 and sorted(dims) == [2, 3]:
        # GlobalAveragePool, which ONNX Runtime runs in int8 between DQ and Q (it has no int8 ReduceMean).
        pooled = em.add("GlobalAveragePool", [em.value(x)], "gap")
        return pooled if keepdim else em.add("Squeeze", [pooled, em.ints([2, 3])], "squeeze")
    return em.add("ReduceMean", [em.value(x), em.ints(dims)], "mean", keepdims=int(keepdim))


@handles(aten.layer_norm.default)
def _layer_norm(em: Emitter, node: fx.Node) -> str:
    x, shape = node.args[:2]
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    if weight is None:
        raise Unsupported("layer_norm without weight")
    inputs = [em.value(x), em.value(weight)] + ([em.value(bias)] if bias is not None else [])
    eps = float(_arg(node, 4, "eps", 1e-5))
    return em.add("LayerNormalization", inputs, "layernorm", axis=-len(shape), epsilon=eps)


@handles(aten.embedding.default)
def _embedding(em: Emitter, node: fx.Node) -> str:
    return em.add("Gather", [em.value(node.args[0]), em.value(node.args[1])], "embedding")


# ------------------------------------------------------------------------------------------- elementwise

_BINARY = {
    aten.add.Tensor: "Add",
    aten.sub.Tensor: "Sub",
    aten.mul.Tensor: "Mul",
    aten.div.Tensor: "Div",
    aten.add.Scalar: "Add",
    aten.mul.Scalar: "Mul",
}


def _binary(em: Emitter, node: fx.Node) -> str:
    if _arg(node, 2, "alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
        raise Unsupported(f"{node.target} with alpha or rounding_mode")
    out = em.dtype(node)
    a, b = (em.cast_to(v, out) for v in node.args[:2])
    return em.add(_BINARY[node.target], [a, b], _BINARY[node.target].lower())


for _target in _BINARY:
    HANDLERS[_target] = _binary

_UNARY = {
    aten.relu.default: "Relu",
    aten.sigmoid.default: "Sigmoid",
    aten.tanh.default: "Tanh",
    aten.hardswish.default: "HardSwish",
    aten.exp.default: "Exp",
    aten.sqrt.default: "Sqrt",
    aten.neg.default: "Neg",
}


def _unary(em: Emitter, node: fx.Node) -> str:
    return em.add(_UNARY[node.target], [em.value(node.args[0])], _UNARY[node.target].lower())


for _target in _UNARY:
    HANDLERS[_target] = _unary


@handles(aten.hardsigmoid.default)
def _hardsigmoid(em: Emitter, node: fx.Node) -> str:
    return em.add("HardSigmoid", [em.value(node.args[0])], "hardsigmoid", alpha=1.0 / 6.0, beta=0.5)


@handles(aten.silu.default)
def _silu(em: Emitter, node: fx.Node) -> str:
    x = em.value(node.args[0])
    return em.add("Mul", [x, em.add("Sigmoid", [x], "sigmoid")], "silu")


@handles(aten.gelu.default)
def _gelu(em: Emitter, node: fx.Node) -> str:
    return em.add("Gelu", [em.value(node.args[0])], "gelu", approximate=str(node.kwargs.get("approximate", "none")))


@handles(aten.relu6.default, aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default)
def _clip(em: Emitter, node: fx.Node) -> str:
    x = node.args[0]
    if node.target == aten.relu6.default:
        lo, hi = 0.0, 6.0
    elif node.target == aten.hardtanh.default:
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    elif node.target == aten.clamp_min.default:
        lo, hi = node.args[1], None
    else:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    dtype = em.dtype(x)
    bounds = ["" if v is None else em.constant(v, _np_dtype(dtype)) for v in (lo, hi)]
    return em.add("Clip", [em.value(x), *bounds], "clip")


@handles(aten.softmax.int, aten._softmax.default)
def _softmax(em: Emitter, node: fx.Node) -> str:
    return em.add("Softmax", [em.value(node.args[0])], "softmax", axis=int(node.args[1]))


@handles(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout)
def _cast(em: Emitter, node: fx.Node) -> str:
    return em.cast_to(node.args[0], em.dtype(node))


# ------------------------------------------------------------------------------------------- shapes


@handles(aten.dropout.default, aten.to.device, aten.clone.default, aten.contiguous.default, aten.alias.default)
def _identity(em: Emitter, node: fx.Node) -> str:
    return em.value(node.args[0])


@handles(aten.flatten.using_ints)
def _flatten(em: Emitter, node: fx.Node) -> str:
    x = node.args[0]
    rank = em.rank(x)
    start, end = _arg(node, 1, "start_dim", 0) % rank, _arg(node, 2, "end_dim", -1) % rank
    if end != rank - 1:
        raise Unsupported("flatten that keeps trailing dims")
    if start == 0:
        return em.add("Reshape", [em.value(x), em.ints([-1])], "flatten")
    # Keep the leading dims as they are (0 = copy from the input), merge the rest.
    return em.add("Reshape", [em.value(x), em.ints([0] * start + [-1])], "flatten")


@handles(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(em: Emitter, node: fx.Node) -> str:
    return em.add("Reshape", [em.value(node.args[0]), em.shape_list(node.args[1])], "reshape")


@handles(aten.permute.default)
def _permute(em: Emitter, node: fx.Node) -> str:
    rank = em.rank(node.args[0])
    return em.add("Transpose", [em.value(node.args[0])], "transpose", perm=[d % rank for d in node.args[1]])


@handles(aten.transpose.int, aten.t.default)
def _transpose(em: Emitter, node: fx.Node) -> str:
    x = node.args[0]
    rank = em.rank(x)
    a, b = (node.args[1] % rank, node.args[2] % rank) if len(node.args) > 2 else (0, 1)
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return em.add("Transpose", [em.value(x)], "transpose", perm=perm)


@handles(aten.unsqueeze.default)
def _unsqueeze(em: Emitter, node: fx.Node) -> str:
    return em.add("Unsqueeze", [em.value(node.args[0]), em.ints([node.args[1]])], "unsqueeze")


@handles(aten.squeeze.dims, aten.squeeze.dim)
def _squeeze(em: Emitter, node: fx.Node) -> str:
    dims = node.args[1]
    return em.add("Squeeze", [em.value(node.args[0]), em.ints([dims] if isinstance(dims, int) else dims)], "squeeze")


@handles(aten.cat.default)
def _cat(em: Emitter, node: fx.Node) -> str:
    return em.add("Concat", [em.value(t) for t in node.args[0]], "concat", axis=int(_arg(node, 1, "dim", 0)))


@handles(aten.sym_size.int)
def _sym_size(em: Emitter, node: fx.Node) -> str:
    # A symbolic size is kept as a 1-element int64 tensor: it is only ever read as part of a shape.
    dim = node.args[1]
    bounds = {"start": dim} if dim == -1 else {"start": dim, "end": dim + 1}
    return em.add("Shape", [em.value(node.args[0])], "size", **bounds)


_SKIPPED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}


def _emit_node(em: Emitter, node: fx.Node) -> None:
    if node.op == "call_module" and str(node.target).startswith("_guards"):
        return  # input-shape guards of the exported program; ONNX checks input ranks itself
    if node.op != "call_function":
        raise Unsupported(f"{node.op} {node.target}")
    if node.target in _SKIPPED:
        return
    handler = HANDLERS.get(node.target)
    if handler is None:
        raise Unsupported(str(node.target))
    em.names[node] = handler(em, node)


def emit_model(
    gm: fx.GraphModule, example_args: tuple, *, input_names: list[str], dynamic_axes: tuple, opset: int
) -> onnx.ModelProto:
    """The ONNX model of `gm`, or `Unsupported` if some op has no handler (the caller falls back)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target not in HANDLERS and node.target not in _SKIPPED:
            raise Unsupported(str(node.target))  # before running anything
    meta = _recorded_meta(gm, example_args)
    if meta is None:  # some node without recorded metadata: run the graph once (0.2-0.5 s on a ResNet-50)
        info = _ValueInfo(gm)
        with torch.no_grad():
            info.run(*example_args)
        meta = info.meta
    em = Emitter(gm, meta)
    inputs = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, name) in enumerate(zip(placeholders, input_names, strict=True)):
        em.names[node] = name
        inputs.append(_value_info(name, meta[node], (dynamic_axes[i] if i < len(dynamic_axes) else None) or {}))
    initializer_of: dict[str, str] = {}  # attribute -> initializer name: one initializer per tensor
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if node.target not in initializer_of:
                value = _attr(gm, node.target)
                if not isinstance(value, torch.Tensor):
                    raise Unsupported(f"get_attr of a {type(value).__name__}")
                name = node.target.replace(".", "_")
                name = name if name not in initializer_of.values() else em.fresh(name)
                initializer_of[node.target] = name
                em.initializers.append(numpy_helper.from_array(value.detach().cpu().numpy(), name))
            em.names[node] = initializer_of[node.target]
        elif node.op not in ("placeholder", "output"):
            _emit_node(em, node)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [a for a in torch.utils._pytree.tree_leaves(out_node.args[0]) if isinstance(a, fx.Node)]
    outputs = []
    for i, leaf in enumerate(leaves):
        name = "output" if len(leaves) == 1 else f"output_{i}"
        em.nodes.append(helper.make_node("Identity", [em.names[leaf]], [name], name=name))
        outputs.append(_value_info(name, meta[leaf], None))
    graph = helper.make_graph(em.nodes, "eightbit", inputs, outputs, em.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="eightbit")
    model.ir_version = min(model.ir_version, 10)  # readable by every current runtime
    return model


def _value_info(name: str, meta, axes: dict | None) -> onnx.ValueInfoProto:
    if not isinstance(meta, torch.Tensor):
        raise Unsupported(f"non-tensor graph input or output {name}")
    dims = [(axes or {}).get(i, size) for i, size in enumerate(meta.shape)] if axes is not None else [None] * meta.dim()
    return helper.make_tensor_value_info(name, _onnx_dtype(meta.dtype), dims)
