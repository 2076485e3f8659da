"""Conversion: observers become quantize/dequantize op pairs, weights become int8 buffers, biases int32.

The result is still an FX graph, runnable in PyTorch (the simulated int8 model) and exportable to ONNX,
where each op pair becomes QuantizeLinear/DequantizeLinear and each weight an int8 initializer.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from eightbit import qmath
from eightbit.calibration import methods
from eightbit.calibration.calibrate import OBSERVER_PREFIX
from eightbit.calibration.encodings import Encoding, layer_weight_spec, weight_encoding
from eightbit.config import QuantConfig, QuantSpec, Scheme
from eightbit.graph import ops
from eightbit.graph.placement import Placement
from eightbit.graph.transforms.bias_correction import bias_shift
from eightbit.graph.transforms.fuse_pad import PADS, zero_pad
from eightbit.graph.utils import add_constant, attr_value


def _insert_qdq(gm: fx.GraphModule, call: fx.Node, group: str, enc: Encoding) -> fx.Node:
    if enc.scheme == Scheme.FP16.value:
        with gm.graph.inserting_before(call):
            rounded = gm.graph.call_function(ops.ROUND_FP16, (call.args[0],))
        call.replace_all_uses_with(rounded)
        gm.graph.erase_node(call)
        return rounded
    scale, zp = enc.tensors_()
    axis = -1 if enc.axis is None else enc.axis
    s_node = add_constant(gm, call, f"{group}_scale", scale)
    z_node = add_constant(gm, call, f"{group}_zero_point", zp)
    with gm.graph.inserting_before(call):
        q = gm.graph.call_function(ops.QUANTIZE, (call.args[0], s_node, z_node, enc.qmin, enc.qmax, axis))
        dq = gm.graph.call_function(ops.DEQUANTIZE, (q, s_node, z_node, axis))
    call.replace_all_uses_with(dq)
    gm.graph.erase_node(call)
    return dq


def _dequantized_constant(
    gm: fx.GraphModule, user: fx.Node, name: str, q: torch.Tensor, enc: Encoding, axis: int | None = None
) -> fx.Node:
    scale, zp = enc.tensors_()
    axis = axis if axis is not None else -1 if enc.axis is None else enc.axis
    nodes = [add_constant(gm, user, f"{name}_{kind}", t) for kind, t in (("q", q), ("scale", scale), ("zp", zp))]
    with gm.graph.inserting_before(user):
        return gm.graph.call_function(ops.DEQUANTIZE, (*nodes, axis))


def convert(
    gm: fx.GraphModule,
    placement: Placement,
    act_encodings: dict[str, Encoding],
    config: QuantConfig,
    *,
    overflow_fix: bool = False,
    weight_ranges: dict | None = None,
    notes: list[str] | None = None,
) -> dict[str, Encoding]:
    """Rewrite the observed graph in place into the quantized graph; returns the weight encodings.

    With `overflow_fix`, weights of GEMM-backed layers (all but depthwise convolutions) use 7-bit codes.
    weight_ranges: layer node name -> (lo, hi) per channel chosen by an output-aware search (`calibration.refine`),
        used instead of the weight method's range; biases are quantized with the resulting scales.  A value that is
        already an `Encoding` (QAT's learned weight scales) is used as it is.
    notes: if given, one line is appended per layer whose bias had to stay float (see `_quantize_bias`).
    """
    notes = [] if notes is None else notes
    weight_ranges = weight_ranges or {}
    dq_of_call: dict[fx.Node, Encoding] = {}
    for call in list(gm.graph.nodes):
        if call.op == "call_module" and str(call.target).startswith(OBSERVER_PREFIX):
            group = str(call.target)[len(OBSERVER_PREFIX) :]
            dq_of_call[_insert_qdq(gm, call, group, act_encodings[group])] = act_encodings[group]
    pad_in_integer_domain(gm)
    drop_clamps_implied_by_quantize(gm)
    fold_scalar_mul_into_dequantize(gm)
    weight_encodings = {}
    for node in list(gm.graph.nodes):
        rule = placement.quantized_ops.get(node.name)
        if rule is None or rule.weight_arg is None or node.op != "call_function":
            continue
        w = attr_value(gm, node.args[rule.weight_arg])
        if w is None:
            continue
        if config.weights.scheme is not Scheme.UNIFORM:
            weight_encodings[node.name] = _simulated_weight(gm, node, rule, w, config.weights)
            continue
        spec = layer_weight_spec(w, config.weights, overflow_fix)
        given = weight_ranges.get(node.name)
        enc = given if isinstance(given, Encoding) else weight_encoding(w, spec, given)
        enc.tensors = [node.name]
        found = _bias_and_input_scale(gm, node, rule, dq_of_call)
        _fit_bias_in_int32(enc, found)
        _fit_zero_channels_to_bias(enc, found, w)
        scale, zp = enc.tensors_()
        q = ops.quantize(w.detach().float(), scale, zp, enc.qmin, enc.qmax, -1 if enc.axis is None else enc.axis)
        args = list(node.args)
        shift = _bias_shift(node, rule, args, dq_of_call, w, q, enc) if config.bias_correction else None
        weight_encodings[node.name] = enc
        if _is_sequence_linear(node):
            _linear_as_matmul(gm, node, q, enc, shift)
            continue
        args[rule.weight_arg] = _dequantized_constant(gm, node, f"{node.name}_weight", q, enc)
        _quantize_bias(gm, node, rule, args, dq_of_call, scale, shift, notes)
        node.args = tuple(args)
    if config.quantize_embeddings:
        quantize_embeddings(gm)
    gm.graph.eliminate_dead_code()
    _drop_unused_attributes(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return weight_encodings


def _is_sequence_linear(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return node.target is torch.ops.aten.linear.default and isinstance(val, torch.Tensor) and val.dim() > 2


def _linear_as_matmul(gm: fx.GraphModule, node: fx.Node, q: torch.Tensor, enc: Encoding, shift) -> None:
    """x @ DQ(q^T) + b for a linear layer on (batch, sequence, features) inputs.

    Exported as is, linear becomes DQ -> Transpose -> MatMul, and the transpose between DQ and MatMul hides
    the int8 weight from the runtimes' QDQ fusions.  Storing the codes transposed (channel axis 1, which is
    what ONNX Runtime requires of per-channel MatMul weights) avoids it.  The bias stays float: ONNX Runtime
    folds a float Add into MatMulIntegerToFloat, and OpenVINO into its int8 MatMul.
    """
    x = node.args[0]
    bias = attr_value(gm, node.args[2]) if len(node.args) > 2 else None
    weight = _dequantized_constant(
        gm, node, f"{node.name}_weight", q.t().contiguous(), enc, axis=1 if enc.axis == 0 else None
    )
    with gm.graph.inserting_before(node):
        out = gm.graph.call_function(torch.ops.aten.matmul.default, (x, weight))
    if bias is not None:
        bias = bias.detach().float() - (0 if shift is None else shift)
        b_node = add_constant(gm, node, f"{node.name}_bias", bias)
        with gm.graph.inserting_before(node):
            out = gm.graph.call_function(torch.ops.aten.add.Tensor, (out, b_node))
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def quantize_embeddings(gm: fx.GraphModule, bits: int = 8) -> int:
    """Store embedding tables as int8 codes with one symmetric scale per row (weight-only).

    embedding(W, ids) becomes embedding(q, ids) * embedding(scale, ids): only the looked-up rows are
    dequantized, so the runtime never expands the whole table to float.  Returns the count.
    """
    count = 0
    qmax = 2 ** (bits - 1) - 1
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.embedding.default]:
        table = attr_value(gm, node.args[0])
        if table is None or not table.is_floating_point():
            continue
        table = table.detach().float()
        scale = (table.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.clamp(torch.round(table / scale), -qmax, qmax).to(torch.int8)
        q_node = add_constant(gm, node, f"{node.name}_table_q", q)
        s_node = add_constant(gm, node, f"{node.name}_table_scale", scale)
        ids = node.args[1]
        with gm.graph.inserting_before(node):
            rows = gm.graph.call_function(torch.ops.aten.embedding.default, (q_node, ids))
            rows = gm.graph.call_function(torch.ops.aten._to_copy.default, (rows,), {"dtype": torch.float32})
            scales = gm.graph.call_function(torch.ops.aten.embedding.default, (s_node, ids))
            out = gm.graph.call_function(torch.ops.aten.mul.Tensor, (rows, scales))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        count += 1
    return count


def _simulated_weight(gm: fx.GraphModule, node: fx.Node, rule, w: torch.Tensor, spec: QuantSpec) -> Encoding:
    """Replace a weight by its log2- or fp16-rounded float value (simulation only, no integer codes)."""
    axis = (spec.channel_axis or 0) if spec.per_channel else None
    w = w.detach().float()
    value = qmath.log2_quantize(w, spec.bits, axis) if spec.scheme is Scheme.LOG2 else qmath.fp16_round(w)
    args = list(node.args)
    args[rule.weight_arg] = add_constant(gm, node, f"{node.name}_weight_{spec.scheme.value}", value)
    node.args = tuple(args)
    peak = methods._per_channel(w.abs(), axis).amax(dim=1)
    return Encoding(
        peak.tolist(), [0] * peak.numel(), spec.qmin, spec.qmax, axis, tensors=[node.name], scheme=spec.scheme.value
    )


def _bias_shift(node, rule, args, dq_of_call, w, q, enc) -> torch.Tensor | None:
    """The bias correction for one layer, if its input's channel mean is known and fits."""
    act = dq_of_call.get(args[rule.activation_args[0]])
    if act is None or act.mean is None:
        return None
    groups = node.args[6] if node.target is not torch.ops.aten.linear.default and len(node.args) > 6 else 1
    mean = torch.tensor(act.mean)
    if mean.numel() != w.shape[1] * groups:
        return None
    scale, zp = enc.tensors_()
    error = qmath.dequantize(q, scale, zp, enc.axis) - w.detach().float()
    return bias_shift(error, mean, groups).float()


