"""LOGISTIC and SOFTMAX in the integer reference: 0 differing codes against TFLM, on one-op files over every
int8 input code and many input scales, and on tiny eightbit models ending in sigmoid and softmax."""

import flatbuffers
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tflite_micro")

from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema  # noqa: E402

import eightbit  # noqa: E402
from eightbit import QuantConfig, Target  # noqa: E402
from eightbit.export.tflite import input_codes, samples_of, tflite_bytes  # noqa: E402
from eightbit.export.tflite_run import run_tflm  # noqa: E402
from eightbit.integer import nonlinear  # noqa: E402
from eightbit.integer.executor import IntegerReference  # noqa: E402
from tests.helpers import calibration_batches  # noqa: E402
from tests.tflite_models import SCHEMES  # noqa: E402

ALL_CODES = np.arange(-128, 128, dtype=np.int8)


def _tensor(name: str, shape, scale: float, zero_point: int):
    t = schema.TensorT()
    t.name, t.shape, t.type, t.buffer = name, list(shape), schema.TensorType.INT8, 0
    q = schema.QuantizationParametersT()
    q.scale, q.zeroPoint = [float(scale)], [int(zero_point)]
    t.quantization = q
    return t


def one_op_model(op: str, shape, scale: float, zero_point: int, beta: float = 1.0) -> bytes:
    """An int8 .tflite holding one LOGISTIC or SOFTMAX with the given input parameters (output 1/256, -128)."""
    sub = schema.SubGraphT()
    sub.tensors = [_tensor("x", shape, scale, zero_point), _tensor("y", shape, 1.0 / 256, -128)]
    sub.inputs, sub.outputs = [0], [1]
    operator = schema.OperatorT()
    operator.opcodeIndex, operator.inputs, operator.outputs = 0, [0], [1]
    if op == "SOFTMAX":
        options = schema.SoftmaxOptionsT()
        options.beta = beta
        operator.builtinOptionsType, operator.builtinOptions = schema.BuiltinOptions.SoftmaxOptions, options
    sub.operators = [operator]
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = getattr(schema.BuiltinOperator, op)
    code.version = 1
    model = schema.ModelT()
    model.version, model.subgraphs, model.buffers, model.operatorCodes = 3, [sub], [schema.BufferT()], [code]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _differing(model: bytes, x: np.ndarray) -> int:
    (tflm,) = run_tflm(model, [x])
    (ours,), _ = IntegerReference(model).run([x])
    return int((tflm.astype(int) != ours.astype(int)).sum())


@pytest.mark.parametrize("scale", [0.001, 0.01, 1 / 32, 0.0625, 0.1, 0.37, 2.0])
@pytest.mark.parametrize("zero_point", [-128, -3, 0, 90])
def test_logistic_is_bit_exact_with_tflm_on_every_code(scale, zero_point):
    model = one_op_model("LOGISTIC", (1, 256), scale, zero_point)
    assert _differing(model, ALL_CODES.reshape(1, 256)) == 0


@pytest.mark.parametrize("scale", [0.004, 0.03, 0.0625, 0.2, 1.0, 3.0])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_softmax_is_bit_exact_with_tflm(scale, beta):
    rng = np.random.default_rng(0)
    rows = [
        ALL_CODES,  # every difference from the max, 0 to -255
        np.full(256, 7, np.int8),  # a flat row: 1/256 each
        rng.integers(-128, 128, 256, dtype=np.int8),
        np.clip(rng.normal(0, 8, 256), -128, 127).astype(np.int8),  # a peaked row
        np.where(np.arange(256) == 5, 127, -128).astype(np.int8),  # one hot
    ]
    x = np.stack(rows)
    model = one_op_model("SOFTMAX", x.shape, scale, 0, beta)
    assert _differing(model, x) == 0
    few = rng.integers(-128, 128, (3, 10), dtype=np.int8)  # a 10-class head
    assert _differing(one_op_model("SOFTMAX", few.shape, scale, 11, beta), few) == 0


def test_kernels_are_close_to_the_float_functions():
    scale, zero_point = 0.05, 3
    real = (ALL_CODES.astype(np.float64) - zero_point) * scale
    want = np.clip(np.round(256 / (1 + np.exp(-real))) - 128, -128, 127)
    got = nonlinear.logistic(ALL_CODES, (np.float32(scale), zero_point))
    assert np.abs(got - want).max() <= 1
    row = np.random.default_rng(1).integers(-128, 128, (2, 40)).astype(np.int8)
    p = np.exp(row * 0.1)
    p /= p.sum(-1, keepdims=True)
    got = nonlinear.softmax(row, (np.float32(0.1), 0))
    assert np.abs(got - np.clip(np.round(p * 256) - 128, -128, 127)).max() <= 1


def test_softmax_refuses_a_scale_tflite_cannot_run():
    with pytest.raises(ValueError, match="below 2"):
        nonlinear.softmax(ALL_CODES.reshape(1, -1), (np.float32(1e-9), 0))


class SigmoidHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return torch.sigmoid(self.fc(torch.relu(self.conv(x)).mean((2, 3))))


class SoftmaxHead(SigmoidHead):
    def forward(self, x):
        return torch.softmax(self.fc(torch.relu(self.conv(x)).mean((2, 3))), -1)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("head", [SigmoidHead, SoftmaxHead])
def test_tiny_models_ending_in_sigmoid_and_softmax_match_tflm(head, scheme):
    torch.manual_seed(0)
    config = QuantConfig(target=Target.TFLITE, **SCHEMES[scheme])
    qm = eightbit.quantize(head().eval(), calibration_batches(n=2), config=config, progress=False)
    model, _ = tflite_bytes(qm.graph_module, qm._example_args)
    reference = IntegerReference(model)
    assert reference.op_name(len(reference.graph.operators) - 1) in ("LOGISTIC", "SOFTMAX")
    for sample in samples_of(qm._example_args):
        x = input_codes(qm.graph_module, sample)
        (tflm_out,), tflm = run_tflm(model, x, all_tensors=True)
        (ours_out,), ours = reference.run(x)
        assert np.array_equal(tflm_out, ours_out)
        for op in reference.graph.operators:
            index = int(op.outputs[0])
            assert np.array_equal(tflm[index].reshape(-1), ours[index].reshape(-1)), index
