"""Cross-layer equalization and high-bias absorption (Nagel et al., 2019, "Data-Free Quantization").

For two consecutive layers y = W2 f(W1 x + b1) + b2 joined by a positively homogeneous activation f
(f(s x) = s f(x) for s > 0: identity, ReLU), scaling output channel i of the first layer by 1/s_i and input
channel i of the second by s_i leaves y unchanged.  With r1_i = max|W1[i, ...]| and r2_i = max|W2[:, i, ...]|,
s_i = sqrt(r1_i r2_i) / r2_i makes both ranges sqrt(r1_i r2_i): one scale per tensor then fits every channel
equally.  Chains (conv -> depthwise conv -> conv) are equalized pair by pair until the scales stop changing.

High-bias absorption: after equalization some channels feed large constant offsets through the ReLU.  If the
pre-activation of channel i is ~N(beta_i, gamma_i^2) (the BatchNorm that was folded into the layer says so),
then c_i = max(0, beta_i - 3 gamma_i) lies below almost every value, relu(x - c) = relu(x) - c, and c can move
from b1 into b2 (b2 += W2 c).  This shrinks the activation's range (its quantization step) at the cost of the
rare values below c (and of the zero padding at image borders, where W2 c is not fully added).

ReLU6 is not homogeneous (min(s x, 6) != s min(x, 6)), and a per-channel clip would not be one Q/DQ-friendly
op.  `Relu6Handling` says what to do with a ReLU6 between two layers:
- BOUNDED (default): equalize, but keep the function exactly on the calibration data: a channel whose
  pre-activation reached 6 keeps s_i = 1, and any other channel may grow only until its observed maximum
  reaches 6 (s_i >= max_i / 6).  Needs each such layer's per-channel output maximum (`record_channel_max`).
- TO_RELU (AIMET's choice): turn the ReLU6 into a ReLU and equalize freely.  On EfficientNet-Lite0 this
  changes the float model itself far too much (top-1 agreement with the original 0.60; BENCHMARKS.md).
- SKIP: leave such pairs alone.
High-bias absorption is exact only through a ReLU (relu6(x - c) != relu6(x) - c), so it skips ReLU6 pairs.

The math is in pure tensor functions; `equalize_graph` finds the pairs and writes the new weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from eightbit.config import Relu6Handling
from eightbit.graph import ops
from eightbit.graph.transforms.fold_bn import BN_STATS_KEY
from eightbit.graph.utils import add_constant, attr_value

aten = torch.ops.aten

_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, ops.CONV2D_PADDED}
_LAYERS = _CONVS | {aten.linear.default}
_RELUS = {aten.relu.default, aten.relu_.default}
_CLIPS = {aten.hardtanh.default, aten.hardtanh_.default, aten.relu6.default, aten.clamp.default}


# ---------------------------------------------------------------------------------------------------------
# Pure tensor functions


def output_channel_ranges(w: torch.Tensor) -> torch.Tensor:
    """max |w| per output channel (axis 0)."""
    return w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)


def input_channel_ranges(w: torch.Tensor, depthwise: bool = False) -> torch.Tensor:
    """max |w| per input channel: axis 1 (conv/linear), or axis 0 for a depthwise conv (one filter per channel)."""
    if depthwise:
        return output_channel_ranges(w)
    return w.detach().abs().transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """s_i = sqrt(r1_i r2_i) / r2_i, so that r1_i / s_i == r2_i * s_i; 1 where either range is 0."""
    r1, r2 = r1.double(), r2.double()
    s = torch.sqrt(r1 * r2) / r2.clamp(min=1e-300)
    return torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s))


def _along(v: torch.Tensor, axis: int, dim: int) -> torch.Tensor:
    shape = [1] * dim
    shape[axis] = -1
    return v.reshape(shape)


def scale_output_channels(w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor):
    """(w / s, b / s) per output channel: the first layer of an equalized pair."""
    w2 = (w.double() / _along(s, 0, w.dim())).to(w.dtype)
    return w2, None if b is None else (b.double() / s).to(b.dtype)


def scale_input_channels(w: torch.Tensor, s: torch.Tensor, depthwise: bool = False) -> torch.Tensor:
    """w * s per input channel: the second layer of an equalized pair."""
    return (w.double() * _along(s, 0 if depthwise else 1, w.dim())).to(w.dtype)


def bound_for_clip(s: torch.Tensor, channel_max: torch.Tensor, saturates: torch.Tensor, clip: float = 6.0):
    """Scales that keep y -> min(y, clip) exact on data whose per-channel maximum is `channel_max`: 1 where the
    channel reached the clip (`saturates`), else at least channel_max / clip (the channel may not grow past it)."""
    s = torch.maximum(s, channel_max.double() / clip)
    return torch.where(saturates, torch.ones_like(s), s)


def equalize_pair(w1, b1, w2, depthwise2: bool = False, bound=None):
    """Equalize two layers joined by a homogeneous activation; returns (w1', b1', w2', s).  `bound`: an optional
    function s -> s applied to the scales (`bound_for_clip` for a ReLU6)."""
    s = equalization_scales(output_channel_ranges(w1), input_channel_ranges(w2, depthwise2))
    if bound is not None:
        s = bound(s)
    w1, b1 = scale_output_channels(w1, b1, s)
    return w1, b1, scale_input_channels(w2, s, depthwise2), s


def absorbable_bias(mean: torch.Tensor, std: torch.Tensor, sigmas: float = 3.0) -> torch.Tensor:
    """c = max(0, mean - sigmas * std) per channel: an offset below almost every pre-activation value."""
    return (mean.double() - sigmas * std.double().abs()).clamp(min=0)


def absorb_bias(b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None, c: torch.Tensor, depthwise2=False):
    """Move c out of layer 1's bias into layer 2's: (b1 - c, b2 + W2 c), W2 summed over its kernel."""
    per_input = w2.double().reshape(w2.shape[0], w2.shape[1], -1).sum(dim=2)  # [out, in/groups]
    shift = per_input[:, 0] * c.double() if depthwise2 else per_input @ c.double()
    b2 = torch.zeros(w2.shape[0], dtype=w2.dtype) if b2 is None else b2
    return (b1.double() - c.double()).to(b1.dtype), (b2.double() + shift).to(b2.dtype)


def range_spread(w: torch.Tensor) -> float:
    """max / median of the per-output-channel ranges: how much of the per-tensor range the typical channel
    loses (1 = balanced)."""
    r = output_channel_ranges(w).double()
    median = float(r.median())
    return float(r.max()) / median if median > 0 else float("inf")


# ---------------------------------------------------------------------------------------------------------
# Graph pass


@dataclass
class _Layer:
    node: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    depthwise: bool
    groups: int
    stats: tuple[torch.Tensor, torch.Tensor] | None  # (mean, std) of the pre-activation output, from BN
    out_max: torch.Tensor | None = None  # per-channel output maximum on calibration data (ReLU6 bounds)
    saturates: torch.Tensor | None = None  # channels whose output reached the clip


@dataclass
class _Pair:
    first: _Layer
    second: _Layer
    activation: fx.Node | None
    kind: str | None  # 'relu', 'relu6' or None (no activation)


@dataclass
class EqualizeReport:
    """What `equalize_graph` did: pairs and layers equalized, ReLU6s turned into ReLUs, biases absorbed, and
    the mean `range_spread` of the touched weights before and after."""

    pairs: int = 0
    layers: int = 0
    relu6_replaced: int = 0
    absorbed: int = 0
    iterations: int = 0
    spread_before: float = 1.0
    spread_after: float = 1.0
    skipped: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        text = (
            f"cross-layer equalization: {self.pairs} pairs ({self.layers} layers, {self.iterations} rounds); "
            f"weight channel range spread (max/median, mean over layers) {self.spread_before:.1f} -> "
            f"{self.spread_after:.1f}"
        )
        if self.relu6_replaced:
            text += f"; {self.relu6_replaced} ReLU6 -> ReLU"
        return text + f"; high biases absorbed in {self.absorbed} pairs"


def _layer(gm: fx.GraphModule, node) -> _Layer | None:
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _LAYERS:
        return None
    if node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    weight = attr_value(gm, node.args[1])
    bias_node = node.args[2] if len(node.args) > 2 else None
    bias = attr_value(gm, bias_node)
    if weight is None or (bias_node is not None and bias is None) or not weight.is_floating_point():
        return None
    groups = int(node.args[6]) if node.target in _CONVS and len(node.args) > 6 else 1
    depthwise = groups > 1 and groups == weight.shape[0] and weight.shape[1] == 1
    return _Layer(node, weight.detach(), None if bias is None else bias.detach(), depthwise, groups, _stats(node))


def _stats(node: fx.Node):
    stats = node.meta.get(BN_STATS_KEY)
    return None if stats is None else (stats[0].double(), stats[1].double())


def _clip_bounds(node: fx.Node) -> tuple | None:
    a = node.args
    if node.target is aten.relu6.default:
        return 0.0, 6.0
    if node.target is aten.clamp.default:
        return (a[1] if len(a) > 1 else node.kwargs.get("min")), (a[2] if len(a) > 2 else node.kwargs.get("max"))
    return (a[1] if len(a) > 1 else -1.0), (a[2] if len(a) > 2 else 1.0)


def _activation_kind(node: fx.Node) -> str | None:
    """'relu', 'relu6' (a [0, 6] clip) or None (not an activation equalization can cross)."""
    if node.op != "call_function":
        return None
    if node.target in _RELUS:
        return "relu"
    if node.target in _CLIPS and not node.kwargs.keys() - {"min", "max"}:
        lo, hi = _clip_bounds(node)
        if lo == 0 and hi is None:
            return "relu"
        if lo == 0 and hi == 6:
            return "relu6"
    return None


def find_pairs(gm: fx.GraphModule, relu6: Relu6Handling) -> tuple[list[_Pair], dict[str, str]]:
    """Consecutive (layer, layer) pairs equalization can rescale, in graph order; and why others were skipped."""
    pairs, skipped = [], {}
    layers: dict[fx.Node, _Layer] = {}
    for node in gm.graph.nodes:
        first = layers.get(node) or _layer(gm, node)
        if first is None:
            continue
        layers[node] = first
        if len(node.users) != 1:
            continue
        (user,) = node.users
        activation, kind = None, None
        if _layer(gm, user) is None:
            kind = _activation_kind(user)
            if kind is None or len(user.users) != 1:
                continue
            if kind == "relu6" and relu6 is Relu6Handling.SKIP:
                skipped[node.name] = "ReLU6 after it (Relu6Handling.SKIP)"
                continue
            activation, (user,) = user, user.users
        second = layers.get(user) or _layer(gm, user)
        if second is None or user.args[0] is not (activation or node):
            continue
        layers[user] = second
        if second.groups > 1 and not second.depthwise:
            skipped[node.name] = "grouped (not depthwise) convolution after it"
            continue
        pairs.append(_Pair(first, second, activation, kind))
    return pairs, skipped


def equalize_graph(
    gm: fx.GraphModule,
    *,
    relu6: Relu6Handling = Relu6Handling.BOUNDED,
    channel_max: dict[str, torch.Tensor] | None = None,
    absorb_high_bias: bool = True,
    sigmas: float = 3.0,
    max_rounds: int = 50,
    tolerance: float = 1e-4,
) -> EqualizeReport:
    """Equalize every pair `find_pairs` finds, round after round until no scale moves by more than `tolerance`
    (relative), then absorb high biases across ReLUs where BN statistics are known.  Rewrites `gm` in place
    (new buffers; node count unchanged); returns what it did.

    channel_max: layer node name -> per-channel maximum of its output on calibration data; needed for the
        pairs joined by a ReLU6 under Relu6Handling.BOUNDED (pairs without it are skipped)."""
    pairs, skipped = find_pairs(gm, relu6)
    if relu6 is Relu6Handling.BOUNDED:
        pairs = _with_bounds(pairs, channel_max or {}, skipped)
    report = EqualizeReport(skipped=skipped)
    if not pairs:
        return report
    touched = {id(p.first): p.first for p in pairs} | {id(p.second): p.second for p in pairs}
    report.spread_before = _mean_spread(touched.values())
    for report.iterations in range(1, max_rounds + 1):
        if _equalize_round(pairs, relu6) <= tolerance:
            break
    if absorb_high_bias:
        report.absorbed = _absorb(pairs, sigmas)
    if relu6 is Relu6Handling.TO_RELU:
        report.relu6_replaced = _relu6_to_relu(pairs)
    for layer in touched.values():
        _write(gm, layer)
    gm.graph.eliminate_dead_code()
    report.pairs, report.layers = len(pairs), len(touched)
    report.spread_after = _mean_spread(touched.values())
    gm.recompile()
    return report


def _with_bounds(pairs: list[_Pair], channel_max: dict[str, torch.Tensor], skipped: dict) -> list[_Pair]:
    kept = []
    for pair in pairs:
        a = pair.first
        if pair.kind == "relu6":
            if a.node.name not in channel_max:
                skipped[a.node.name] = "ReLU6 after it and no calibration maximum recorded"
                continue
            a.out_max = channel_max[a.node.name].double()
            a.saturates = a.out_max >= 6.0 * (1 - 1e-6)
        kept.append(pair)
    return kept


def _equalize_round(pairs: list[_Pair], relu6: Relu6Handling) -> float:
    """One pass over the pairs; returns the largest relative scale change."""
    moved = 0.0
    for pair in pairs:
        a, b = pair.first, pair.second
        bound = None
        if pair.kind == "relu6" and relu6 is Relu6Handling.BOUNDED:
            bound = lambda s, a=a: bound_for_clip(s, a.out_max, a.saturates)  # noqa: E731
        a.weight, a.bias, b.weight, s = equalize_pair(a.weight, a.bias, b.weight, b.depthwise, bound)
        if a.stats is not None:
            a.stats = (a.stats[0] / s, a.stats[1] / s)
        if a.out_max is not None:
            a.out_max = a.out_max / s
        moved = max(moved, float((s - 1).abs().max()))
    return moved


def _absorb(pairs: list[_Pair], sigmas: float) -> int:
    """High-bias absorption across the ReLU pairs with BN statistics; returns the pairs that moved a bias."""
    count = 0
    for pair in pairs:
        a, b = pair.first, pair.second
        if pair.kind == "relu" and a.stats is not None and a.bias is not None:
            c = absorbable_bias(*a.stats, sigmas)
            a.bias, b.bias = absorb_bias(a.bias, b.weight, b.bias, c, b.depthwise)
            a.stats = (a.stats[0] - c, a.stats[1])
            count += int(bool((c > 0).any()))
    return count


def _relu6_to_relu(pairs: list[_Pair]) -> int:
    count = 0
    for pair in pairs:
        if pair.kind == "relu6":
            pair.activation.target, pair.activation.args, pair.activation.kwargs = (
                aten.relu.default,
                (pair.activation.args[0],),
                {},
            )
            count += 1
    return count


class ChannelMax(torch.nn.Module):
    """Records the maximum per channel (axis 1, or the last axis for 2-D inputs); passes x through."""

    def __init__(self) -> None:
        super().__init__()
        self.max: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = 1 if x.dim() > 2 else x.dim() - 1
        peak = x.detach().transpose(0, axis).reshape(x.shape[axis], -1).amax(dim=1).float()
        self.max = peak if self.max is None else torch.maximum(self.max, peak)
        return x


def relu6_layers(gm: fx.GraphModule) -> list[str]:
    """The first layers of ReLU6 pairs: whose output maxima `equalize_graph` needs under BOUNDED."""
    pairs, _ = find_pairs(gm, Relu6Handling.BOUNDED)
    return [p.first.node.name for p in pairs if p.kind == "relu6"]


def record_channel_max(gm: fx.GraphModule, layers: list[str], run) -> dict[str, torch.Tensor]:
    """Run `run(gm)` with recorders after `layers` (node names), then remove them; returns layer -> per-channel
    output maximum."""
    nodes = {n.name: n for n in gm.graph.nodes}
    recorders = {}
    for i, name in enumerate(layers):
        target = f"eightbit_channel_max_{i}"
        gm.add_submodule(target, ChannelMax())
        with gm.graph.inserting_after(nodes[name]):
            call = gm.graph.call_module(target, (nodes[name],))
        nodes[name].replace_all_uses_with(call, delete_user_cb=lambda user, call=call: user is not call)
        recorders[name] = (target, call)
    gm.recompile()
    try:
        run(gm)
    finally:
        found = {}
        for name, (target, call) in recorders.items():
            found[name] = gm.get_submodule(target).max
            call.replace_all_uses_with(nodes[name])
            gm.graph.erase_node(call)
            gm.delete_submodule(target)
        gm.recompile()
    return {k: v for k, v in found.items() if v is not None}


def _mean_spread(layers) -> float:
    spreads = [range_spread(layer.weight) for layer in layers]
    return sum(spreads) / len(spreads)


def _write(gm: fx.GraphModule, layer: _Layer) -> None:
    node = layer.node
    args = list(node.args) + [None] * max(0, 3 - len(node.args))
    args[1] = add_constant(gm, node, f"{node.name}_equalized_weight", layer.weight)
    if layer.bias is not None:
        args[2] = add_constant(gm, node, f"{node.name}_equalized_bias", layer.bias)
    node.args = tuple(args)
    if layer.stats is not None:
        node.meta[BN_STATS_KEY] = tuple(t.float() for t in layer.stats)
