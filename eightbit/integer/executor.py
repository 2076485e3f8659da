"""Run an int8 .tflite model with integer kernels only (`IntegerReference`), keep every tensor for layer-by-layer
comparison with TFLM, and measure accumulators per layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eightbit.integer import kernels, nonlinear
from eightbit.integer.fixed_point import quantize_value
from eightbit.integer.kernels import Accumulator, AccumulatorStats

try:
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema
except ImportError:  # pragma: no cover - only without the `tflite` extra
    schema = None

_OP_NAMES = {} if schema is None else {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


class UnsupportedOperator(ValueError):
    """The model holds operators the integer reference has no kernel for."""


@dataclass
class LayerAccumulator:
    """One dot-product layer's accumulator measurement."""

    op_index: int
    op: str
    output: str
    products_per_output: int
    stats: AccumulatorStats


class IntegerReference:
    """Integer-only execution of an int8 TFLite model (int8/int32 tensors, fixed-point requantization)."""

    SUPPORTED = (
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "FULLY_CONNECTED",
        "ADD",
        "MUL",
        "MEAN",
        "AVERAGE_POOL_2D",
        "MAX_POOL_2D",
        "PAD",
        "RESHAPE",
        "TRANSPOSE",
        "CONCATENATION",
        "QUANTIZE",
        "DEQUANTIZE",
        "HARD_SWISH",
        "LOGISTIC",
        "SOFTMAX",
    )

    def __init__(self, model: bytes, accumulator: Accumulator | None = None):
        if schema is None:
            raise ImportError("the integer reference reads .tflite files: pip install 'eightbit[tflite]'")
        self.model = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
        self.graph = self.model.subgraphs[0]
        self.accumulator = accumulator or Accumulator()
        missing = [
            f"{i}: {self.op_name(i)}" for i in range(len(self.graph.operators)) if self.op_name(i) not in self.SUPPORTED
        ]
        if missing:
            raise UnsupportedOperator(f"no integer kernel for operators {missing}; supported: {list(self.SUPPORTED)}")
        self.layers: dict[int, LayerAccumulator] = {}

    def op_name(self, index: int) -> str:
        op = self.graph.operators[index]
        code = self.model.operatorCodes[op.opcodeIndex]
        return _OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode))

    # ------------------------------------------------------------------------------------------- tensors

    def _tensor(self, index: int):
        return self.graph.tensors[index]

    def tensor_type(self, index: int) -> str:
        """The tensor's element type as the schema names it ("INT8", "INT32", "FLOAT32")."""
        types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        return types[self._tensor(index).type]

    def params(self, index: int) -> tuple[np.float32, int]:
        q = self._tensor(index).quantization
        return np.float32(q.scale[0]), int(q.zeroPoint[0])

    def constant(self, index: int) -> np.ndarray:
        t = self._tensor(index)
        data = self.model.buffers[t.buffer].data
        dtype = {
            schema.TensorType.INT8: np.int8,
            schema.TensorType.INT32: np.int32,
            schema.TensorType.FLOAT32: np.float32,
        }
        return np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=dtype[t.type]).reshape(t.shape)

    def _activation_range(self, out: int, code: int) -> tuple[int, int]:
        scale, zp = self.params(out)
        act = schema.ActivationFunctionType
        lo, hi = -128, 127
        if code in (act.RELU, act.RELU6):
            lo = max(lo, quantize_value(0.0, scale, zp))
        if code == act.RELU6:
            hi = min(hi, quantize_value(6.0, scale, zp))
        if code == act.RELU_N1_TO_1:
            lo, hi = max(lo, quantize_value(-1.0, scale, zp)), min(hi, quantize_value(1.0, scale, zp))
        return lo, hi

    # ------------------------------------------------------------------------------------------- execution

    def run(self, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
        """Outputs and every activation tensor (index -> array) for one invocation."""
        values: dict[int, np.ndarray] = {}
        for index, value in zip(self.graph.inputs, inputs, strict=True):
            values[int(index)] = np.asarray(value)
        for i, op in enumerate(self.graph.operators):
            values[int(op.outputs[0])] = self.run_operator(i, values)
        return [values[int(i)] for i in self.graph.outputs], values

    def run_operator(self, index: int, values: dict[int, np.ndarray]) -> np.ndarray:
        """Operator `index` alone on the tensors in `values` (tensor index -> array): its output tensor.  Used to
        check another runtime's kernel on that runtime's own inputs."""
        op = self.graph.operators[index]
        out = int(op.outputs[0])
        dtype = np.float32 if self._tensor(out).type == schema.TensorType.FLOAT32 else np.int8
        return self._run_op(index, op, values).astype(dtype).reshape(self._tensor(out).shape)

    def _input(self, op, k: int, values) -> np.ndarray:
        index = int(op.inputs[k])
        return values[index] if index in values else self.constant(index)

    def _stats(self, i: int, op, products: int) -> AccumulatorStats | None:
        if self.accumulator.exact:
            return None
        if i not in self.layers:
            name = self._tensor(int(op.outputs[0])).name
            name = name.decode() if isinstance(name, bytes) else name
            self.layers[i] = LayerAccumulator(i, self.op_name(i), name, products, AccumulatorStats())
        return self.layers[i].stats

    def _run_op(self, i: int, op, values) -> np.ndarray:
        name = self.op_name(i)
        handler = getattr(self, f"_op_{name.lower()}")
        return handler(i, op, values)

    _DOT_KINDS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise", "FULLY_CONNECTED": "fc"}

    def _dot(self, i, op, values, kind: str) -> np.ndarray:
        acc, mults, shifts, zo, lo, hi = self._dot_accumulator(i, op, values, kind)
        return kernels.requantize(acc, mults, shifts, zo, lo, hi)

    def exact_output(self, index: int, values: dict[int, np.ndarray]) -> np.ndarray:
        """A dot-product operator's output code before rounding, in double precision: the int32 accumulator times
        input scale x weight scale / output scale (exact scales) plus the zero point, clamped to the fused
        activation's range.  Tells which of two runtimes that differ by one code rounded correctly."""
        op = self.graph.operators[index]
        kind = self._DOT_KINDS.get(self.op_name(index))
        if kind is None:
            raise ValueError(f"operator {index} is a {self.op_name(index)}, not one of {list(self._DOT_KINDS)}")
        acc, _, _, zo, lo, hi = self._dot_accumulator(index, op, values, kind)
        (si, _), (so, _) = self.params(int(op.inputs[0])), self.params(int(op.outputs[0]))
        scales = np.array(self._tensor(int(op.inputs[1])).quantization.scale, dtype=np.float64)
        real = acc.astype(np.float64) * (float(si) * np.broadcast_to(scales, (acc.shape[-1],)) / float(so)) + zo
        return np.clip(real, lo, hi).reshape(self._tensor(int(op.outputs[0])).shape)

    def _dot_accumulator(self, i, op, values, kind: str):
        """The int32 accumulators (bias included) and the requantization parameters of a dot-product operator."""
        x, filt, bias = (self._input(op, k, values) for k in range(3))
        (si, zi), (so, zo) = self.params(int(op.inputs[0])), self.params(int(op.outputs[0]))
        wq = self._tensor(int(op.inputs[1])).quantization
        opts = op.builtinOptions
        lo, hi = self._activation_range(int(op.outputs[0]), opts.fusedActivationFunction)
        if kind == "fc":
            stats = self._stats(i, op, filt.shape[1])
            acc = kernels.fully_connected(x.reshape(-1, filt.shape[1]), zi, filt, bias, self.accumulator, stats)
        else:
            kernel = filt.shape[1:3]
            stride, dilation = (opts.strideH, opts.strideW), (opts.dilationHFactor, opts.dilationWFactor)
            out_hw, pads = kernels.window_geometry(
                x.shape, kernel, stride, dilation, opts.padding == schema.Padding.SAME
            )
            geometry = (kernel, stride, dilation, out_hw, pads)
            if kind == "depthwise":
                stats = self._stats(i, op, kernel[0] * kernel[1])
                multiplier = filt.shape[3] // x.shape[3]
                acc = kernels.depthwise_conv2d(x, zi, filt, bias, geometry, multiplier, self.accumulator, stats)
            else:
                stats = self._stats(i, op, kernel[0] * kernel[1] * filt.shape[3])
                groups = x.shape[3] // filt.shape[3]
                acc = kernels.conv2d(x, zi, filt, bias, geometry, groups, self.accumulator, stats)
        channels = acc.shape[-1]
        scales = list(wq.scale) if len(wq.scale) > 1 else list(wq.scale) * channels
        mults, shifts = kernels.channel_multipliers(si, np.float32(scales), so)
        return acc, mults, shifts, zo, lo, hi

    def _op_conv_2d(self, i, op, values):
        return self._dot(i, op, values, "conv")

    def _op_depthwise_conv_2d(self, i, op, values):
        return self._dot(i, op, values, "depthwise")

    def _op_fully_connected(self, i, op, values):
        return self._dot(i, op, values, "fc")

    def _binary(self, i, op, values, fn):
        a, b = self._input(op, 0, values), self._input(op, 1, values)
        out = int(op.outputs[0])
        lo, hi = self._activation_range(out, op.builtinOptions.fusedActivationFunction)
        return fn(a, self.params(int(op.inputs[0])), b, self.params(int(op.inputs[1])), self.params(out), lo, hi)

    def _op_add(self, i, op, values):
        return self._binary(i, op, values, kernels.add)

    def _op_mul(self, i, op, values):
        return self._binary(i, op, values, kernels.mul)

    def _op_mean(self, i, op, values):
        x, axes = self._input(op, 0, values), self.constant(int(op.inputs[1])).reshape(-1)
        axes = sorted(int(a) % x.ndim for a in axes)
        in_p, out_p = self.params(int(op.inputs[0])), self.params(int(op.outputs[0]))
        return kernels.mean(x, axes, bool(op.builtinOptions.keepDims), in_p, out_p)

    def _pool(self, i, op, values, average: bool):
        x, opts = self._input(op, 0, values), op.builtinOptions
        lo, hi = self._activation_range(int(op.outputs[0]), opts.fusedActivationFunction)
        kernel, stride = (opts.filterHeight, opts.filterWidth), (opts.strideH, opts.strideW)
        return kernels.pool(x, kernel, stride, opts.padding == schema.Padding.SAME, average, lo, hi)

    def _op_average_pool_2d(self, i, op, values):
        return self._pool(i, op, values, True)

    def _op_max_pool_2d(self, i, op, values):
        return self._pool(i, op, values, False)

    def _op_pad(self, i, op, values):
        x, paddings = self._input(op, 0, values), self.constant(int(op.inputs[1]))
        _, zp = self.params(int(op.outputs[0])) if self._tensor(int(op.outputs[0])).quantization else (0, 0)
        return np.pad(x, [tuple(p) for p in paddings.tolist()], constant_values=zp)

    def _op_reshape(self, i, op, values):
        return self._input(op, 0, values).reshape(self._tensor(int(op.outputs[0])).shape)

    def _op_transpose(self, i, op, values):
        return np.transpose(self._input(op, 0, values), self.constant(int(op.inputs[1])).reshape(-1))

    def _op_concatenation(self, i, op, values):
        parts = [self._input(op, k, values) for k in range(len(op.inputs))]
        return np.concatenate(parts, axis=op.builtinOptions.axis)

    def _op_quantize(self, i, op, values):
        x = self._input(op, 0, values)
        out_p = self.params(int(op.outputs[0]))
        if x.dtype == np.float32:  # the float input of a float_io model: TFLM's AffineQuantize (round half away)
            scale, zp = out_p
            ratio = x / scale
            return np.clip(np.sign(ratio) * np.floor(np.abs(ratio) + 0.5) + zp, -128, 127)
        return kernels.requantize_int8(x, self.params(int(op.inputs[0])), out_p)

    def _op_hard_swish(self, i, op, values):
        in_p, out_p = self.params(int(op.inputs[0])), self.params(int(op.outputs[0]))
        return kernels.hard_swish(self._input(op, 0, values), in_p, out_p)

    def _op_dequantize(self, i, op, values):
        scale, zp = self.params(int(op.inputs[0]))
        return (self._input(op, 0, values).astype(np.float32) - zp) * scale

    def _op_logistic(self, i, op, values):
        return nonlinear.logistic(self._input(op, 0, values), self.params(int(op.inputs[0])))

    def _op_softmax(self, i, op, values):
        beta = op.builtinOptions.beta if op.builtinOptions is not None else 1.0
        return nonlinear.softmax(self._input(op, 0, values), self.params(int(op.inputs[0])), beta)