# Bias codes are kept below this (half the int32 range): headroom for a bias correction added later.
_BIAS_CODE_LIMIT = 2**30


def _bias_and_input_scale(gm, node, rule, dq_of_call) -> tuple[torch.Tensor, float] | None:
    """The layer's float bias and its input's (per-tensor) scale, when the bias will be stored as int32."""
    pos = rule.bias_arg
    bias = attr_value(gm, node.args[pos]) if pos is not None and pos < len(node.args) else None
    act = dq_of_call.get(node.args[rule.activation_args[0]])
    if bias is None or act is None or act.axis is not None:
        return None
    return bias.detach().float(), float(act.scale[0])


def _fit_bias_in_int32(enc: Encoding, found: tuple[torch.Tensor, float] | None) -> None:
    """Raise the weight scale of the channels whose bias would not fit int32 at input_scale * weight_scale.

    Such channels have tiny weights (BatchNorm-folded channels that are nearly dead, say): their scale is
    raised just enough that bias / (input_scale * weight_scale) stays below 2^30.  The weights of the channel
    lose at most half a new step each (~|bias| / 2^31 per unit of input, far below one output step), the bias
    stays exact to a code, and the layer keeps its int32 bias (the form the runtimes fuse).  Only symmetric
    per-channel weights are adjusted; anything else that overflows keeps a float bias (`_quantize_bias`)."""
    if found is None or enc.axis is None or any(z != enc.zero_point[0] for z in enc.zero_point):
        return
    bias, in_scale = found
    if not (in_scale > 0 and torch.isfinite(torch.tensor(in_scale))) or bias.numel() != len(enc.scale):
        return
    needed = (bias.double().abs() / (in_scale * _BIAS_CODE_LIMIT)).tolist()
    enc.scale = [max(s, float(torch.tensor(n, dtype=torch.float32))) for s, n in zip(enc.scale, needed, strict=True)]


