"""ONNX handlers for quantization, layers and elementwise math (see `eightbit.export.emitter`)."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto
from torch import fx

from eightbit.export.emitter import HANDLERS, Emitter, Unsupported, _arg, _np_dtype, aten, handles
from eightbit.graph import ops
from eightbit.graph.utils import attr_value

# ------------------------------------------------------------------------------------------- quantization


@handles(ops.QUANTIZE)
def _quantize(em: Emitter, node: fx.Node) -> str:
    x, scale, zero_point, qmin, qmax, axis = node.args
    x = em.value(x)
    scale_t, zp_t = _constant(em, scale), _constant(em, zero_point)
    info = np.iinfo(_np_dtype(zp_t.dtype))
    if (qmin, qmax) != (info.min, info.max):
        # Fewer bits than the container: QuantizeLinear saturates only at the type's limits, so clip first.
        if scale_t.numel() > 1:
            raise Unsupported("per-channel activations with fewer bits than their container")
        x = em.add("Max", [x, em.constant((qmin - zp_t.float()) * scale_t, np.float32)], "clip_lo")
        x = em.add("Min", [x, em.constant((qmax - zp_t.float()) * scale_t, np.float32)], "clip_hi")
    return em.add("QuantizeLinear", [x, em.names[scale], em.names[zero_point]], "q", **_axis(scale_t, axis))


@handles(ops.DEQUANTIZE)
def _dequantize(em: Emitter, node: fx.Node) -> str:
    q, scale, zero_point, axis = node.args
    scale_t = _constant(em, scale)
    inputs = [em.value(q), em.names[scale], em.names[zero_point]]
    return em.add("DequantizeLinear", inputs, "dq", **_axis(scale_t, axis))


def _axis(scale: torch.Tensor, axis: int) -> dict:
    return {"axis": axis} if scale.numel() > 1 else {}


def _constant(em: Emitter, arg) -> torch.Tensor:
    value = attr_value(em.gm, arg)
    if value is None:
        raise Unsupported("quantization parameters that are not constants")
    return value


@handles(ops.ROUND_FP16)
def _round_fp16(em: Emitter, node: fx.Node) -> str:
    half = em.add("Cast", [em.value(node.args[0])], "fp16", to=TensorProto.FLOAT16)
    return em.add("Cast", [half], "fp32", to=TensorProto.FLOAT)


# ------------------------------------------------------------------------------------------- layers


@handles(aten.conv2d.default, aten.conv1d.default)
def _conv(em: Emitter, node: fx.Node) -> str:
    x, w = node.args[:2]
    bias = _arg(node, 2, "bias")
    dims = em.rank(x) - 2
    stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
    dilation = _arg(node, 5, "dilation", 1)
    if isinstance(padding, str):
        raise Unsupported("string padding")
    inputs = [em.value(x), em.value(w)] + ([em.value(bias)] if bias is not None else [])
    pads = _per_dim(padding, dims)
    return em.add(
        "Conv",
        inputs,
        "conv",
        strides=_per_dim(stride, dims),
        pads=pads + pads,
        dilations=_per_dim(dilation, dims),
        group=int(_arg(node, 6, "groups", 1)),
    )


@handles(ops.CONV2D_PADDED)
def _conv_padded(em: Emitter, node: fx.Node) -> str:
    x, w, bias, stride, pads, dilation, groups = node.args
    inputs = [em.value(x), em.value(w)] + ([em.value(bias)] if bias is not None else [])
    return em.add("Conv", inputs, "conv", strides=list(stride), pads=list(pads), dilations=list(dilation), group=groups)


def _per_dim(value, dims: int) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return values * dims if len(values) == 1 else values


@handles(aten.linear.default)
def _linear(em: Emitter, node: fx.Node) -> str:
    x, w = node.args[:2]
    bias = _arg(node, 2, "bias")
    if em.rank(x) == 2:
        inputs = [em.value(x), em.value(w)] + ([em.value(bias)] if bias is not None else [])
        return em.add("Gemm", inputs, "gemm", transB=1)
    out = em.add("MatMul", [em.value(x), em.add("Transpose", [em.value(w)], "wt", perm=[1, 0])], "matmul")
    return out if bias is None else em.add("Add", [out, em.value(bias)], "bias")


@handles(aten.matmul.default)
def _matmul(em: Emitter, node: fx.Node) -> str:
    return em.add("MatMul", [em.value(a) for a in node.args[:2]], "matmul")


def _pool_window(node: fx.Node, padding_index: int) -> dict:
    """kernel_shape, strides and pads of a 2-D pooling node (an empty stride means the kernel size)."""
    kernel = node.args[1]
    stride = _arg(node, 2, "stride", []) or kernel
    pads = _per_dim(_arg(node, padding_index, "padding", 0), 2)
    return {"kernel_shape": _per_dim(kernel, 2), "strides": _per_dim(stride, 2), "pads": pads + pads}


@handles(aten.max_pool2d.default)
def _max_pool(em: Emitter, node: fx.Node) -> str:
    return em.add(
        "MaxPool",
        [em.value(node.args[0])],
        "maxpool",
        **_pool_window(node, 3),
        dilations=_per_dim(_arg(node, 4, "dilation", 1), 2),
        ceil_mode=int(bool(_arg(node, 5, "ceil_mode", False))),
    )


@handles(aten.avg_pool2d.default)
def _avg_pool(em: Emitter, node: fx.Node) -> str:
    if _arg(node, 6, "divisor_override") is not None:
        raise Unsupported("avg_pool2d divisor_override")
    ceil_mode, include_pad = bool(_arg(node, 4, "ceil_mode", False)), bool(_arg(node, 5, "count_include_pad", True))
    if ceil_mode and include_pad and _overhangs(em, node):
        return _ceil_avg_pool_with_explicit_padding(em, node)
    return em.add(
        "AveragePool",
        [em.value(node.args[0])],
        "avgpool",
        **_pool_window(node, 3),
        ceil_mode=int(bool(_arg(node, 4, "ceil_mode", False))),
        count_include_pad=int(bool(_arg(node, 5, "count_include_pad", True))),
    )


def _overhangs(em: Emitter, node: fx.Node) -> bool:
    """Whether a ceil-mode window reaches past the padded input (there ONNX AveragePool divides by the whole
    kernel, torch by the part of the window inside the padded input).  Unknown spatial sizes: Unsupported."""
    x, out = _captured_value(node.args[0]), node.meta.get("val")  # as captured (the emitter keeps ranks only)
    window = _pool_window(node, 3)
    sizes = [*x.shape[2:], *out.shape[2:]] if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) else []
    if len(sizes) != 4 or not all(isinstance(v, int) for v in sizes):
        raise Unsupported("ceil-mode avg_pool2d over a dynamic spatial size")
    return any(
        (o - 1) * s + k > size + 2 * p
        for size, o, k, s, p in zip(
            sizes[:2], sizes[2:], window["kernel_shape"], window["strides"], window["pads"][:2], strict=True
        )
    )


def _captured_value(node):
    """The value capture recorded for `node`, or for the tensor it re-quantizes (Q/DQ nodes added later have
    none; they keep their input's shape)."""
    while isinstance(node, fx.Node) and "val" not in node.meta and node.target in (ops.QUANTIZE, ops.DEQUANTIZE):
        node = node.args[0]
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _ceil_avg_pool_with_explicit_padding(em: Emitter, node: fx.Node) -> str:
    """torch's ceil-mode avg_pool2d with count_include_pad, where a window hangs past the padded input: ONNX
    AveragePool without count_include_pad divides each window by its part inside the input; a constant map
    rescales that to torch's divisor (the part inside the padded input).  (An explicit Pad before the pool is
    exact too, but ONNX Runtime's optimizer fuses it back into the pool's pads and then divides like torch does
    not.)  Output positions past torch's output size are sliced off."""
    window = _pool_window(node, 3)
    sizes, out = list(_captured_value(node.args[0]).shape[2:]), list(node.meta["val"].shape[2:])
    factors = [
        _divisor_ratio(*dims)
        for dims in zip(sizes, out, window["kernel_shape"], window["strides"], window["pads"][:2], strict=True)
    ]
    scale = torch.outer(*factors).reshape(1, 1, *out).float()
    pooled = em.add("AveragePool", [em.value(node.args[0])], "avgpool", **window, ceil_mode=1, count_include_pad=0)
    cropped = em.add("Slice", [pooled, em.ints([0, 0]), em.ints(out), em.ints([2, 3])], "avgpool")
    return em.add("Mul", [cropped, em.constant(scale, hint="avgpool_divisor")], "avgpool")


def _divisor_ratio(size: int, out: int, kernel: int, stride: int, pad: int) -> torch.Tensor:
    """Per output position along one axis: (inputs in the window) / (window inside the padded input), float64."""
    starts = torch.arange(out, dtype=torch.float64) * stride - pad
    inside = torch.minimum(starts + kernel, torch.tensor(float(size))) - starts.clamp(min=0)
    padded = torch.minimum(starts + kernel, torch.tensor(float(size + pad))) - starts
    return inside / padded


@handles(aten.adaptive_avg_pool2d.default)
def _adaptive_avg_pool(em: Emitter, node: fx.Node) -> str:
    if list(node.args[1]) != [1, 1]:
        raise Unsupported("adaptive_avg_pool2d to a size other than 1x1")
    return em.add("GlobalAveragePool", [em.value(node.args[0])], "gap")


@handles(aten.adaptive_avg_pool1d.default)
def _adaptive_avg_pool1d(em: Emitter, node: fx.Node) -> str:
    # Swin's and other sequence poolers: (N, C, L) -> (N, C, 1); GlobalAveragePool takes any spatial rank.
    if list(node.args[1]) != [1]:
        raise Unsupported("adaptive_avg_pool1d to a size other than 1")
    return em.add("GlobalAveragePool", [em.value(node.args[0])], "gap")


@handles(aten.mean.dim)
def _mean(em: Emitter, node: fx.Node) -> str:
    x, dims = node.args[:2]
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if _arg(node, 3, "dtype") is not None:
        raise Unsupported("mean with dtype")
    rank = em.rank(x)
    dims = [int(d) % rank for d in ([dims] if isinstance(dims, int) else dims)]
    if rank == 4 and sorted(dims) == [2, 3]:
        # GlobalAveragePool, which ONNX Runtime runs in int8 between DQ and Q (it has no int8 ReduceMean).
        pooled = em.add("GlobalAveragePool", [em.value(x)], "gap")
        return pooled if keepdim else em.add("Squeeze", [pooled, em.ints([2, 3])], "squeeze")
    return em.add("ReduceMean", [em.value(x), em.ints(dims)], "mean", keepdims=int(keepdim))


@handles(aten.layer_norm.default)
def _layer_norm(em: Emitter, node: fx.Node) -> str:
    x, shape = node.args[:2]
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    if weight is None:
        raise Unsupported("layer_norm without weight")
    inputs = [em.value(x), em.value(weight)] + ([em.value(bias)] if bias is not None else [])
    eps = float(_arg(node, 4, "eps", 1e-5))
    return em.add("LayerNormalization", inputs, "layernorm", axis=-len(shape), epsilon=eps)


@handles(aten.embedding.default)
def _embedding(em: Emitter, node: fx.Node) -> str:
    return em.add("Gather", [em.value(node.args[0]), em.value(node.args[1])], "embedding")


# ------------------------------------------------------------------------------------------- elementwise

_BINARY = {
    aten.add.Tensor: "Add",
    aten.sub.Tensor: "Sub",
    aten.mul.Tensor: "Mul",
    aten.div.Tensor: "Div",
    aten.add.Scalar: "Add",
    aten.mul.Scalar: "Mul",
}


def _binary(em: Emitter, node: fx.Node) -> str:
    if _arg(node, 2, "alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
        raise Unsupported(f"{node.target} with alpha or rounding_mode")
    out = em.dtype(node)
    a, b = (em.cast_to(v, out) for v in node.args[:2])
    return em.add(_BINARY[node.target], [a, b], _BINARY[node.target].lower())


for _target in _BINARY:
    HANDLERS[_target] = _binary

_UNARY = {
    aten.relu.default: "Relu",
    aten.sigmoid.default: "Sigmoid",
    aten.tanh.default: "Tanh",
    aten.hardswish.default: "HardSwish",
    aten.exp.default: "Exp",
    aten.sqrt.default: "Sqrt",
    aten.neg.default: "Neg",
    aten.abs.default: "Abs",
    aten.log.default: "Log",
    aten.cos.default: "Cos",
    aten.sin.default: "Sin",
    aten.erf.default: "Erf",
    aten.reciprocal.default: "Reciprocal",
}


def _unary(em: Emitter, node: fx.Node) -> str:
    return em.add(_UNARY[node.target], [em.value(node.args[0])], _UNARY[node.target].lower())


for _target in _UNARY:
    HANDLERS[_target] = _unary


@handles(aten.hardsigmoid.default)
def _hardsigmoid(em: Emitter, node: fx.Node) -> str:
    return em.add("HardSigmoid", [em.value(node.args[0])], "hardsigmoid", alpha=1.0 / 6.0, beta=0.5)


@handles(aten.silu.default)
def _silu(em: Emitter, node: fx.Node) -> str:
    x = em.value(node.args[0])
    return em.add("Mul", [x, em.add("Sigmoid", [x], "sigmoid")], "silu")


@handles(aten.gelu.default)
def _gelu(em: Emitter, node: fx.Node) -> str:
    return em.add("Gelu", [em.value(node.args[0])], "gelu", approximate=str(node.kwargs.get("approximate", "none")))


@handles(aten.relu6.default, aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default)
def _clip(em: Emitter, node: fx.Node) -> str:
    x = node.args[0]
    if node.target == aten.relu6.default:
        lo, hi = 0.0, 6.0
    elif node.target == aten.hardtanh.default:
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    elif node.target == aten.clamp_min.default:
        lo, hi = node.args[1], None
    else:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    dtype = em.dtype(x)
    bounds = ["" if v is None else em.constant(v, _np_dtype(dtype)) for v in (lo, hi)]
    return em.add("Clip", [em.value(x), *bounds], "clip")


@handles(aten.softmax.int, aten._softmax.default)
def _softmax(em: Emitter, node: fx.Node) -> str:
    return em.add("Softmax", [em.value(node.args[0])], "softmax", axis=int(node.args[1]))


@handles(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device)
def _cast(em: Emitter, node: fx.Node) -> str:
    return em.cast_to(node.args[0], em.dtype(node))


@handles(aten.rsqrt.default)
def _rsqrt(em: Emitter, node: fx.Node) -> str:
    return em.add("Reciprocal", [em.add("Sqrt", [em.value(node.args[0])], "sqrt")], "rsqrt")


@handles(aten.pow.Tensor_Scalar)
def _pow(em: Emitter, node: fx.Node) -> str:
    x, exponent = node.args[:2]
    dtype = em.dtype(node)
    if dtype is None or not dtype.is_floating_point:
        raise Unsupported("pow of an integer tensor")
    return em.add("Pow", [em.cast_to(x, dtype), em.constant(exponent, _np_dtype(dtype))], "pow")


@handles(aten.minimum.default, aten.min.other, aten.maximum.default, aten.max.other)
def _min_max(em: Emitter, node: fx.Node) -> str:
    op = "Min" if node.target in (aten.minimum.default, aten.min.other) else "Max"
    out = em.dtype(node)
    return em.add(op, [em.cast_to(v, out) for v in node.args[:2]], op.lower())


@handles(aten.group_norm.default)
def _group_norm(em: Emitter, node: fx.Node) -> str:
    """GroupNorm as InstanceNormalization over (batch, group) rows, then the per-channel affine (ONNX's
    GroupNormalization before opset 21 has per-group scales, a different op)."""
    x, groups = node.args[:2]
    weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), float(_arg(node, 4, "eps", 1e-5))
    rank = em.rank(x)
    rows = em.add("Reshape", [em.value(x), em.ints([0, int(groups), -1])], "groups")
    ones, zeros = (em.constant(np.full(int(groups), v, dtype=np.float32)) for v in (1.0, 0.0))
    normed = em.add("InstanceNormalization", [rows, ones, zeros], "groupnorm", epsilon=eps)
    out = em.add("Reshape", [normed, em.add("Shape", [em.value(x)], "shape")], "ungroup")
    axes = em.ints(list(range(1, rank - 1)))
    if weight is not None:
        out = em.add("Mul", [out, em.add("Unsqueeze", [em.value(weight), axes], "scale")], "scale")
    if bias is not None:
        out = em.add("Add", [out, em.add("Unsqueeze", [em.value(bias), axes], "shift")], "shift")
    return out
