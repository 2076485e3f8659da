"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before quantizing.

A few channels of a transformer's hidden state are 10-100x larger than the rest, so one activation scale per
tensor wastes most of the int8 codes on them.  For a linear layer y = x W^T, dividing channel j of x by s_j and
multiplying column j of W by s_j leaves y unchanged; with s_j = max|x_j|^a / max|W_j|^(1-a) the activation gets
flatter and the weight (quantized per output channel) absorbs the difference.

The division is an explicit multiply on the path to the quantized layers only (other consumers, such as the
residual connection, keep reading the unscaled tensor), which runtimes fold into the quantize step.
"""

from __future__ import annotations

import torch
from torch import fx

from eightbit.config import OpKind
from eightbit.graph.placement import Placement
from eightbit.graph.utils import add_constant, attr_value


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Pure: per-input-channel scales s = act^alpha / weight^(1 - alpha); 1 where either side is all zero."""
    act, weight = act_absmax.double(), weight_absmax.double()
    s = act.clamp(min=1e-12) ** alpha / weight.clamp(min=1e-12) ** (1.0 - alpha)
    s = torch.where((act > 0) & (weight > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-5, max=1e5).float()


def smoothing_targets(gm: fx.GraphModule, placement: Placement) -> dict[str, list[str]]:
    """Input tensor -> the int8 linear layers that read it (node names), for tensors made by float ops
    (LayerNorm, GELU, attention context).  Inputs of other int8 ops are skipped: they are already int8 codes."""
    nodes = {n.name: n for n in gm.graph.nodes}
    targets: dict[fx.Node, list[fx.Node]] = {}
    for name, rule in placement.quantized_ops.items():
        node = nodes.get(name)
        if node is None or rule.kind is not OpKind.LINEAR or attr_value(gm, node.args[1]) is None:
            continue
        x = node.args[0]
        if isinstance(x, fx.Node) and x.name in placement.consumers:
            targets.setdefault(x, []).append(node)
    # Smoothing a tensor is only valid if every reader that gets the scaled value is a linear layer we rescale.
    return {
        x.name: [n.name for n in layers]
        for x, layers in targets.items()
        if set(placement.consumers[x.name]) == {n.name for n in layers}
    }


def apply_smoothing(
    gm: fx.GraphModule, targets: dict[str, list[str]], act_absmax: dict[str, torch.Tensor], alpha: float
) -> int:
    """Rescale each target's linear layers and insert x * (1 / s) in front of them; returns the count."""
    nodes = {n.name: n for n in gm.graph.nodes}
    count = 0
    for x_name, layer_names in targets.items():
        x, layers = nodes[x_name], [nodes[n] for n in layer_names]
        amax = act_absmax.get(x_name)
        if amax is None:
            continue
        weights = [attr_value(gm, layer.args[1]) for layer in layers]
        w_absmax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0)
        s = smoothing_scales(amax, w_absmax, alpha)
        inv = add_constant(gm, layers[0], f"{x.name}_smooth_inv", (1.0 / s).to(torch.float32))
        with gm.graph.inserting_before(layers[0]):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, inv))
        scaled.meta["val"] = x.meta.get("val")
        for layer, w in zip(layers, weights, strict=True):
            scaled_w = add_constant(gm, layer, f"{layer.name}_smoothed_weight", w.detach() * s)
            layer.args = (scaled, scaled_w, *layer.args[2:])
        count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return count


class ChannelAbsMax(torch.nn.Module):
    """Records max |x| per last-axis channel (the input features of a linear layer); passes x through."""

    def __init__(self) -> None:
        super().__init__()
        self.absmax: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        return x


def record_channel_absmax(gm: fx.GraphModule, tensors: list[str], run) -> dict[str, torch.Tensor]:
    """Run `run(gm)` with recorders after `tensors` (node names), then remove them; returns tensor name ->
    channel absmax."""
    nodes = {n.name: n for n in gm.graph.nodes}
    recorders = {}
    for i, node in enumerate(nodes[t] for t in tensors):
        name = f"eightbit_absmax_{i}"
        gm.add_submodule(name, ChannelAbsMax())
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(name, (node,))
        recorders[node.name] = (name, call)
    gm.recompile()
    run(gm)
    found = {}
    for tensor, (name, call) in recorders.items():
        found[tensor] = gm.get_submodule(name).absmax
        gm.graph.erase_node(call)
        gm.delete_submodule(name)
    gm.recompile()
    return {k: v for k, v in found.items() if v is not None}
