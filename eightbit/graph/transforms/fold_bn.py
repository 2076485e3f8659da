"""BatchNorm folding: y = BN(conv(x, w) + b) becomes conv(x, w') + b'."""

from __future__ import annotations

import torch
from torch import fx

from eightbit.graph.utils import add_constant, attr_value

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
    """Fold every eval-mode BatchNorm that directly follows a conv/linear with constant weights.

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
    return folded


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
