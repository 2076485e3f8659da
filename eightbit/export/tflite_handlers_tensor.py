"""TFLite handlers for elementwise math, activations and data movement (see `eightbit.export.tflite_writer`)."""

from __future__ import annotations

from torch import fx

from eightbit.export.tflite_handlers import FIXED_UNIT, _arg, _same_params, output_of
from eightbit.export.tflite_writer import (
    NCHW_TO_NHWC,
    NHWC_TO_NCHW,
    TFLiteWriter,
    Unsupported,
    aten,
    code_shift,
    handles,
    is_quantize,
    quantize_params,
    schema,
    where,
)

OP, OPTS = schema.BuiltinOperator, schema.BuiltinOptions

# ------------------------------------------------------------------------------------------- elementwise


def _binary(w: TFLiteWriter, node: fx.Node, code: int, kind: int, options) -> None:
    a, b = node.args[:2]
    if _arg(node, 2, "alpha", 1) != 1:
        raise Unsupported(f"{where(node)}: add with alpha")
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        raise Unsupported(f"{where(node)}: {node.target} with a constant operand (only int8 tensors are supported)")
    if len(w.shapes[a]) != len(w.shapes[b]):
        raise Unsupported(f"{where(node)}: broadcasting between ranks {len(w.shapes[a])} and {len(w.shapes[b])}")
    inputs = [w.source_tensor(a, node), w.source_tensor(b, node)]
    out, act = output_of(w, node)
    options.fusedActivationFunction = act
    w.add_op(code, inputs, [out], kind, options, by=node)


@handles(aten.add.Tensor, aten.add_.Tensor)
def _add(w: TFLiteWriter, node: fx.Node) -> None:
    _binary(w, node, OP.ADD, OPTS.AddOptions, schema.AddOptionsT())


@handles(aten.mul.Tensor)
def _mul(w: TFLiteWriter, node: fx.Node) -> None:
    _binary(w, node, OP.MUL, OPTS.MulOptions, schema.MulOptionsT())


def _layout_axis(rank: int, dim: int) -> int:
    dim %= rank
    return NCHW_TO_NHWC.index(dim) if rank == 4 else dim


@handles(aten.cat.default)
def _cat(w: TFLiteWriter, node: fx.Node) -> None:
    tensors = list(node.args[0])
    rank = len(w.shapes[node])
    sources = [w.source_tensor(t, node) for t in tensors]
    out, act = output_of(w, node)
    for src in sources:
        _same_params(w, node, src, out, "CONCATENATION")
    options = schema.ConcatenationOptionsT()
    options.axis = _layout_axis(rank, int(_arg(node, 1, "dim", 0)))
    options.fusedActivationFunction = act
    w.add_op(OP.CONCATENATION, sources, [out], OPTS.ConcatenationOptions, options, by=node)


# ------------------------------------------------------------------------------------------- activations


def _fixed_output(w: TFLiteWriter, node: fx.Node, out: int, kernel: str) -> None:
    if not w.float_model and w.qparams[out] != FIXED_UNIT:
        raise Unsupported(
            f"{where(node)}: TFLite {kernel} outputs scale 1/256, zero point -128; the graph has {w.qparams[out]}. "
            "Quantize with QuantConfig(target=Target.TFLITE)"
        )


@handles(aten.sigmoid.default)
def _sigmoid(w: TFLiteWriter, node: fx.Node) -> None:
    src = w.source_tensor(node.args[0], node)
    out, _ = output_of(w, node, fusable=False)
    _fixed_output(w, node, out, "LOGISTIC")
    w.add_op(OP.LOGISTIC, [src], [out], by=node)


@handles(aten.softmax.int, aten._softmax.default)
def _softmax(w: TFLiteWriter, node: fx.Node) -> None:
    x = node.args[0]
    rank = len(w.shapes[x])
    if _layout_axis(rank, int(node.args[1])) != rank - 1:
        raise Unsupported(f"{where(node)}: TFLite SOFTMAX runs over the last (NHWC) axis only")
    src = w.source_tensor(x, node)
    out, _ = output_of(w, node, fusable=False)
    _fixed_output(w, node, out, "SOFTMAX")
    options = schema.SoftmaxOptionsT()
    options.beta = 1.0
    w.add_op(OP.SOFTMAX, [src], [out], OPTS.SoftmaxOptions, options, by=node)


@handles(aten.hardswish.default)
def _hardswish(w: TFLiteWriter, node: fx.Node) -> None:
    src = w.source_tensor(node.args[0], node)
    out, _ = output_of(w, node, fusable=False)
    w.add_op(OP.HARD_SWISH, [src], [out], by=node)


# ------------------------------------------------------------------------------------------- data movement


