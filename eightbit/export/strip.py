"""Turn a QDQ ONNX model back into its float32 counterpart.

`eightbit bench MODEL.onnx` needs an fp32 baseline with exactly the same graph as the int8 model it is
given; rather than asking for a second file, the baseline is derived here:

* a DequantizeLinear whose input is a constant (int8 weights, int32 biases) becomes a float32 initializer
  holding the dequantized values, so weights carry their quantization error but compute runs in fp32;
* a QuantizeLinear -> DequantizeLinear pair on a tensor is removed and its consumers read the float tensor
  directly (no activation rounding). Where the pair's range starts at 0 (zero point = qmin), the pair was
  also a clamp: quantizers drop a ReLU / ReLU6 in front of such a Q (ORT's quantize_static does), so a
  Clip(0, range max) takes its place unless the tensor already comes out of a Relu/Clip. Two-sided ranges
  only saturate outliers and are not reproduced;
* a Pad applied to quantized codes (Q -> Pad(value = zero point) -> DQ, how eightbit pads in the integer
  domain) becomes a float Pad with value 0 followed by the same Q, so the pair removal above applies;
* anything else (e.g. a lone QuantizeLinear feeding a graph output) is left unchanged.

Only QDQ-format models are handled; operator-format models (QLinearConv, ...) have no float equivalent
in their graph and pass through untouched.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["strip_qdq"]

_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")


def _is(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in _QDQ_DOMAINS


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _QDQ_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    return consts


def _dequantize(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> np.ndarray | None:
    """Float32 value of a DequantizeLinear whose inputs are all constants, else None."""
    if any(name and name not in consts for name in node.input):
        return None
    x = consts[node.input[0]].astype(np.float64)
    scale = consts[node.input[1]].astype(np.float64)
    has_zp = len(node.input) > 2 and node.input[2]
    zp = consts[node.input[2]].astype(np.float64) if has_zp else np.zeros_like(scale)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis = attrs.get("axis", 1) % max(x.ndim, 1)
    block = attrs.get("block_size", 0)
    if block:  # blocked quantization: one scale per `block` consecutive elements along `axis`
        keep = range(x.shape[axis])
        scale = np.repeat(scale, block, axis=axis).take(keep, axis=axis)
        zp = np.repeat(zp, block, axis=axis).take(keep, axis=axis)
    elif scale.ndim == 1 and x.ndim > 0:  # per-axis: the 1-D scale runs along `axis`
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((x - zp) * scale).astype(np.float32)


_INT_RANGES = {np.dtype(t): (np.iinfo(t).min, np.iinfo(t).max) for t in (np.uint8, np.int8, np.uint16, np.int16)}
_CLAMPS = {"Relu", "Clip"}


def _clamp_node(
    q: onnx.NodeProto, consts: dict[str, np.ndarray], producers: dict[str, onnx.NodeProto], new_inits: list
) -> onnx.NodeProto | None:
    """The Clip (or Relu) a removed Q -> DQ pair with a range starting at 0 stands for, else None."""
    src = producers.get(q.input[0])
    while src is not None and _is(src, "Pad"):  # zero padding keeps a clamped tensor clamped
        src = producers.get(src.input[0])
    if src is not None and src.op_type in _CLAMPS and src.domain in _QDQ_DOMAINS:
        return None  # already clamped in float; the quantizer kept the activation
    if len(q.input) < 3 or q.input[1] not in consts or q.input[2] not in consts:
        return None  # no zero point: ONNX defaults to uint8 with zp 0, but only explicit graphs are rewritten
    scale, zp = consts[q.input[1]], consts[q.input[2]]
    if zp.dtype not in _INT_RANGES:
        return None
    qmin, qmax = _INT_RANGES[zp.dtype]
    if not np.all(zp == qmin):
        return None
    out = f"{q.output[0]}_clamp"
    if scale.size != 1:  # per-channel ranges: Clip needs scalar bounds, keep just the lower one
        return helper.make_node("Relu", [q.input[0]], [out], name=out)
    hi = float(scale.reshape(())) * float(qmax - qmin)
    lo_name, hi_name = f"{out}_min", f"{out}_max"
    new_inits += [
        numpy_helper.from_array(np.float32(0.0), lo_name),
        numpy_helper.from_array(np.float32(hi), hi_name),
    ]
    return helper.make_node("Clip", [q.input[0], lo_name, hi_name], [out], name=out)


def _rename_inputs(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    # Subgraphs (If/Loop bodies) may read outer-scope tensors, so rename recursively.
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attr.g, mapping)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_inputs(g, mapping)


def _resolve(mapping: dict[str, str]) -> dict[str, str]:
    # Chained pairs (Q->DQ->Q->DQ) map a name onto another mapped name; follow chains to the end.
    out = {}
    for src in mapping:
        dst = mapping[src]
        while dst in mapping:
            dst = mapping[dst]
        out[src] = dst
    return out


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            used.update(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)
    return used


def _scalar(value) -> int | None:
    array = np.asarray(value)
    return int(array.reshape(-1)[0]) if array.size == 1 else None


def _hoist_integer_pads(graph: onnx.GraphProto) -> None:
    """Rewrite Q -> Pad(value = zero point) into Pad(value 0) -> Q: the same values, but pair-removable."""
    consts = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    rewritten: list[onnx.NodeProto] = []
    for node in graph.node:
        q = producers.get(node.input[0]) if _is(node, "Pad") else None
        if q is None or not _is(q, "QuantizeLinear"):
            rewritten.append(node)
            continue
        zero_point = _scalar(consts[q.input[2]]) if len(q.input) > 2 and q.input[2] in consts else 0
        has_value = len(node.input) > 2 and node.input[2]
        value = _scalar(consts[node.input[2]]) if has_value and node.input[2] in consts else (None if has_value else 0)
        if zero_point is None or value != zero_point:
            rewritten.append(node)
            continue
        zero = f"{node.output[0]}__float_zero"
        graph.initializer.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), zero))
        float_pad = helper.make_node(
            "Pad",
            [q.input[0], node.input[1], zero, *node.input[3:]],
            [f"{node.output[0]}__float"],
            name=node.name,
        )
        float_pad.attribute.extend(node.attribute)
        requantize = helper.make_node(
            "QuantizeLinear",
            [float_pad.output[0], *q.input[1:]],
            [node.output[0]],
            name=f"{node.name}__requantize",
        )
        requantize.attribute.extend(q.attribute)
        rewritten += [float_pad, requantize]
    graph.ClearField("node")
    graph.node.extend(rewritten)


def strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return the float32 equivalent of a QDQ model (the input model is not modified).

    Constant-input DequantizeLinear nodes are folded into float32 initializers and activation
    QuantizeLinear -> DequantizeLinear pairs are removed, re-linking their consumers to the float tensor
    (through a Clip where the pair's range starts at 0, see the module docstring). Graph outputs keep their
    names (an Identity is inserted where a removed DQ produced one).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    _hoist_integer_pads(graph)
    consts = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    rename: dict[str, str] = {}
    float_of: dict[str, str] = {}  # Q output -> float tensor that replaces its DQs' outputs
    for node in graph.node:
        if not _is(node, "DequantizeLinear"):
            new_nodes.append(node)
            continue
        value = _dequantize(node, consts)
        if value is not None:
            new_inits.append(numpy_helper.from_array(value, node.output[0]))
            continue
        q = producers.get(node.input[0])
        if q is not None and _is(q, "QuantizeLinear"):
            if q.output[0] not in float_of:  # one clamp per Q, however many DQs read it
                clamp = _clamp_node(q, consts, producers, new_inits)
                if clamp is not None:
                    new_nodes.append(clamp)
                float_of[q.output[0]] = clamp.output[0] if clamp is not None else q.input[0]
            if node.output[0] in graph_outputs:
                new_nodes.append(
                    helper.make_node("Identity", [float_of[q.output[0]]], [node.output[0]], name=node.name)
                )
            else:
                rename[node.output[0]] = float_of[q.output[0]]
            continue
        new_nodes.append(node)

    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _rename_inputs(graph, _resolve(rename))

    # QuantizeLinear nodes whose only consumers were removed DQs are now dead; drop them and any
    # integer initializers / Constant nodes / value_info entries nothing reads any more.
    while True:
        used = _used_names(graph)
        alive = [n for n in graph.node if any(o in used for o in n.output) or not n.output]
        if len(alive) == len(graph.node):
            break
        graph.ClearField("node")
        graph.node.extend(alive)
    used = _used_names(graph)
    inits = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    produced |= {i.name for i in graph.initializer}
    infos = [v for v in graph.value_info if v.name in produced]
    graph.ClearField("value_info")
    graph.value_info.extend(infos)
    return model
