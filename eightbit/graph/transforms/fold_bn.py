"""BatchNorm folding: y = BN(conv(x, w) + b) becomes conv(x, w') + b'."""

from __future__ import annotations

import torch
from torch import fx

from eightbit.graph.utils import FLOAT_REASON, add_constant, attr_value

aten = torch.ops.aten

_BATCHNORM = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_FOLDABLE = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}
# node.meta key: (mean, std) per output channel of a layer whose BatchNorm was folded, i.e. BN's (beta, |gamma|);
# cross-layer equalization's high-bias absorption reads it.
BN_STATS_KEY = "eightbit_bn_output"


def fold_bn(
    w: torch.Tensor,
    b: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a conv/linear (output channels on axis 0) with an eval-mode BatchNorm folded in.

    Computed in float64 so folding adds no error beyond the final float32 rounding.
    """
    dtype = w.dtype
    w, mean, var = w.double(), mean.double(), var.double()
    gamma = torch.ones_like(mean) if gamma is None else gamma.double()
    beta = torch.zeros_like(mean) if beta is None else beta.double()
    b = torch.zeros_like(mean) if b is None else b.double()
    factor = gamma / torch.sqrt(var + eps)
    w_folded = w * factor.reshape(-1, *([1] * (w.dim() - 1)))
    b_folded = (b - mean) * factor + beta
    return w_folded.to(dtype), b_folded.to(dtype)


def _bn_args(node: fx.Node) -> tuple:
    """(input, gamma, beta, mean, var, eps) for both BatchNorm op spellings; None if in training mode."""
    a = node.args
    if node.target is aten.batch_norm.default:
        if a[5]:  # training=True: statistics come from the batch, nothing to fold
            return None
        return a[0], a[1], a[2], a[3], a[4], a[7]
    return a[0], a[1], a[2], a[3], a[4], a[6]


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every eval-mode BatchNorm that directly follows a conv/linear with constant weights, then those
    that can fold forward into the next layer (`fold_batchnorm_forward`).

    Returns the number folded.  New tensors are registered as fresh buffers; the originals are untouched.
    """
    folded = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target not in _BATCHNORM:
            continue
        parsed = _bn_args(bn)
        if parsed is None:
            continue
        producer, gamma, beta, mean, var, eps = parsed
        if not _is_foldable(gm, producer):
            continue
        params = [attr_value(gm, n) for n in (gamma, beta, mean, var)]
        if any(p is None and n is not None for p, n in zip(params, (gamma, beta, mean, var), strict=True)):
            continue  # BN parameters computed at run time: leave it
        weight = attr_value(gm, producer.args[1])
        bias = attr_value(gm, producer.args[2]) if len(producer.args) > 2 else None
        w, b = fold_bn(weight, bias, params[0], params[1], params[2], params[3], eps)
        args = list(producer.args) + [None] * max(0, 3 - len(producer.args))
        args[1] = add_constant(gm, producer, f"{producer.name}_folded_weight", w)
        args[2] = add_constant(gm, producer, f"{producer.name}_folded_bias", b)
        producer.args = tuple(args)
        producer.meta[BN_STATS_KEY] = _output_stats(params[0], params[1], w.shape[0])
        replacement = producer
        if bn.target is aten._native_batch_norm_legit_no_training.default:
            _replace_getitem_users(bn, producer)
        else:
            bn.replace_all_uses_with(replacement)
        gm.graph.erase_node(bn)
        folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return folded + fold_batchnorm_forward(gm)


def _output_stats(gamma, beta, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a BatchNorm's output per channel: (beta, |gamma|)."""
    mean = torch.zeros(channels) if beta is None else beta.detach().float().clone()
    std = torch.ones(channels) if gamma is None else gamma.detach().float().abs()
    return mean, std


def _is_foldable(gm: fx.GraphModule, producer) -> bool:
    if not isinstance(producer, fx.Node) or producer.target not in _FOLDABLE or len(producer.users) != 1:
        return False
    if attr_value(gm, producer.args[1]) is None:
        return False
    bias = producer.args[2] if len(producer.args) > 2 else None
    return bias is None or attr_value(gm, bias) is not None


def _replace_getitem_users(bn: fx.Node, producer: fx.Node) -> None:
    for user in list(bn.users):
        if user.args[1] != 0:
            raise RuntimeError("BatchNorm statistics outputs are used; cannot fold")
        user.replace_all_uses_with(producer)
        user.graph.erase_node(user)


# ------------------------------------------------------------------------------------------- forward folding
# A BatchNorm after a ReLU (Conv -> ReLU -> BN -> MaxPool -> Conv, as in pitch-estimation CNNs) cannot fold
# into the conv before it; it is a per-channel affine y = a * x + c, so it folds into the conv after it.

_MAX_POOLS = {aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default}
_PASS_THROUGH = {aten.dropout.default, aten.clone.default, aten.contiguous.default}
_NEXT = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}


def bn_affine(gamma, beta, mean: torch.Tensor, var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure: eval-mode BatchNorm as a per-channel affine map y = a * x + c (float64)."""
    mean, var = mean.double(), var.double()
    gamma = torch.ones_like(mean) if gamma is None else gamma.double()
    beta = torch.zeros_like(mean) if beta is None else beta.double()
    a = gamma / torch.sqrt(var + eps)
    return a, beta - mean * a


def fold_affine_into_next(
    w: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor, c: torch.Tensor, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure: weights and bias of a conv/linear (weight [out, in/groups, *kernel]) whose input x is replaced by
    the affine a * x + c, per input channel: W' = W * a, b' = b + sum(W * c).

    Exact for a linear layer and for a convolution without zero padding; with padding, the padded border
    reads 0 where the unfolded layer read c, so callers fold a nonzero c only into unpadded convolutions."""
    dtype = w.dtype
    wd = w.double()
    out_channels, in_per_group = wd.shape[:2]
    # Per (output channel, input channel of its group): the a and c of the input channel it reads.
    channel = (
        torch.arange(in_per_group)[None, :]
        + (torch.arange(out_channels) // (out_channels // groups))[:, None] * in_per_group
    )
    shape = (out_channels, in_per_group) + (1,) * (wd.dim() - 2)
    w_folded = wd * a.double()[channel].reshape(shape)
    reduced = wd.sum(dim=tuple(range(2, wd.dim()))) if wd.dim() > 2 else wd
    shift = (reduced * c.double()[channel]).sum(dim=1)
    b_folded = shift if b is None else b.double() + shift
    return w_folded.to(dtype), b_folded.to(dtype)


def _next_layer(bn: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """The conv/linear that alone reads the BatchNorm's output (through max-pools and identities), and the
    nodes in between."""
    between, node = [], bn
    while len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_function" or user.args[0] is not node:
            return None, between
        if user.target in _NEXT:
            return user, between
        if user.target not in _MAX_POOLS | _PASS_THROUGH:
            return None, between
        between.append(user)
        node = user
    return None, between


def _zero_padded(layer: fx.Node) -> bool:
    if layer.target is aten.linear.default:
        return False
    padding = layer.args[4] if len(layer.args) > 4 else layer.kwargs.get("padding", 0)
    return any(p != 0 for p in ([padding] if isinstance(padding, int) else padding))


def _forward_fold_obstacle(gm, bn, layer, between, a, c) -> str | None:
    """Why this BatchNorm cannot be folded into `layer` exactly, or None."""
    if layer is None:
        return "BatchNorm not folded: its output does not go (alone) into a conv or linear layer"
    bias = layer.args[2] if len(layer.args) > 2 else None
    if attr_value(gm, layer.args[1]) is None or (bias is not None and attr_value(gm, bias) is None):
        return f"BatchNorm not folded: {layer.name} has weights computed at run time"
    x = bn.args[0].meta.get("val") if isinstance(bn.args[0], fx.Node) else None
    if layer.target is aten.linear.default and (not isinstance(x, torch.Tensor) or x.dim() != 2):
        return f"BatchNorm not folded: {layer.name} reads features along another axis than the BN's channels"
    if any(n.target in _MAX_POOLS for n in between) and bool((a <= 0).any()):
        return "BatchNorm not folded: a non-positive BN scale does not commute with the max-pool after it"
    if _zero_padded(layer) and bool((c != 0).any()):
        return (
            f"BatchNorm not folded into {layer.name}: that conv zero-pads its input, so the BN shift would be "
            "wrong on the border"
        )
    return None


def fold_batchnorm_forward(gm: fx.GraphModule) -> int:
    """Fold every remaining eval-mode BatchNorm into the conv/linear after it where that is exact; the others
    get a `FLOAT_REASON` in their metadata.  Returns the number folded."""
    folded = 0
    for bn in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _BATCHNORM]:
        parsed = _bn_args(bn)
        if parsed is None or bn.target is not aten.batch_norm.default:
            continue
        x, gamma, beta, mean, var, eps = parsed
        params = [attr_value(gm, n) if n is not None else None for n in (gamma, beta, mean, var)]
        computed = any(p is None and n is not None for p, n in zip(params, (gamma, beta, mean, var), strict=True))
        if computed or params[2] is None or params[3] is None:
            bn.meta[FLOAT_REASON] = "BatchNorm not folded: its parameters are computed at run time"
            continue
        a, c = bn_affine(*params, eps)
        layer, between = _next_layer(bn)
        obstacle = _forward_fold_obstacle(gm, bn, layer, between, a, c)
        if obstacle:
            bn.meta[FLOAT_REASON] = obstacle
            continue
        groups = 1 if layer.target is aten.linear.default else (layer.args[6] if len(layer.args) > 6 else 1)
        bias = attr_value(gm, layer.args[2]) if len(layer.args) > 2 and layer.args[2] is not None else None
        w, b = fold_affine_into_next(attr_value(gm, layer.args[1]), bias, a, c, groups)
        args = list(layer.args) + [None] * max(0, 3 - len(layer.args))
        args[1] = add_constant(gm, layer, f"{layer.name}_folded_weight", w)
        args[2] = add_constant(gm, layer, f"{layer.name}_folded_bias", b)
        layer.args = tuple(args)
        bn.replace_all_uses_with(x)
        gm.graph.erase_node(bn)
        folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return folded
