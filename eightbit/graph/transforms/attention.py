"""Attention decomposition: `scaled_dot_product_attention` becomes matmul -> scale -> mask -> softmax -> matmul.

SDPA is one fused op in the captured graph, so its two matrix products (Q @ K^T and softmax @ V) could not get
quantize/dequantize pairs on their inputs.  Written out with explicit ops they are ordinary matmuls that the
placement rules quantize, and ONNX runtimes fuse back into int8 kernels.
"""

from __future__ import annotations

import math

import torch
from torch import fx

aten = torch.ops.aten

_SDPA = aten.scaled_dot_product_attention.default


def attention_reference(q, k, v, attn_mask=None, scale=None) -> torch.Tensor:
    """Pure: the same math as `decompose_attention` emits (for tests and documentation)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = torch.where(attn_mask, scores, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def decompose_attention(gm: fx.GraphModule) -> int:
    """Replace every SDPA call (no dropout, not causal, no grouped-query heads) by explicit ops; returns the
    count.  SDPA calls with other options are left fused (and therefore float)."""
    count = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _SDPA]:
        options = _options(node)
        if options is None:
            continue
        q, k, v, mask, scale = options
        head_dim = q.meta["val"].shape[-1]
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        graph = gm.graph
        with graph.inserting_before(node):
            k_t = graph.call_function(aten.transpose.int, (k, -2, -1))
            scores = graph.call_function(aten.matmul.default, (q, k_t))
            scores = graph.call_function(aten.mul.Tensor, (scores, float(scale)))
            if mask is not None:
                scores = _apply_mask(graph, scores, mask)
            probs = graph.call_function(aten.softmax.int, (scores, -1))
            out = graph.call_function(aten.matmul.default, (probs, v))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    if count:
        _propagate_meta(gm)
        gm.recompile()
    return count


def _options(node: fx.Node):
    """(q, k, v, mask, scale) if this SDPA call is one the decomposition reproduces exactly, else None."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    bound = {**defaults, **dict(zip(names, node.args, strict=False)), **node.kwargs}
    if bound["dropout_p"] or bound["is_causal"] or bound["enable_gqa"]:
        return None
    q, k = bound["query"].meta.get("val"), bound["key"].meta.get("val")
    if q is None or k is None or q.dim() < 3 or q.shape[-3] != k.shape[-3]:  # grouped-query heads
        return None
    return bound["query"], bound["key"], bound["value"], bound["attn_mask"], bound["scale"]


def _apply_mask(graph: fx.Graph, scores: fx.Node, mask: fx.Node) -> fx.Node:
    mask_val = mask.meta.get("val")
    if mask_val is not None and mask_val.dtype == torch.bool:
        # finfo.min rather than -inf: a fully masked row then gives a uniform softmax, not NaN (as in HF eager).
        return graph.call_function(aten.where.ScalarOther, (mask, scores, torch.finfo(torch.float32).min))
    return graph.call_function(aten.add.Tensor, (scores, mask))


def _propagate_meta(gm: fx.GraphModule) -> None:
    """Fill `meta['val']` of the new nodes by running them on the fake tensors of their inputs."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or "val" in node.meta:
            continue
        args = fx.node.map_arg(node.args, lambda n: n.meta["val"])
        node.meta["val"] = node.target(*args, **node.kwargs)
