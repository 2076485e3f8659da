"""Where quantize/dequantize pairs go: op rules as data, one generic placement algorithm.

The rules encode what int8 runtimes fuse (ONNX Runtime's QDQ selectors, OpenVINO's low-precision
transformations): a Q/DQ pair on every activation input of a quantized op, a Q/DQ pair on its output after
any fused ReLU/ReLU6/clamp (so Conv+ReLU+Q becomes one int8 kernel), and data-movement ops (max-pool,
reshape, pad, dropout) that reuse their input's parameters so the runtime can run them on int8 data without
re-quantizing.  Tensors that get a Q/DQ pair are grouped; each group gets one observer.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx

from eightbit.config import OpKind, QuantConfig, Target
from eightbit.graph import ops
from eightbit.graph.utils import FLOAT_REASON, module_path

aten = torch.ops.aten


@dataclass(frozen=True)
class OpRule:
    """How one ATen op is quantized.

    kind: family, for `QuantConfig.keep_float_ops`.
    activation_args: positions of activation inputs to quantize (a list argument counts as all its items).
    weight_arg: position of a constant weight quantized per channel, or None.
    bias_arg: position of a constant bias stored as int32 at scale input_scale * weight_scale.
    quantize_output: give the output (after fused activations) its own Q/DQ pair.
    float_output_ok: the runtimes have int8 kernels with a float output for this op (Gemm/MatMul), so a
        model output produced by it can stay float at no speed cost.
    only_if_feeds_int8: quantize the op only when its output (through fused activations and data movement)
        is an input of another int8 op.  An int8 add whose result goes to a float LayerNorm only adds a
        quantize/dequantize round trip and error.
    shares_params: the output and every activation input use one set of parameters (one group): kernels that
        move or average int8 codes without rescaling (TFLite AVERAGE_POOL_2D, CONCATENATION).
    output_range: a fixed (lo, hi) range for the output instead of a calibrated one: kernels whose output
        parameters are part of their definition (TFLite LOGISTIC / SOFTMAX: scale 1/256, zero at the lowest code).
    """

    kind: OpKind
    activation_args: tuple[int, ...]
    weight_arg: int | None = None
    bias_arg: int | None = None
    quantize_output: bool = True
    float_output_ok: bool = False
    only_if_feeds_int8: bool = False
    shares_params: bool = False
    output_range: tuple[float, float] | None = None


_CONV = OpRule(OpKind.CONV, (0,), weight_arg=1, bias_arg=2)
# Linear and matmul outputs stay float: their consumers quantize what they need.  Runtimes run DQ -> MatMul
# with a float output as one int8 kernel (ORT MatMulIntegerToFloat / QGemm, OpenVINO), and transformer
# outputs mostly feed float ops (residual add, LayerNorm, GELU, softmax).
_LINEAR = OpRule(OpKind.LINEAR, (0,), weight_arg=1, bias_arg=2, quantize_output=False, float_output_ok=True)
_MATMUL = OpRule(OpKind.MATMUL, (0, 1), quantize_output=False, float_output_ok=True)
_POOL = OpRule(OpKind.POOL, (0,))
_ELEMENTWISE = {"only_if_feeds_int8": True}

QUANTIZED_OPS: dict[object, OpRule] = {
    aten.conv1d.default: _CONV,
    aten.conv2d.default: _CONV,
    aten.conv3d.default: _CONV,
    ops.CONV2D_PADDED: _CONV,
    aten.linear.default: _LINEAR,
    aten.matmul.default: _MATMUL,
    aten.bmm.default: _MATMUL,
    aten.mm.default: _MATMUL,
    aten.add.Tensor: OpRule(OpKind.ADD, (0, 1), **_ELEMENTWISE),
    aten.add_.Tensor: OpRule(OpKind.ADD, (0, 1), **_ELEMENTWISE),
    aten.cat.default: OpRule(OpKind.CONCAT, (0,), **_ELEMENTWISE),
    aten.avg_pool2d.default: _POOL,
    aten.adaptive_avg_pool2d.default: _POOL,
    aten.mean.dim: _POOL,
}

# TFLite (LiteRT, TFLite Micro) runs the whole model in int8, and its kernels constrain parameters: every op has
# an int8 output (the classifier too), AVERAGE_POOL_2D and CONCATENATION move codes without rescaling (inputs and
# output share parameters), LOGISTIC and SOFTMAX have the fixed output scale 1/256 with 0.0 at the lowest code.
# Global pooling (mean) stays a rescaling MEAN.  Nothing is conditional: a float island would break the int8 graph.
_FIXED_UNIT_RANGE = (0.0, 255.0 / 256.0)  # 256 codes of 1/256 from 0.0: TFLite's LOGISTIC/SOFTMAX output
_TFLITE_LINEAR = OpRule(OpKind.LINEAR, (0,), weight_arg=1, bias_arg=2)
TFLITE_OPS: dict[object, OpRule] = {
    **QUANTIZED_OPS,
    aten.linear.default: _TFLITE_LINEAR,
    aten.add.Tensor: OpRule(OpKind.ADD, (0, 1)),
    aten.add_.Tensor: OpRule(OpKind.ADD, (0, 1)),
    aten.mul.Tensor: OpRule(OpKind.MUL, (0, 1)),
    aten.cat.default: OpRule(OpKind.CONCAT, (0,), shares_params=True),
    aten.avg_pool2d.default: OpRule(OpKind.POOL, (0,), shares_params=True),
    aten.sigmoid.default: OpRule(OpKind.ACTIVATION, (0,), output_range=_FIXED_UNIT_RANGE),
    aten.softmax.int: OpRule(OpKind.ACTIVATION, (0,), output_range=_FIXED_UNIT_RANGE),
    aten._softmax.default: OpRule(OpKind.ACTIVATION, (0,), output_range=_FIXED_UNIT_RANGE),
    aten.hardswish.default: OpRule(OpKind.ACTIVATION, (0,)),
}

RULES: dict[Target, dict[object, OpRule]] = {Target.ONNX: QUANTIZED_OPS, Target.TFLITE: TFLITE_OPS}

# Applied to a quantized op's output before its Q/DQ pair: the runtimes fuse them into the int8 kernel.
FUSED_ACTIVATIONS = {
    aten.relu.default,
    aten.relu6.default,
    aten.relu_.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.clamp.default,
    aten.clamp_.default,
}

# Data movement: output values are a subset of the input's, so the output shares the input's parameters.
SHARED_PARAMS_OPS = {
    aten.max_pool2d.default,
    aten.max_pool1d.default,
    aten.flatten.using_ints,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.pad.default,
    aten.constant_pad_nd.default,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    aten.permute.default,
    aten.transpose.int,
    aten.relu.default,
    aten.hardtanh.default,
}


@dataclass
class Placement:
    """Result of placement: tensor groups to observe, quantized ops, and ops kept float with reasons."""

    groups: dict[str, list[str]] = field(default_factory=dict)  # group name -> tensor node names
    quantized_ops: dict[str, OpRule] = field(default_factory=dict)  # node name -> rule
    float_ops: dict[str, str] = field(default_factory=dict)  # node name -> reason
    # Tensors quantized only for some consumers (the rest keep reading the float value): tensor -> consumers.
    # Tensors produced by an int8 op are absent: every consumer reads their dequantized value.
    consumers: dict[str, list[str]] = field(default_factory=dict)
    # Groups whose range is fixed by the target's kernel (OpRule.output_range), not calibrated: group -> (lo, hi).
    fixed_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def group_of(self) -> dict[str, str]:
        return {t: g for g, members in self.groups.items() for t in members}


class _Groups:
    """Union-find over tensor nodes."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def add(self, n: fx.Node) -> None:
        self.parent.setdefault(n, n)

    def find(self, n: fx.Node) -> fx.Node:
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.add(a)
        self.add(b)
        self.parent[self.find(b)] = self.find(a)


