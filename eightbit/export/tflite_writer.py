"""The state behind TFLite emission (`eightbit.export.tflite`): tensors, buffers, operators of one subgraph, and
the TFLite tensor of each FX node.

The converted FX graph is the only IR.  Its activations are uint8 (or int8) codes between `eightbit::quantize`
and `eightbit::dequantize`; in TFLite every quantize output becomes one int8 tensor (uint8 codes shifted by 128,
zero point too: the same real values), each dequantize of an activation is that same tensor, and each compute op
between a dequantize and a quantize becomes one TFLite operator writing the quantize's tensor.  Rank-4 tensors
are NCHW in the graph and NHWC in the file.  Handlers, one per ATen op, live in `tflite_handlers`.

With `float_model=True` the same walk writes a float32 model of the same graph (weights dequantized, no
activation rounding), the speed baseline of the int8 file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import flatbuffers
import numpy as np
import torch
from torch import fx

from eightbit.graph import ops
from eightbit.graph.utils import attr_value, module_path

try:  # the `tflite` extra: the TFLite schema's object API ships inside tflite-micro
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema
except ImportError:  # pragma: no cover - exercised only without the extra
    schema = None

aten = torch.ops.aten
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


class Unsupported(Exception):
    """The graph holds an op, or an op variant, that the TFLite int8 export cannot write."""


def require_schema():
    if schema is None:
        raise ImportError(
            "TFLite export needs the `tflite` extra: pip install 'eightbit[tflite]' "
            "(tflite-micro ships the TFLite schema, ai-edge-litert the LiteRT interpreter)"
        )
    return schema


@dataclass(frozen=True)
class QParams:
    """Per-tensor int8 parameters of an activation tensor (TFLite convention)."""

    scale: float
    zero_point: int


def where(node: fx.Node) -> str:
    """A node's name and the module it comes from, for error messages."""
    path = module_path(node)
    return f"{node.name} ({node.target})" + (f" in {path!r}" if path else "")


