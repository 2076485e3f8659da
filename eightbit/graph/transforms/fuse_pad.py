"""Fuse explicit zero padding into the following 2-D convolution."""

from __future__ import annotations

import torch
from torch import fx

from eightbit.graph import ops

aten = torch.ops.aten
PADS = (aten.pad.default, aten.constant_pad_nd.default)


def conv_pads(pad: list[int], conv_padding: list[int]) -> list[int]:
    """ONNX-order pads [top, left, bottom, right] of F.pad's [left, right, top, bottom] plus a conv's own
    symmetric (ph, pw) padding."""
    left, right, top, bottom = pad
    ph, pw = conv_padding
    return [top + ph, left + pw, bottom + ph, right + pw]


def zero_pad(node) -> list[int] | None:
    """The pad list of a constant zero pad node (F.pad order: last dim first), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in PADS or len(node.args) < 2:
        return None
    pad = list(node.args[1])
    if node.target is aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    else:
        mode, value = "constant", node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    ok = mode == "constant" and not value and all(isinstance(p, int) and p >= 0 for p in pad)
    return pad if ok else None


def fuse_pad_into_conv(gm: fx.GraphModule) -> int:
    """Replace zero-pad -> conv2d (the pad's only user) by one `eightbit::conv2d_padded`; returns the count.

    Exact: the convolution pads with zeros itself.  Saves a pass over the activation at run time and lets
    runtimes fuse the convolution with its quantize/dequantize neighbours as usual.
    """
    fused = 0
    for pad_node in list(gm.graph.nodes):
        pad = zero_pad(pad_node)
        if pad is None or len(pad) != 4 or len(pad_node.users) != 1:
            continue
        (conv,) = pad_node.users
        if conv.op != "call_function" or conv.target is not aten.conv2d.default or conv.args[0] is not pad_node:
            continue
        args = list(conv.args) + [None] * (7 - len(conv.args))
        stride = list(args[3] or [1, 1])
        padding = args[4] if args[4] is not None else [0, 0]
        if isinstance(padding, str) or len(padding) != 2:
            continue  # 'same'/'valid' strings or odd forms: leave them alone
        dilation = list(args[5] or [1, 1])
        groups = args[6] or 1
        new_args = (pad_node.args[0], args[1], args[2], stride, conv_pads(pad, list(padding)), dilation, groups)
        with gm.graph.inserting_before(conv):
            replacement = gm.graph.call_function(ops.CONV2D_PADDED, new_args)
        replacement.meta = dict(conv.meta)
        conv.replace_all_uses_with(replacement)
        gm.graph.erase_node(conv)
        gm.graph.erase_node(pad_node)
        fused += 1
    if fused:
        gm.recompile()
    return fused
