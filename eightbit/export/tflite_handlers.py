"""TFLite handlers, one per ATen op of the converted graph (see `eightbit.export.tflite_writer`).

Each handler reads its activation inputs (dequantize nodes of int8 tensors), its constant weights and biases,
and writes one TFLite operator (or a short fixed sequence: PAD before a convolution whose padding TFLite's
SAME cannot express, TRANSPOSE around a reshape of an NHWC tensor) whose output is the tensor of the quantize
node that follows.  A ReLU/ReLU6/clamp left between an op and its quantize becomes the operator's fused
activation.  Kernel constraints that placement must have met (equal parameters through pooling, reshape and
concatenation; LOGISTIC/SOFTMAX's fixed output parameters) are checked here, never patched.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx

from eightbit.export.tflite_writer import (
    NCHW_TO_NHWC,
    QParams,
    TFLiteWriter,
    Unsupported,
    aten,
    handles,
    is_dequantize,
    is_op,
    is_quantize,
    quantization,
    quantize_params,
    schema,
    where,
)
from eightbit.graph import ops

OP, OPTS = schema.BuiltinOperator, schema.BuiltinOptions

_RELU = (aten.relu.default, aten.relu_.default)
_CLAMPS = (aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default, aten.clamp_.default)
FIXED_UNIT = QParams(1.0 / 256.0, -128)  # TFLite's LOGISTIC / SOFTMAX int8 output parameters


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(value) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return [int(v) for v in (values * 2 if len(values) == 1 else values)]


# ------------------------------------------------------------------------------------------- activations


def _activation_code(node: fx.Node) -> int:
    act = schema.ActivationFunctionType
    if node.target in _RELU:
        return act.RELU
    if node.target is aten.relu6.default:
        return act.RELU6
    hardtanh = "hardtanh" in str(node.target)
    lo = _arg(node, 1, "min_val" if hardtanh else "min", -1.0 if hardtanh else None)
    hi = _arg(node, 2, "max_val" if hardtanh else "max", 1.0 if hardtanh else None)
    bounds = {(0, None): act.RELU, (0, 6): act.RELU6, (-1, 1): act.RELU_N1_TO_1}
    code = bounds.get((lo, hi))
    if code is None:
        raise Unsupported(f"{where(node)}: a clamp to [{lo}, {hi}] has no TFLite fused activation")
    return code


def output_of(w: TFLiteWriter, node: fx.Node, *, fusable: bool = True) -> tuple[int, int]:
    """The output tensor of the operator written for `node` (the tensor of the quantize that follows it, through
    any ReLU/ReLU6/clamp) and the fused activation code."""
    act = schema.ActivationFunctionType.NONE
    end = node
    while len(end.users) == 1 and is_op(next(iter(end.users)), *_RELU, *_CLAMPS):
        end = next(iter(end.users))
        code = _activation_code(end)
        act = code if act == schema.ActivationFunctionType.NONE else _stricter(act, code)
    quantizes = [u for u in end.users if is_quantize(u)]
    others = [u.name for u in end.users if not is_quantize(u)]
    if others or not quantizes:
        raise Unsupported(
            f"{where(node)}: its output is used in float ({others or 'model output'}); quantize the model with "
            "QuantConfig(target=Target.TFLITE) so that every op has an int8 output"
        )
    params = quantize_params(w.gm, quantizes[0])
    if any(quantize_params(w.gm, q) != params for q in quantizes[1:]):
        raise Unsupported(f"{where(node)}: its output is quantized with two different parameter sets")
    if act != schema.ActivationFunctionType.NONE and not fusable:
        raise Unsupported(f"{where(node)}: TFLite cannot fuse a ReLU/clamp into this op")
    if w.float_model and fusable and act == schema.ActivationFunctionType.NONE and params.zero_point == -128:
        act = _dropped_clamp(params)
    index = w.activation(node.name, w.layout_shape(node), params)
    for q in quantizes:
        w.tensor_of[q] = index
    return index, act


def _dropped_clamp(params: QParams) -> int:
    """The float model's stand-in for a ReLU/ReLU6 that convert dropped because the int8 output saturates at
    least as tightly (a range starting at 0.0): RELU6 when the range ends at or below 6, else RELU."""
    top = params.scale * 255
    return schema.ActivationFunctionType.RELU6 if top <= 6.0 * (1 + 1e-6) else schema.ActivationFunctionType.RELU


def _stricter(a: int, b: int) -> int:
    act = schema.ActivationFunctionType
    if {a, b} <= {act.RELU, act.RELU6}:
        return act.RELU6
    raise Unsupported("two different clamps in a row")


def _same_params(w: TFLiteWriter, node: fx.Node, src: int, out: int, kernel: str) -> None:
    if w.float_model:
        return
    if w.qparams[src] != w.qparams[out]:
        raise Unsupported(
            f"{where(node)}: TFLite {kernel} keeps its input's quantization parameters, but the graph gives input "
            f"{w.qparams[src]} and output {w.qparams[out]}; quantize with QuantConfig(target=Target.TFLITE)"
        )


# ------------------------------------------------------------------------------------------- quantize / dequantize


@handles(ops.DEQUANTIZE)
def _dequantize(w: TFLiteWriter, node: fx.Node) -> None:
    source = node.args[0]
    if source in w.tensor_of:  # an activation: the same int8 tensor
        w.tensor_of[node] = w.tensor_of[source]
    elif not (isinstance(source, fx.Node) and source.op == "get_attr"):
        raise Unsupported(f"{where(node)}: dequantize of {source} which is not an int8 tensor")
    # a constant (weight, bias): its consumer reads it


@handles(ops.QUANTIZE)
def _quantize(w: TFLiteWriter, node: fx.Node) -> None:
    if node in w.tensor_of:  # written by its producer
        return
    source = node.args[0]
    if not is_dequantize(source) or source not in w.tensor_of:
        raise Unsupported(f"{where(node)}: quantize of a float value computed by {source}")
    src = w.tensor_of[source]
    params = quantize_params(w.gm, node)
    if w.float_model or w.qparams[src] == params:
        w.tensor_of[node] = src
        return
    out = w.activation(node.name, w.layout_shape(node), params)
    w.add_op(OP.QUANTIZE, [src], [out], by=node)  # int8 -> int8 requantization
    w.tensor_of[node] = out


# ------------------------------------------------------------------------------------------- constants


def weight_codes(w: TFLiteWriter, arg, user: fx.Node) -> tuple[np.ndarray, np.ndarray]:
    """A weight's int8 codes and its scales (one, or one per output channel); in a float model the dequantized
    float32 values and no scales."""
    if not is_dequantize(arg):
        raise Unsupported(f"{where(user)}: its weight is not an int8 constant")
    q, scale, zero_point, axis = (w.constant_value(a) if isinstance(a, fx.Node) else a for a in arg.args)
    if q is None or scale is None or q.dtype != torch.int8 or bool((zero_point != 0).any()):
        raise Unsupported(f"{where(user)}: TFLite weights are symmetric int8 constants")
    if scale.numel() > 1 and axis not in (0, -q.dim()):
        raise Unsupported(f"{where(user)}: per-channel weights must be per output channel")
    if w.float_model:
        shape = [-1] + [1] * (q.dim() - 1)
        return (q.float() * scale.reshape(shape if scale.numel() > 1 else [])).numpy(), np.ones(1, np.float32)
    if int(q.min()) < -127:
        raise Unsupported(f"{where(user)}: TFLite int8 weights use the narrow range [-127, 127]")
    return q.numpy(), scale.reshape(-1).numpy().astype(np.float32)


def weight_tensor(w: TFLiteWriter, name: str, values: np.ndarray, scales: np.ndarray, axis: int) -> int:
    if w.float_model:
        return w.constant(name, values.astype(np.float32), schema.TensorType.FLOAT32)
    quant = quantization(scales, [0] * len(scales), axis if len(scales) > 1 else 0)
    return w.constant(name, values.astype(np.int8), schema.TensorType.INT8, quant)


def bias_tensor(
    w: TFLiteWriter, name: str, bias, user: fx.Node, channels: int, in_scale: float, scales, products: int
) -> int:
    """int32 bias at scale input_scale * weight_scale (zeros when the layer has none); float32 in a float model.

    TFLite kernels add the bias to the int32 sum of `products` products (x - zero point) * w, each at most
    255 * 128 in magnitude, without a saturation check: a bias code at the int32 limit (a dead channel whose
    weight scale is tiny) wraps around.  Bias codes are kept within the limit minus that headroom, a change of
    under 0.002% of such a bias."""
    value = None
    if is_dequantize(bias):
        q, scale, zero_point, _ = (w.constant_value(a) if isinstance(a, fx.Node) else a for a in bias.args)
        if q is None or q.dtype != torch.int32:
            raise Unsupported(f"{where(user)}: its bias is not an int32 constant")
        value = q.double() * scale.double() if w.float_model else q
    elif bias is not None:
        raise Unsupported(f"{where(user)}: its bias is not quantized to int32 (per-channel input activations?)")
    if w.float_model:
        array = np.zeros(channels, np.float32) if value is None else value.float().numpy()
        return w.constant(name, array, schema.TensorType.FLOAT32)
    codes = np.zeros(channels, np.int64) if value is None else value.numpy().astype(np.int64)
    limit = 2**31 - 1 - products * 255 * 128
    codes = np.clip(codes, -limit, limit).astype(np.int32)
    bias_scales = [in_scale * float(s) for s in scales]
    quant = quantization(bias_scales, [0] * len(bias_scales))
    return w.constant(name, codes, schema.TensorType.INT32, quant)


# ------------------------------------------------------------------------------------------- padding


def _same_padding(in_size: int, out_size: int, k: int, s: int, d: int, before: int) -> bool:
    effective = (k - 1) * d + 1
    total = max((out_size - 1) * s + effective - in_size, 0)
    return out_size == math.ceil(in_size / s) and before == total // 2


def padding_mode(w, x, node, kernel, stride, dilation, pads) -> tuple[int, list[int] | None]:
    """TFLite's padding for a window op with explicit pads [top, left, bottom, right]: VALID, SAME, or VALID after
    an explicit PAD (returned as the pads to apply)."""
    if not any(pads):
        return schema.Padding.VALID, None
    (_, _, ih, iw), (_, _, oh, ow) = w.shapes[x], w.shapes[node]
    if _same_padding(ih, oh, kernel[0], stride[0], dilation[0], pads[0]) and _same_padding(
        iw, ow, kernel[1], stride[1], dilation[1], pads[1]
    ):
        return schema.Padding.SAME, None
    return schema.Padding.VALID, pads


def pad_nhwc(w: TFLiteWriter, node: fx.Node, src: int, x, pads: list[int]) -> int:
    """An explicit PAD of NHWC tensor `src` by [top, left, bottom, right] (pads with the zero point)."""
    n, c, h, wd = w.shapes[x]
    padded = (n, h + pads[0] + pads[2], wd + pads[1] + pads[3], c)
    out = w.like(f"{node.name}_padded", padded, src)
    paddings = w.int32_constant(f"{node.name}_paddings", [[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]])
    w.add_op(OP.PAD, [src, paddings], [out], OPTS.PadOptions, schema.PadOptionsT(), by=node)
    return out


# ------------------------------------------------------------------------------------------- layers


@handles(aten.conv2d.default, ops.CONV2D_PADDED)
def _conv(w: TFLiteWriter, node: fx.Node) -> None:
    if node.target is ops.CONV2D_PADDED:
        x, weight, bias, stride, pads, dilation, groups = node.args
        pads = [int(p) for p in pads]
    else:
        x, weight = node.args[:2]
        bias = _arg(node, 2, "bias")
        padding = _arg(node, 4, "padding", 0)
        if isinstance(padding, str):
            raise Unsupported(f"{where(node)}: string padding")
        ph, pw = _pair(padding)
        pads = [ph, pw, ph, pw]
        stride, dilation, groups = _arg(node, 3, "stride", 1), _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
    stride, dilation = _pair(stride), _pair(dilation)
    codes, scales = weight_codes(w, weight, node)
    out_channels, in_per_group, kh, kw = codes.shape
    channels = w.shapes[x][1]
    src = w.source_tensor(x, node)
    mode, explicit = padding_mode(w, x, node, (kh, kw), stride, dilation, pads)
    if explicit is not None:
        src = pad_nhwc(w, node, src, x, explicit)
    in_scale = 1.0 if w.float_model else w.qparams[src].scale
    b = bias_tensor(w, f"{node.name}_bias", bias, node, out_channels, in_scale, scales, kh * kw * in_per_group)
    out, act = output_of(w, node)
    depthwise = groups == channels and in_per_group == 1 and groups > 1
    if depthwise:
        filt = weight_tensor(w, f"{node.name}_filter", codes.transpose(1, 2, 3, 0), scales, axis=3)
        options = schema.DepthwiseConv2DOptionsT()
        options.depthMultiplier = out_channels // channels
        code, kind = OP.DEPTHWISE_CONV_2D, OPTS.DepthwiseConv2DOptions
    else:  # groups > 1 (not depthwise): TFLite infers them from the filter's input depth
        filt = weight_tensor(w, f"{node.name}_filter", codes.transpose(0, 2, 3, 1), scales, axis=0)
        options = schema.Conv2DOptionsT()
        code, kind = OP.CONV_2D, OPTS.Conv2DOptions
    options.padding, options.strideH, options.strideW = mode, stride[0], stride[1]
    options.dilationHFactor, options.dilationWFactor = dilation
    options.fusedActivationFunction = act
    w.add_op(code, [src, filt, b], [out], kind, options, by=node)


@handles(aten.linear.default)
def _linear(w: TFLiteWriter, node: fx.Node) -> None:
    x, weight = node.args[:2]
    if len(w.shapes[x]) != 2:
        raise Unsupported(f"{where(node)}: TFLite export supports linear layers on (batch, features) inputs")
    codes, scales = weight_codes(w, weight, node)
    src = w.source_tensor(x, node)
    in_scale = 1.0 if w.float_model else w.qparams[src].scale
    bias = _arg(node, 2, "bias")
    b = bias_tensor(w, f"{node.name}_bias", bias, node, codes.shape[0], in_scale, scales, codes.shape[1])
    filt = weight_tensor(w, f"{node.name}_weights", codes, scales, axis=0)
    out, act = output_of(w, node)
    options = schema.FullyConnectedOptionsT()
    options.fusedActivationFunction = act
    kind = OPTS.FullyConnectedOptions
    w.add_op(OP.FULLY_CONNECTED, [src, filt, b], [out], kind, options, by=node)


def _pool(w: TFLiteWriter, node: fx.Node, code: int, pads: list[int]) -> None:
    x, kernel = node.args[0], _pair(node.args[1])
    stride = _pair(_arg(node, 2, "stride", []) or kernel)
    mode, explicit = padding_mode(w, x, node, kernel, stride, (1, 1), pads)
    if explicit is not None:
        raise Unsupported(f"{where(node)}: pooling padding {pads} is not TFLite's SAME")
    src = w.source_tensor(x, node)
    out, act = output_of(w, node)
    _same_params(w, node, src, out, "pooling")
    options = schema.Pool2DOptionsT()
    options.padding, options.strideH, options.strideW = mode, stride[0], stride[1]
    options.filterHeight, options.filterWidth = kernel
    options.fusedActivationFunction = act
    w.add_op(code, [src], [out], OPTS.Pool2DOptions, options, by=node)


def _ceil_mode_changes_nothing(w: TFLiteWriter, node: fx.Node, ceil_mode: bool, kernel, stride, pads) -> bool:
    if not ceil_mode:
        return True
    _, _, ih, iw = w.shapes[node.args[0]]
    return all((size + 2 * p - k) % s == 0 for size, p, k, s in zip((ih, iw), pads[:2], kernel, stride, strict=True))


@handles(aten.max_pool2d.default)
def _max_pool(w: TFLiteWriter, node: fx.Node) -> None:
    kernel = _pair(node.args[1])
    stride = _pair(_arg(node, 2, "stride", []) or kernel)
    ph, pw = _pair(_arg(node, 3, "padding", 0))
    if _pair(_arg(node, 4, "dilation", 1)) != [1, 1]:
        raise Unsupported(f"{where(node)}: dilated max pooling")
    if not _ceil_mode_changes_nothing(w, node, _arg(node, 5, "ceil_mode", False), kernel, stride, [ph, pw]):
        raise Unsupported(f"{where(node)}: ceil_mode pooling")
    _pool(w, node, OP.MAX_POOL_2D, [ph, pw, ph, pw])


@handles(aten.avg_pool2d.default)
def _avg_pool(w: TFLiteWriter, node: fx.Node) -> None:
    kernel = _pair(node.args[1])
    stride = _pair(_arg(node, 2, "stride", []) or kernel)
    ph, pw = _pair(_arg(node, 3, "padding", 0))
    if _arg(node, 6, "divisor_override") is not None:
        raise Unsupported(f"{where(node)}: avg_pool2d divisor_override")
    if (ph or pw) and _arg(node, 5, "count_include_pad", True):
        raise Unsupported(f"{where(node)}: padded average pooling counting the padding (TFLite's SAME excludes it)")
    if not _ceil_mode_changes_nothing(w, node, _arg(node, 4, "ceil_mode", False), kernel, stride, [ph, pw]):
        raise Unsupported(f"{where(node)}: ceil_mode pooling")
    _pool(w, node, OP.AVERAGE_POOL_2D, [ph, pw, ph, pw])


def _mean_axes(w: TFLiteWriter, x, dims) -> list[int]:
    rank = len(w.shapes[x])
    dims = sorted(int(d) % rank for d in ([dims] if isinstance(dims, int) else dims))
    return sorted(NCHW_TO_NHWC.index(d) for d in dims) if rank == 4 else dims


def _write_mean(w: TFLiteWriter, node: fx.Node, x, axes: list[int], keepdims: bool) -> None:
    src = w.source_tensor(x, node)
    out, _ = output_of(w, node, fusable=False)
    axis = w.int32_constant(f"{node.name}_axes", axes)
    options = schema.ReducerOptionsT()
    options.keepDims = keepdims
    w.add_op(OP.MEAN, [src, axis], [out], OPTS.ReducerOptions, options, by=node)


@handles(aten.mean.dim)
def _mean(w: TFLiteWriter, node: fx.Node) -> None:
    if _arg(node, 3, "dtype") is not None:
        raise Unsupported(f"{where(node)}: mean with dtype")
    x = node.args[0]
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if len(w.shapes[x]) == 4 and not keepdim and _mean_axes(w, x, node.args[1]) != [1, 2]:
        raise Unsupported(f"{where(node)}: mean over NCHW axes other than H, W without keepdim")
    _write_mean(w, node, x, _mean_axes(w, x, node.args[1]), keepdim)


@handles(aten.adaptive_avg_pool2d.default)
def _adaptive_avg_pool(w: TFLiteWriter, node: fx.Node) -> None:
    if _pair(node.args[1]) != [1, 1]:
        raise Unsupported(f"{where(node)}: adaptive_avg_pool2d to a size other than 1x1")
    _write_mean(w, node, node.args[0], [1, 2], True)
