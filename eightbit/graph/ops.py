"""The two graph ops of a converted model, `eightbit::quantize` and `eightbit::dequantize`.

They are real integer ops in PyTorch (the simulated model holds uint8/int8 tensors between them), and each
has exactly one ONNX export handler emitting a standard QuantizeLinear / DequantizeLinear.  The integer
storage type is the zero point's dtype, as in ONNX.
"""

from __future__ import annotations

import numpy as np
import torch
from onnxscript import opset18 as op

from eightbit import qmath


def _axis_or_none(scale: torch.Tensor, axis: int) -> int | None:
    return axis if scale.dim() > 0 and scale.numel() > 1 else None


@torch.library.custom_op("eightbit::quantize", mutates_args=())
def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int
) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, qmin, qmax) stored in zero_point's dtype."""
    q = qmath.quantize(x, scale, zero_point, qmin, qmax, _axis_or_none(scale, axis))
    return q.to(zero_point.dtype)


@quantize.register_fake
def _quantize_fake(x, scale, zero_point, qmin, qmax, axis):
    return torch.empty_like(x, dtype=zero_point.dtype)


@torch.library.custom_op("eightbit::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """(q - zero_point) * scale as float32."""
    return qmath.dequantize(q, scale, zero_point, _axis_or_none(scale, axis))


@dequantize.register_fake
def _dequantize_fake(q, scale, zero_point, axis):
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("eightbit::round_fp16", mutates_args=())
def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16 precision, kept in float32 (simulated fp16 activations)."""
    return qmath.fp16_round(x)


@round_fp16.register_fake
def _round_fp16_fake(x):
    return torch.empty_like(x)


def round_fp16_onnx(x):
    """ONNX handler: Cast to float16 and back (the fp16 export then turns the whole graph into float16)."""
    return op.Cast(op.Cast(x, to=10), to=1)


@torch.library.custom_op("eightbit::conv2d_padded", mutates_args=())
def conv2d_padded(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    pads: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """conv2d with explicit, possibly asymmetric zero padding `pads` = [top, left, bottom, right] (ONNX order).

    aten.conv2d only pads symmetrically, so TF-style 'same' padding is captured as a separate pad op; this
    op puts it back into the convolution, as ONNX Conv's `pads` attribute allows."""
    x = torch.nn.functional.pad(x, [pads[1], pads[3], pads[0], pads[2]])
    return torch.nn.functional.conv2d(x, weight, bias, stride, 0, dilation, groups)


@conv2d_padded.register_fake
def _conv2d_padded_fake(x, weight, bias, stride, pads, dilation, groups):
    x = torch.nn.functional.pad(x, [pads[1], pads[3], pads[0], pads[2]])
    return torch.nn.functional.conv2d(x, weight, bias, stride, 0, dilation, groups)


def conv2d_padded_onnx(x, weight, bias, stride, pads, dilation, groups: int):
    """ONNX handler: one Conv with the explicit pads."""
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return op.Conv(*inputs, strides=list(stride), pads=list(pads), dilations=list(dilation), group=groups)


_CONTAINER_RANGE = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767)}


def quantize_onnx(x, scale, zero_point, qmin: int, qmax: int, axis: int):
    """ONNX handler: QuantizeLinear, preceded by a clamp when the code range is narrower than the type."""
    dtype = _np_dtype(zero_point)
    if (qmin, qmax) != _CONTAINER_RANGE.get(dtype, (qmin, qmax)):
        # Fewer bits than the container: ONNX QuantizeLinear saturates only at the type's limits.
        lo = op.Mul(op.Sub(op.Constant(value_float=float(qmin)), op.Cast(zero_point, to=1)), scale)
        hi = op.Mul(op.Sub(op.Constant(value_float=float(qmax)), op.Cast(zero_point, to=1)), scale)
        x = op.Min(op.Max(x, lo), hi)
    return op.QuantizeLinear(x, scale, zero_point, axis=axis)


def dequantize_onnx(q, scale, zero_point, axis: int):
    """ONNX handler: DequantizeLinear."""
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _np_dtype(value) -> str | None:
    try:
        return str(np.dtype(value.dtype.numpy()))
    except (AttributeError, TypeError):  # dtype not known at trace time
        return None


def spatial_mean_onnx(self, dim, keepdim: bool = False, dtype: int = -1):
    """ONNX handler for mean over H, W of an NCHW tensor: GlobalAveragePool, which ONNX Runtime runs in
    int8 between DQ and Q (it has no int8 ReduceMean).  Other means keep the standard ReduceMean."""
    dims = [int(d) % 4 for d in dim] if isinstance(dim, (list, tuple)) and len(self.shape) == 4 else None
    if dims is not None and sorted(dims) == [2, 3] and dtype in (-1, None):
        pooled = op.GlobalAveragePool(self)
        return pooled if keepdim else op.Squeeze(pooled, op.Constant(value_ints=[2, 3]))
    axes = (
        op.Constant(value_ints=list(dim))
        if isinstance(dim, (list, tuple))
        else op.Reshape(dim, op.Constant(value_ints=[-1]))
    )
    result = op.ReduceMean(self, axes, keepdims=keepdim)
    return result if dtype in (-1, None) else op.Cast(result, to=dtype)


# The op overloads that graph nodes target.
QUANTIZE = torch.ops.eightbit.quantize.default
DEQUANTIZE = torch.ops.eightbit.dequantize.default
CONV2D_PADDED = torch.ops.eightbit.conv2d_padded.default
ROUND_FP16 = torch.ops.eightbit.round_fp16.default

ONNX_TRANSLATIONS = {
    QUANTIZE: quantize_onnx,
    DEQUANTIZE: dequantize_onnx,
    torch.ops.aten.mean.dim: spatial_mean_onnx,
    torch.ops.eightbit.conv2d_padded.default: conv2d_padded_onnx,
    torch.ops.eightbit.round_fp16.default: round_fp16_onnx,
}
