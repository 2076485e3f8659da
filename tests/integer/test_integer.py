"""The integer reference: fixed-point math, bit-exactness with TFLite Micro op by op, accumulator simulation."""

import flatbuffers
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tflite_micro")

import eightbit  # noqa: E402
from eightbit import QuantConfig, Target  # noqa: E402
from eightbit.export.tflite import input_codes, samples_of, tflite_bytes  # noqa: E402
from eightbit.export.tflite_run import run_tflm  # noqa: E402
from eightbit.integer.executor import IntegerReference, UnsupportedOperator  # noqa: E402
from eightbit.integer.fixed_point import (  # noqa: E402
    int16_products_that_fit,
    is_power_of_two_multiplier,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
)
from eightbit.integer.kernels import Accumulator, AccumulatorMode  # noqa: E402
from tests.tflite_models import SCHEMES, quantized  # noqa: E402


def test_quantize_multiplier_round_trips_and_power_of_two_is_a_shift():
    for real in (0.000123, 0.5, 0.75, 1.0, 3.3, 1 / 256):
        q, shift = quantize_multiplier(real)
        assert 2**30 <= q < 2**31 and abs(q * 2.0 ** (shift - 31) - real) <= real * 2**-30
    q, shift = quantize_multiplier(2.0**-7)
    assert is_power_of_two_multiplier(q) and shift == -6
    x = np.arange(-1000, 1000)
    # a power-of-two multiplier needs no multiply: halve with rounding, then a rounding shift
    halved = np.where(x >= 0, (x + 1) >> 1, -((-x) >> 1))
    assert np.array_equal(multiply_by_quantized_multiplier(x, q, shift), rounding_divide_by_pot(halved, 6))


def test_rounding_divide_rounds_half_away_from_zero():
    assert rounding_divide_by_pot(np.array([5, -5, 6, -6, 7, -7]), 1).tolist() == [3, -3, 3, -3, 4, -4]


def test_n1_is_derived():
    assert int16_products_that_fit() == (2**15 - 1) // (127 * 128) == 2
    assert int16_products_that_fit(activation_max=255) == 1


REFERENCE_MODELS = ["residual", "depthwise", "concat", "conv_variants", "broadcasting", "hardswish", "activations"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_bit_exact_with_tflm_on_every_tensor(name, scheme):
    qm = quantized(name, scheme)
    model, _ = tflite_bytes(qm.graph_module, qm._example_args)
    reference = IntegerReference(model)
    compared = 0
    for sample in samples_of(qm._example_args):
        x = input_codes(qm.graph_module, sample)
        (tflm_out,), tflm = run_tflm(model, x, all_tensors=True)
        (ref_out,), ref = reference.run(x)
        assert np.array_equal(tflm_out, ref_out)
        for op in reference.graph.operators:
            index = int(op.outputs[0])
            assert np.array_equal(tflm[index].reshape(-1), ref[index].reshape(-1)), index
            compared += 1
    assert compared >= 2 * len(reference.graph.operators)


def test_operators_without_a_kernel_are_refused():
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    qm = quantized("residual")
    model, _ = tflite_bytes(qm.graph_module, qm._example_args)
    parsed = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    code = parsed.operatorCodes[0]
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.TANH  # no kernel in the reference
    builder = flatbuffers.Builder(1024)
    builder.Finish(parsed.Pack(builder), file_identifier=b"TFL3")
    with pytest.raises(UnsupportedOperator, match="TANH"):
        IntegerReference(bytes(builder.Output()))


class OneConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3)

    def forward(self, x):
        return self.conv(x)


def _conv_model(channels: int, scale: float):
    torch.manual_seed(0)
    model = OneConv(channels).eval()
    with torch.no_grad():
        model.conv.weight.copy_(torch.ones_like(model.conv.weight))  # every weight at code 127
    data = [torch.rand(2, channels, 6, 6) * scale for _ in range(2)]
    qm = eightbit.quantize(model, data, config=QuantConfig(target=Target.TFLITE), progress=False)
    model_bytes, _ = tflite_bytes(qm.graph_module, qm._example_args)
    return model_bytes, input_codes(qm.graph_module, samples_of(qm._example_args, 1)[0])


def test_int16_accumulation_flags_a_planted_overflow_and_not_a_fitting_case():
    # planted: 3x3x16 = 144 products of up to 255 x 127 (inputs in [0, max] have zero point -128)
    big, x_big = _conv_model(16, 1.0)
    measured = IntegerReference(big, Accumulator(measure=True))
    measured.run(x_big)
    (layer,) = measured.layers.values()
    assert layer.stats.int16_overflow and layer.stats.max_abs_partial > 2**15
    # built to fit: spilling to int32 every product never saturates, and gives the exact int32 result
    spill = IntegerReference(big, Accumulator(mode=AccumulatorMode.INT16_SPILL, spill_every=1, measure=True))
    exact_out, _ = IntegerReference(big).run(x_big)
    spill_out, _ = spill.run(x_big)
    assert not next(iter(spill.layers.values())).stats.int16_overflow
    assert np.array_equal(spill_out[0], exact_out[0])
    # saturating int16 accumulation changes the result of the overflowing layer
    saturated, _ = IntegerReference(big, Accumulator(mode=AccumulatorMode.INT16_SATURATE)).run(x_big)
    assert not np.array_equal(saturated[0], exact_out[0])


def test_bias_plus_products_wraps_like_a_c_int32():
    # TFLM adds the bias to the int32 sum unchecked (EfficientNet-Lite0 dead channels, biases at the int32 limit,
    # in files written by other converters): the reference wraps the same way, or it is not bit-exact.
    from eightbit.integer.kernels import fully_connected

    x = np.array([[-128, -128]], dtype=np.int8)  # zero point 127: (x - zp) = -255
    weights = np.array([[127, 127]], dtype=np.int8)
    bias = np.array([-(2**31) + 1], dtype=np.int32)
    acc = fully_connected(x, 127, weights, bias, Accumulator(), None)
    assert acc.tolist() == [[-(2**31) + 1 - 2 * 255 * 127 + 2**32]]
