"""Analytical bias correction: absorb the mean output shift that weight rounding causes into the bias.

`bias_shift` / `padded_bias_shift` are the math; `layer_bias_shift` picks the one that fits a graph layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from eightbit.graph import ops


def bias_shift(weight_error: torch.Tensor, input_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """E[(W_q - W) x] per output channel, given the per-input-channel mean of x.

    weight_error: W_q - W, shaped [out, in/groups, *kernel] (conv) or [out, in] (linear).
    Subtracting the result from the bias makes the quantized layer's output unbiased on the calibration data
    (Nagel et al., "Data-Free Quantization", 2019).  Near zero padding is ignored: it only lowers the mean.
    """
    if weight_error.dim() == 2:
        return weight_error.double() @ input_mean.double()
    per_input = weight_error.double().sum(dim=tuple(range(2, weight_error.dim())))  # [out, in/groups]
    out_channels, in_per_group = per_input.shape
    means = input_mean.double().reshape(groups, in_per_group).repeat_interleave(out_channels // groups, dim=0)
    return (per_input * means).sum(dim=1)


def padded_bias_shift(
    weight_error: torch.Tensor,
    input_mean: torch.Tensor,
    input_size: tuple[int, int],
    *,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int = 1,
) -> torch.Tensor:
    """`bias_shift` for a zero-padded 2-D conv: E[conv(x, W_q - W)] per output channel, averaged over the output
    positions, for an input of spatial `input_size` whose channels have mean `input_mean` everywhere inside the
    image and 0 in the padding (top, left, bottom, right).

    At the borders some kernel taps read the padding, so they add nothing to the mean: on a 7x7 map with a 5x5
    kernel a third of the taps do, and the unpadded formula overcorrects those layers by about that much.
    Computed as the conv of the constant-mean image with the error kernel (exact for a spatially constant mean).
    """
    mean = input_mean.double().reshape(1, -1, 1, 1).expand(1, input_mean.numel(), *input_size)
    top, left, bottom, right = padding
    padded = F.pad(mean, [left, right, top, bottom])
    out = F.conv2d(padded, weight_error.double(), None, tuple(stride), 0, tuple(dilation), groups)
    return out.mean(dim=(0, 2, 3))


def layer_bias_shift(node: fx.Node, weight_error: torch.Tensor, input_mean: torch.Tensor, groups: int = 1):
    """The bias correction for the conv/linear `node`: `padded_bias_shift` for a zero-padded 2-D conv whose input
    size the graph records, `bias_shift` otherwise."""
    geometry = _padded_conv_geometry(node)
    if geometry is None:
        return bias_shift(weight_error, input_mean, groups)
    size, stride, padding, dilation = geometry
    return padded_bias_shift(
        weight_error, input_mean, size, stride=stride, padding=padding, dilation=dilation, groups=groups
    )


def _padded_conv_geometry(node: fx.Node):
    """(input size, stride, (top, left, bottom, right) padding, dilation) of a padded 2-D conv, else None."""
    args = node.args
    if node.target is ops.CONV2D_PADDED:
        stride, padding, dilation = args[3], tuple(args[4]), args[5]
    elif node.target is torch.ops.aten.conv2d.default:
        stride = args[3] if len(args) > 3 else (1, 1)
        pad = args[4] if len(args) > 4 else (0, 0)
        dilation = args[5] if len(args) > 5 else (1, 1)
        if not (isinstance(pad, (list, tuple)) and len(pad) == 2):
            return None
        padding = (pad[0], pad[1], pad[0], pad[1])
    else:
        return None
    size = _input_size(args[0])
    if not any(padding) or size is None:
        return None
    return size, tuple(stride), padding, tuple(dilation)


def _input_size(value) -> tuple[int, int] | None:
    """The spatial size of a conv input, looking through inserted observers and Q/DQ (which record no shape)."""
    while isinstance(value, fx.Node):
        if value.op == "call_module" or value.target in (ops.QUANTIZE, ops.DEQUANTIZE):
            value = value.args[0] if value.args else None
            continue
        shape = getattr(value.meta.get("val"), "shape", None)
        return tuple(int(d) for d in shape[-2:]) if shape is not None and len(shape) == 4 else None
    return None