# An all-zero weight channel whose bias gets fewer than _ZERO_CHANNEL_MIN_CODES codes at its placeholder scale
# gets a scale at which it has _ZERO_CHANNEL_BIAS_CODES (exact to ~1e-6 of itself).
_ZERO_CHANNEL_MIN_CODES = 2**10
_ZERO_CHANNEL_BIAS_CODES = 2**20


def _fit_zero_channels_to_bias(enc: Encoding, found: tuple[torch.Tensor, float] | None, w: torch.Tensor) -> None:
    """Give each all-zero weight channel whose bias the placeholder scale leaves coarse (fewer than
    _ZERO_CHANNEL_MIN_CODES codes) the scale at which its bias has _ZERO_CHANNEL_BIAS_CODES codes.

    Any scale quantizes zero weights exactly, so the placeholder they get (borrowed from the other channels, or
    1.0 when all are zero) only sets the bias step input_scale * weight_scale; with an all-zero input too (scale
    1.0), a bias of 0.44 rounded to code 0 and the layer silently lost its constant output."""
    if found is None or enc.axis is None:
        return
    bias, in_scale = found
    rows = w.detach().transpose(0, enc.axis).reshape(w.shape[enc.axis], -1)
    if not (in_scale > 0 and math.isfinite(in_scale)) or not bias.numel() == len(enc.scale) == rows.shape[0]:
        return
    zero = (rows == 0).all(dim=1).tolist()
    size = bias.double().abs().tolist()
    enc.scale = [
        float(torch.tensor(b / (in_scale * _ZERO_CHANNEL_BIAS_CODES), dtype=torch.float32))
        if z and 0 < b < in_scale * s * _ZERO_CHANNEL_MIN_CODES
        else s
        for s, z, b in zip(enc.scale, zero, size, strict=True)
    ]


