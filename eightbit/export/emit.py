"""Direct ONNX emission of a converted graph: one small handler per ATen op, no re-capture.

The dynamo exporter re-captures the graph with `torch.export` and decomposes it again, which costs ~10 s on a
ResNet-50, longer than the calibration itself.  The converted graph is already ATen, with constant weights
and the two eightbit Q/DQ ops, so for the ops with a handler (`handlers_nn`, `handlers_tensor`) the ONNX
node(s) are written directly (~0.1 s).  A graph with any other op raises `Unsupported`, and
`eightbit.export.onnx` falls back to the dynamo exporter; tests check that both paths give the same ONNX
Runtime outputs and the same operator counts.
"""

from __future__ import annotations

import onnx
import torch
from onnx import helper, numpy_helper
from torch import fx

from eightbit.export import handlers_nn, handlers_tensor  # noqa: F401  (they fill HANDLERS)
from eightbit.export.emitter import HANDLERS, Emitter, Unsupported, _onnx_dtype, aten
from eightbit.graph import ops
from eightbit.graph.utils import attr_value, output_names

__all__ = ["HANDLERS", "Unsupported", "emit_model"]


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
            value = attr_value(gm, node)
        elif node.op == "output" or (node.op == "call_module" and str(node.target).startswith("_guards")):
            continue
        elif (
            node.target in (ops.QUANTIZE, ops.DEQUANTIZE)
            and isinstance(meta.get(node.args[0]), torch.Tensor)
            and attr_value(gm, node.args[2]) is not None
        ):
            dtype = attr_value(gm, node.args[2]).dtype if node.target == ops.QUANTIZE else torch.float32
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


# ONNX nodes' doc_string: this prefix + the name of the graph op (QuantizedModel.graph_module) that emitted them.
SOURCE_OP_PREFIX = "eightbit op: "
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
    first = len(em.nodes)
    em.names[node] = handler(em, node)
    for onnx_node in em.nodes[first:]:  # which graph op each ONNX node comes from (per-op profiles map back)
        onnx_node.doc_string = f"{SOURCE_OP_PREFIX}{node.name}"


def emit_model(
    gm: fx.GraphModule, example_args: tuple, *, input_names: list[str], dynamic_axes: tuple, opset: int
) -> onnx.ModelProto:
    """The ONNX model of `gm`, or `Unsupported` if some op has no handler (the caller falls back)."""
    if opset < 20:  # the handlers use opset-20 forms (Gelu, ReduceMean/ReduceL2 with axes inputs)
        raise Unsupported(f"opset {opset} (direct emission writes opset 20 or later)")
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
                value = attr_value(gm, node)
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
    for leaf, name in zip(leaves, output_names(gm), strict=True):
        em.nodes.append(helper.make_node("Identity", [em.names[leaf]], [name], name=name))
        outputs.append(_value_info(name, meta[leaf], None))
    value_info = _recorded_shapes(gm, em, placeholders, dynamic_axes, {v.name for v in outputs})
    graph = helper.make_graph(em.nodes, "eightbit", inputs, outputs, em.initializers, value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="eightbit")
    model.ir_version = min(model.ir_version, 10)  # readable by every current runtime
    # Runtimes fuse only what they can prove shape-compatible (ORT's SkipLayerNormalization needs both Add
    # inputs' shapes): complete the shapes, computing Shape -> Concat -> Reshape chains symbolically.
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _recorded_shapes(gm, em: Emitter, placeholders, dynamic_axes: tuple, skip: set[str]) -> list:
    """Value infos for node outputs whose shapes capture recorded, symbolic sizes named like the inputs'
    dynamic axes (batch, sequence)."""
    names = {}
    for node, axes in zip(placeholders, dynamic_axes, strict=False):
        val = node.meta.get("val")
        for axis, name in (axes or {}).items():
            if isinstance(val, torch.Tensor) and isinstance(val.shape[axis], torch.SymInt):
                names[str(val.shape[axis].node.expr)] = name
    infos, seen = [], set(skip) | {n.name for n in placeholders}
    for node in gm.graph.nodes:
        val, name, known = node.meta.get("val"), em.names.get(node), em.meta.get(node)
        if node.op != "call_function" or not isinstance(val, torch.Tensor) or not isinstance(name, str) or name in seen:
            continue
        if not isinstance(known, torch.Tensor) or (known.dtype, known.dim()) != (val.dtype, val.dim()):
            continue  # a node that a transform rewrote after capture: leave its shape to inference
        seen.add(name)
        dims = [s if isinstance(s, int) else names.get(str(s.node.expr), str(s.node.expr)) for s in val.shape]
        infos.append(helper.make_tensor_value_info(name, _onnx_dtype(val.dtype), dims))
    return infos


def _value_info(name: str, meta, axes: dict | None) -> onnx.ValueInfoProto:
    if not isinstance(meta, torch.Tensor):
        raise Unsupported(f"non-tensor graph input or output {name}")
    dims = [(axes or {}).get(i, size) for i, size in enumerate(meta.shape)] if axes is not None else [None] * meta.dim()
    return helper.make_tensor_value_info(name, _onnx_dtype(meta.dtype), dims)