class TFLiteWriter:
    """One subgraph under construction.  `tensor_of` maps an FX node to its TFLite tensor index."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, tuple], *, float_model: bool = False):
        require_schema()
        self.gm = gm
        self.shapes = shapes
        self.float_model = float_model
        self.tensors: list = []
        self.buffers: list = [schema.BufferT()]  # buffer 0: the empty buffer of every non-constant tensor
        self.operators: list = []
        self.opcodes: dict[int, int] = {}  # builtin code -> index in the model's operator codes
        self.tensor_of: dict[fx.Node, int] = {}
        self.qparams: dict[int, QParams] = {}  # tensor index -> its int8 parameters (activations)
        self.ops_of: dict[str, list[int]] = {}  # FX node name -> indices of the operators written for it

    # ------------------------------------------------------------------------------------------- tensors

    def add_tensor(self, name: str, shape, dtype: int, quant=None, data: np.ndarray | None = None) -> int:
        t = schema.TensorT()
        t.name, t.shape, t.type = name, [int(s) for s in shape], dtype
        t.quantization = quant
        t.buffer = 0
        if data is not None:
            buf = schema.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        return len(self.tensors) - 1

    def activation(self, name: str, shape, params: QParams | None) -> int:
        """A new activation tensor: int8 with `params`, or float32 in a float model (or when params is None)."""
        if self.float_model or params is None:
            return self.add_tensor(name, shape, schema.TensorType.FLOAT32)
        index = self.add_tensor(name, shape, schema.TensorType.INT8, quantization([params.scale], [params.zero_point]))
        self.qparams[index] = params
        return index

    def like(self, name: str, shape, source: int) -> int:
        """A new activation tensor with the parameters (and type) of tensor `source`."""
        return self.activation(name, shape, self.qparams.get(source))

    def constant(self, name: str, array: np.ndarray, dtype: int, quant=None) -> int:
        return self.add_tensor(name, array.shape, dtype, quant, data=array)

    def int32_constant(self, name: str, values) -> int:
        array = np.asarray(values, dtype=np.int32)
        return self.constant(name, array, schema.TensorType.INT32)

    def layout_shape(self, node: fx.Node) -> tuple:
        """The node's shape as stored in the file (NHWC for rank 4)."""
        shape = tuple(self.shapes[node])
        return tuple(shape[i] for i in NCHW_TO_NHWC) if len(shape) == 4 else shape

    # ------------------------------------------------------------------------------------------- operators

    def add_op(self, code: int, inputs: list[int], outputs: list[int], options_type: int = 0, options=None, *, by=None):
        if code not in self.opcodes:
            self.opcodes[code] = len(self.opcodes)
        op = schema.OperatorT()
        op.opcodeIndex = self.opcodes[code]
        op.inputs, op.outputs = list(inputs), list(outputs)
        op.builtinOptionsType, op.builtinOptions = options_type, options
        self.operators.append(op)
        if by is not None:
            self.ops_of.setdefault(by.name, []).append(len(self.operators) - 1)

    # ------------------------------------------------------------------------------------------- graph reading

    def source_tensor(self, arg, user: fx.Node) -> int:
        """The TFLite tensor an op reads for activation argument `arg` (a dequantize of a mapped tensor)."""
        if isinstance(arg, fx.Node) and arg in self.tensor_of:
            return self.tensor_of[arg]
        raise Unsupported(f"{where(user)} reads {arg!r}, which is not an int8 activation")

    def constant_value(self, node) -> torch.Tensor | None:
        return attr_value(self.gm, node)

    def finish(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        sub = schema.SubGraphT()
        sub.tensors, sub.inputs, sub.outputs, sub.operators = self.tensors, inputs, outputs, self.operators
        sub.name = "main"
        model = schema.ModelT()
        model.version = 3
        model.description = description
        model.subgraphs = [sub]
        model.buffers = self.buffers
        codes = []
        for code in self.opcodes:  # insertion order is the index order
            c = schema.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), 1
            codes.append(c)
        model.operatorCodes = codes
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def quantization(scales, zero_points, axis: int = 0):
    q = schema.QuantizationParametersT()
    q.scale = [float(s) for s in scales]
    q.zeroPoint = [int(z) for z in zero_points]
    q.quantizedDimension = axis
    return q


def quantize_params(gm: fx.GraphModule, q: fx.Node) -> QParams:
    """The int8 parameters of a quantize node's output (uint8 codes shift by 128)."""
    x, scale, zero_point, qmin, qmax, axis = q.args
    scale_t, zp_t = attr_value(gm, scale), attr_value(gm, zero_point)
    if scale_t is None or zp_t is None or scale_t.numel() != 1:
        raise Unsupported(f"{where(q)}: TFLite activations take one constant scale and zero point (per tensor)")
    if zp_t.dtype == torch.uint8 and (qmin, qmax) == (0, 255):
        shift = 128
    elif zp_t.dtype == torch.int8 and (qmin, qmax) == (-128, 127):
        shift = 0
    else:
        raise Unsupported(f"{where(q)}: activations of {qmin}..{qmax} in {zp_t.dtype}: TFLite int8 needs 8-bit codes")
    return QParams(float(scale_t), int(zp_t) - shift)


def code_shift(gm: fx.GraphModule, q: fx.Node) -> int:
    """What to subtract from eightbit's codes of quantize node `q` to get TFLite's int8 codes."""
    return 128 if attr_value(gm, q.args[2]).dtype == torch.uint8 else 0


def is_op(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_quantize(node) -> bool:
    return is_op(node, ops.QUANTIZE)


def is_dequantize(node) -> bool:
    return is_op(node, ops.DEQUANTIZE)


Handler = Callable[[TFLiteWriter, fx.Node], None]
HANDLERS: dict[object, Handler] = {}


def handles(*targets):
    def register(fn: Handler) -> Handler:
        for target in targets:
            HANDLERS[target] = fn
        return fn

    return register