def _quantize_bias(gm, node, rule, args, dq_of_call, w_scale, shift=None, notes=None) -> None:
    """Store the bias (minus any correction) as int32 at scale input_scale * weight_scale: what int8 kernels
    accumulate into, and what ONNX Runtime needs to fuse a float-output Gemm.

    A bias that int32 cannot hold at that scale (tiny inputs times tiny weights, or a degenerate scale) stays
    float, and a line saying so is appended to `notes`: saturated codes would silently change the layer."""
    pos = rule.bias_arg
    bias = attr_value(gm, args[pos]) if pos is not None and pos < len(args) else None
    source = args[rule.activation_args[0]]
    act = dq_of_call.get(source)
    if bias is None or act is None or act.axis is not None:
        return
    bias = bias.detach().float() - (0 if shift is None else shift)
    in_scale = torch.tensor(act.scale[0])
    scale = (in_scale * w_scale).reshape(-1).expand(bias.shape[0]).contiguous()
    if not qmath.bias_representable(bias, in_scale, w_scale):
        _float_bias_after(gm, node, args, pos, bias)
        if notes is not None:
            notes.append(
                f"{node.name}: bias kept in float (at scale input x weight = {float(scale.min()):.3g} its int32 "
                f"codes would overflow; max |bias| {float(bias.abs().max()):.3g})"
            )
        return
    q = qmath.quantize_bias(bias, in_scale, w_scale)
    enc = Encoding(scale.tolist(), [0] * bias.shape[0], -(2**31) + 1, 2**31 - 1, 0)
    nodes = [
        add_constant(gm, node, f"{node.name}_bias_q", q),
        add_constant(gm, node, f"{node.name}_bias_scale", scale),
        add_constant(gm, node, f"{node.name}_bias_zp", torch.zeros(bias.shape[0], dtype=torch.int32)),
    ]
    with gm.graph.inserting_before(node):
        args[pos] = gm.graph.call_function(ops.DEQUANTIZE, (*nodes, enc.axis))


def _float_bias_after(gm: fx.GraphModule, node: fx.Node, args: list, pos: int, bias: torch.Tensor) -> None:
    """op(x, w, b) -> op(x, w) + b, with b a float constant shaped to broadcast over the output channels.

    A float bias read by the op itself is not enough: ONNX Runtime's QDQ fusion still turns DQ -> Conv/Gemm
    into an integer kernel and converts that bias to int32 at input_scale * weight_scale, where it overflows.
    A separate Add keeps the int8 product and adds the bias in float."""
    args[pos] = None
    val = node.meta.get("val")
    rank = val.dim() if isinstance(val, torch.Tensor) else 2
    shape = (-1,) if node.target is torch.ops.aten.linear.default else (-1,) + (1,) * max(0, rank - 2)
    b_node = add_constant(gm, node, f"{node.name}_bias_float", bias.reshape(shape))
    with gm.graph.inserting_after(node):
        out = gm.graph.call_function(torch.ops.aten.add.Tensor, (node, b_node))
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    if isinstance(val, torch.Tensor):
        out.meta["val"] = val


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Free the float weights that were replaced, so the quantized model does not carry both copies."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_buffers(recurse=False)] + [n for n, _ in gm.named_parameters(recurse=False)]:
        if name not in used:
            delattr(gm, name)