@handles(aten.clone.default, aten.contiguous.default, aten.dropout.default, aten.alias.default)
def _identity(w: TFLiteWriter, node: fx.Node) -> None:
    src = w.source_tensor(node.args[0], node)
    for user in node.users:
        if not is_quantize(user):
            raise Unsupported(f"{where(node)}: used in float by {user.name}")
        if not w.float_model and quantize_params(w.gm, user) != w.qparams[src]:
            raise Unsupported(f"{where(node)}: an identity that changes quantization parameters")
        w.tensor_of[user] = src


def _transpose(w: TFLiteWriter, node: fx.Node, src: int, perm, shape, name: str, out: int | None = None) -> int:
    out = w.like(name, shape, src) if out is None else out
    perm_t = w.int32_constant(f"{name}_perm", perm)
    options = schema.TransposeOptionsT()
    w.add_op(OP.TRANSPOSE, [src, perm_t], [out], OPTS.TransposeOptions, options, by=node)
    return out


@handles(
    aten.flatten.using_ints,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
)
def _reshape(w: TFLiteWriter, node: fx.Node) -> None:
    """RESHAPE in NCHW order: an NHWC rank-4 tensor with more than one pixel is transposed to NCHW first (and a
    rank-4 result back to NHWC), so that elements keep PyTorch's order."""
    x = node.args[0]
    in_shape, out_shape = tuple(w.shapes[x]), tuple(w.shapes[node])
    src = w.source_tensor(x, node)
    out, _ = output_of(w, node, fusable=False)
    _same_params(w, node, src, out, "RESHAPE")
    pixels = lambda s: len(s) == 4 and s[2] * s[3] > 1  # noqa: E731
    if pixels(in_shape):
        nchw = tuple(in_shape)
        src = _transpose(w, node, src, NHWC_TO_NCHW, nchw, f"{node.name}_to_nchw")
    if pixels(out_shape):
        reshaped = w.like(f"{node.name}_nchw", out_shape, src)
        _write_reshape(w, node, src, reshaped, out_shape)
        nhwc = tuple(out_shape[i] for i in NCHW_TO_NHWC)
        _transpose(w, node, reshaped, NCHW_TO_NHWC, nhwc, f"{node.name}_to_nhwc", out=out)
        return
    layout_out = w.layout_shape(node)
    _write_reshape(w, node, src, out, layout_out)


def _write_reshape(w: TFLiteWriter, node: fx.Node, src: int, out: int, shape) -> None:
    shape_t = w.int32_constant(f"{node.name}_shape_{out}", list(shape))
    options = schema.ReshapeOptionsT()
    options.newShape = [int(s) for s in shape]
    w.add_op(OP.RESHAPE, [src, shape_t], [out], OPTS.ReshapeOptions, options, by=node)


@handles(aten.constant_pad_nd.default, aten.pad.default)
def _pad(w: TFLiteWriter, node: fx.Node) -> None:
    """PAD, on int8 codes (eightbit pads quantized codes with the zero point) or between dequantize and quantize
    with zeros; TFLite pads int8 tensors with their zero point, which is the same."""
    x, pads = node.args[0], [int(p) for p in node.args[1]]
    value = _arg(node, 2, "value", 0) if node.target is aten.constant_pad_nd.default else _arg(node, 3, "value", 0)
    if node.target is aten.pad.default and _arg(node, 2, "mode", "constant") != "constant":
        raise Unsupported(f"{where(node)}: only constant padding")
    src = w.source_tensor(x, node)
    rank = len(w.shapes[node])
    integer = is_quantize(x)
    expected = (w.qparams[src].zero_point + code_shift(w.gm, x)) if integer and not w.float_model else 0
    if integer and w.float_model:
        expected = int(value or 0)  # padding with the zero point's code, which is 0.0 in the float model
    if (value or 0) != expected:
        raise Unsupported(f"{where(node)}: padding with {value}, not the zero point (TFLite pads with it)")
    by_dim = [[0, 0] for _ in range(rank)]
    for i in range(len(pads) // 2):  # torch lists the last dimension first
        by_dim[rank - 1 - i] = [pads[2 * i], pads[2 * i + 1]]
    if rank == 4:
        by_dim = [by_dim[i] for i in NCHW_TO_NHWC]
    if integer:
        out = w.like(node.name, w.layout_shape(node), src)
        w.tensor_of[node] = out
    else:
        out, _ = output_of(w, node, fusable=False)
        _same_params(w, node, src, out, "PAD")
    paddings = w.int32_constant(f"{node.name}_paddings", by_dim)
    w.add_op(OP.PAD, [src, paddings], [out], OPTS.PadOptions, schema.PadOptionsT(), by=node)