def _is_float_tensor(n) -> bool:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _is_activation(n) -> bool:
    return isinstance(n, fx.Node) and n.op in ("placeholder", "call_function", "call_module") and _is_float_tensor(n)


def _activation_inputs(node: fx.Node, rule: OpRule) -> list[fx.Node]:
    found = []
    for pos in rule.activation_args:
        if pos >= len(node.args):
            continue
        arg = node.args[pos]
        for item in arg if isinstance(arg, (list, tuple)) else [arg]:
            if _is_activation(item):
                found.append(item)
    return found


def _arg_at(node: fx.Node, pos: int):
    return node.args[pos] if pos < len(node.args) else None


def _fused_chain_end(node: fx.Node) -> fx.Node:
    """Follow single-user ReLU/ReLU6/clamp ops after `node`; the last one is where the output Q/DQ goes."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_function" or user.target not in FUSED_ACTIVATIONS or user.args[0] is not node:
            break
        node = user
    return node


def _keep_float_reason(node: fx.Node, rule: OpRule, config: QuantConfig) -> str | None:
    if node.name in config.keep_float_nodes:
        return "op kept float by config (keep_float_nodes)"
    if rule.kind in config.keep_float_ops:
        return f"op kind {rule.kind.value!r} kept float by config"
    path = module_path(node)
    for name in config.keep_float:
        if path == name or path.startswith(name + "."):
            return f"module {name!r} kept float by config"
    return None


def check_keep_float(gm: fx.GraphModule, keep_float: Iterable[str], known: Iterable[str] = ()) -> None:
    """Refuse `keep_float` names that are no module of the model (a misspelled name would keep nothing float),
    naming the closest ones.  Known: every module path recorded in the graph, its parents, and `known`."""
    names = set(known)
    for node in gm.graph.nodes:
        parts = module_path(node).split(".") if module_path(node) else []
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    names.discard("")
    for name in keep_float:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"modules include {sorted(names)[:8]}"
            raise ValueError(
                f"keep_float name {name!r} is not a module of this model; {hint} "
                "(names are as in model.named_modules())"
            )


def check_keep_float_nodes(gm: fx.GraphModule, config: QuantConfig) -> None:
    """Refuse `keep_float_nodes` names that are no op with an int8 rule in this graph (a misspelled name would keep
    nothing float), naming the closest ones."""
    rules = RULES[config.target]
    names = sorted(n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in rules)
    for name in config.keep_float_nodes:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"ops include {names[:8]}"
            raise ValueError(f"keep_float_nodes name {name!r} is not a quantizable op of this model; {hint}")


def place(gm: fx.GraphModule, config: QuantConfig) -> Placement:
    """Decide which tensors get Q/DQ pairs (grouped by shared parameters) and which ops run in int8."""
    placement = Placement()
    accepted = _int8_ops(gm, config, placement, RULES[config.target])
    groups = _Groups()
    produced: set[fx.Node] = set()  # outputs of int8 ops: quantized for all their consumers
    consumers: dict[fx.Node, list[str]] = {}
    outputs = _graph_outputs(gm)
    for node, rule in accepted.items():
        placement.quantized_ops[node.name] = rule
        end = _fused_chain_end(node)
        if end in outputs:  # model outputs stay float where an int8 kernel can produce float
            quantize_output = config.quantize_outputs or not rule.float_output_ok
        else:
            quantize_output = rule.quantize_output
        if quantize_output:
            groups.add(end)
            produced.add(end)
    for node, rule in accepted.items():
        for tensor in _activation_inputs(node, rule):
            groups.add(tensor)
            consumers.setdefault(tensor, []).append(node.name)
            if rule.shares_params:
                groups.union(tensor, _fused_chain_end(node))
    _share_through_data_movement(gm, groups, produced)
    fixed = {groups.find(_fused_chain_end(n)): r.output_range for n, r in accepted.items() if r.output_range}
    members: dict[fx.Node, list[str]] = {}
    for node in gm.graph.nodes:  # graph order keeps group names deterministic
        if node in groups.parent:
            members.setdefault(groups.find(node), []).append(node.name)
            if node not in produced:
                placement.consumers[node.name] = consumers[node]
    placement.groups = {f"act{i}": names for i, names in enumerate(members.values())}
    placement.fixed_ranges = {f"act{i}": fixed[root] for i, root in enumerate(members) if root in fixed}
    return placement


def _int8_ops(
    gm: fx.GraphModule, config: QuantConfig, placement: Placement, rules: dict[object, OpRule]
) -> dict[fx.Node, OpRule]:
    """The ops that run in int8 under `rules`, in graph order; records why the others stay float."""
    candidates: dict[fx.Node, OpRule] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _is_float_tensor(node):
            continue
        rule = rules.get(node.target)
        if rule is None:
            if node.target not in SHARED_PARAMS_OPS and node.target not in FUSED_ACTIVATIONS:
                placement.float_ops[node.name] = node.meta.get(FLOAT_REASON) or f"no int8 rule for {node.target}"
            continue
        reason = _keep_float_reason(node, rule, config)
        if reason is None and rule.weight_arg is None and not _activation_inputs(node, rule):
            reason = "no activation input"
        if reason is None and rule.weight_arg is not None and _is_activation(_arg_at(node, rule.weight_arg)):
            reason = "its weight is computed at run time (not a constant that can be stored as int8)"
        if reason:
            placement.float_ops[node.name] = reason
            continue
        candidates[node] = rule
    # Conditional ops are decided last to first, so an add feeding a later int8 add sees that decision.
    for node in reversed(list(candidates)):
        if candidates[node].only_if_feeds_int8 and not _feeds_int8(_fused_chain_end(node), candidates):
            del candidates[node]
            placement.float_ops[node.name] = "its output feeds no int8 op"
    return candidates


def _feeds_int8(node: fx.Node, int8_ops: dict[fx.Node, OpRule]) -> bool:
    for user in node.users:
        rule = int8_ops.get(user)
        if rule is not None and node in _activation_inputs(user, rule):
            return True
        passes = user.op == "call_function" and (user.target in SHARED_PARAMS_OPS or user.target in FUSED_ACTIVATIONS)
        if passes and _feeds_int8(user, int8_ops):
            return True
    return False


def _share_through_data_movement(gm: fx.GraphModule, groups: _Groups, produced: set[fx.Node]) -> None:
    """A data-movement op whose input comes out of an int8 op gets its output quantized with the same
    parameters (the runtime moves int8 data)."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SHARED_PARAMS_OPS or not node.args:
            continue
        src = node.args[0]
        if src in produced and _is_float_tensor(node) and _passes_values_through(node):
            groups.union(src, node)
            produced.add(node)


def _passes_values_through(node: fx.Node) -> bool:
    # Padding with a nonzero constant, or a clamp below the data's range, would create new values.
    if node.target in (aten.pad.default, aten.constant_pad_nd.default):
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0.0)
        mode = node.args[2] if len(node.args) > 2 else "constant"
        return mode == "constant" and (value or 0.0) == 0.0
    return node.target not in FUSED_ACTIVATIONS


def _graph_outputs(gm: fx.GraphModule) -> set[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    found: set[fx.Node] = set()
    fx.node.map_arg(out.args, lambda n: found.add(n))
    return found