def _is_op(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def pad_in_integer_domain(gm: fx.GraphModule) -> int:
    """Rewrite DQ -> pad -> Q (same parameters) into pad(q, value=zero_point) -> DQ.

    ONNX Runtime has no int8 rule for Pad, so a float Pad between DQ and Q costs a dequantize, a float pad
    and a quantize of the whole tensor; padding the uint8 codes with the zero point is exact and cheap, and
    leaves DQ -> Conv -> Q for the runtime to fuse.  Returns the number of pads moved.
    """
    moved = 0
    for pad in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in PADS]:
        pads = zero_pad(pad)
        if pads is None or len(pad.users) != 1:
            continue
        dq_in = pad.args[0]
        (q_out,) = pad.users
        if not (_is_op(dq_in, ops.DEQUANTIZE) and _is_op(q_out, ops.QUANTIZE)):
            continue
        q_in = dq_in.args[0]
        zp = attr_value(gm, dq_in.args[2])
        same = all(
            torch.equal(attr_value(gm, a), attr_value(gm, b))
            for a, b in ((dq_in.args[1], q_out.args[1]), (dq_in.args[2], q_out.args[2]))
        )
        if not (_is_op(q_in, ops.QUANTIZE) and zp is not None and zp.dim() == 0 and same):
            continue
        with gm.graph.inserting_before(pad):
            int_pad = gm.graph.call_function(torch.ops.aten.constant_pad_nd.default, (q_in, pads, int(zp)))
        q_out.replace_all_uses_with(int_pad)
        gm.graph.erase_node(q_out)
        gm.graph.erase_node(pad)
        moved += 1
    return moved


def _hardtanh_bounds(args) -> tuple:
    return (args[1] if len(args) > 1 else -1.0, args[2] if len(args) > 2 else 1.0)


_CLAMPS = {
    torch.ops.aten.relu.default: lambda args: (0.0, None),
    torch.ops.aten.relu_.default: lambda args: (0.0, None),
    torch.ops.aten.relu6.default: lambda args: (0.0, 6.0),
    torch.ops.aten.hardtanh.default: _hardtanh_bounds,
    torch.ops.aten.hardtanh_.default: _hardtanh_bounds,
    torch.ops.aten.clamp.default: lambda args: tuple(args[i] if len(args) > i else None for i in (1, 2)),
}


def _code(value: float, scale: torch.Tensor, zp: torch.Tensor) -> int:
    """The integer code quantize gives `value` before saturation (round half to even, as quantize does)."""
    return round(value / float(scale)) + int(zp)


def drop_clamps_implied_by_quantize(gm: fx.GraphModule) -> int:
    """Remove a ReLU/ReLU6/clamp whose only user is a quantize that saturates at least as tightly.

    Exact: when each clamp bound's code is already saturated (round(lo / s) + zp <= qmin and
    round(hi / s) + zp >= qmax, ONNX Runtime's own rule), the clamp changes no code the quantize produces.
    ONNX Runtime removes such a Clip/Relu itself, OpenVINO keeps it as an extra op; dropping it here serves
    both.  Returns the count.
    """
    dropped = 0
    for node in list(gm.graph.nodes):
        bounds = _CLAMPS.get(node.target) if node.op == "call_function" else None
        if bounds is None or len(node.users) != 1:
            continue
        (q,) = node.users
        if not _is_op(q, ops.QUANTIZE) or q.args[0] is not node:
            continue
        scale, zp = attr_value(gm, q.args[1]), attr_value(gm, q.args[2])
        if scale is None or zp is None or scale.dim() != 0:
            continue
        lo, hi = bounds(node.args)
        if (lo is None or _code(lo, scale, zp) <= q.args[3]) and (hi is None or _code(hi, scale, zp) >= q.args[4]):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    return dropped


def fold_scalar_mul_into_dequantize(gm: fx.GraphModule) -> int:
    """Rewrite matmul(DQ(a, s), b) * c into matmul(DQ(a, s * c), b) for a constant scalar c.

    Attention multiplies Q @ K^T by 1/sqrt(head_dim): a float pass over the (batch, heads, seq, seq) scores.
    Folded into the dequantize scale of Q it costs nothing (the int8 matmul applies the scales anyway), and
    the result is the same up to float rounding.  Returns the count.
    """
    folded = 0
    for mul in [n for n in gm.graph.nodes if _is_op(n, torch.ops.aten.mul.Tensor)]:
        mm, c = mul.args
        if not (_is_op(mm, torch.ops.aten.matmul.default) and isinstance(c, (int, float)) and len(mm.users) == 1):
            continue
        dq = mm.args[0]
        if not _is_op(dq, ops.DEQUANTIZE) or len(dq.users) != 1:
            continue
        scale = attr_value(gm, dq.args[1])
        if scale is None:
            continue
        new_scale = add_constant(gm, dq, f"{dq.name}_scale_folded", scale * float(c))
        dq.args = (dq.args[0], new_scale, *dq.args[2:])
        mul.replace_all_uses_with(mm)
        gm.graph.erase_node(mul)
        folded += 1
    return folded
