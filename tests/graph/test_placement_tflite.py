"""Placement for Target.TFLITE: TFLite's kernel constraints applied where placement decides."""

import torch

import eightbit
from eightbit import QuantConfig, Target
from tests.helpers import ResidualNet, calibration_batches
from tests.tflite_models import quantized


def test_placement_applies_tflite_kernel_constraints():
    qm = quantized("activations")
    fixed = [e for e in qm.activation_encodings.values() if any("sigmoid" in t or "softmax" in t for t in e.tensors)]
    assert len(fixed) == 2
    for enc in fixed:  # LOGISTIC / SOFTMAX output: scale 1/256, uint8 zero point 0 (int8: -128)
        assert enc.scale == [1 / 256] and enc.zero_point == [0]
    concat = quantized("concat")
    group = next(e for e in concat.activation_encodings.values() if "cat" in e.tensors)
    assert {"relu", "relu_1", "cat"} <= set(group.tensors)  # concatenation inputs share the output's parameters
    pooled = quantized("conv_variants")
    assert any({"conv2d_4", "avg_pool2d"} <= set(e.tensors) for e in pooled.activation_encodings.values())


def test_tflite_target_quantizes_the_classifier_output_and_every_add():
    torch.manual_seed(0)
    onnx = eightbit.quantize(ResidualNet().eval(), calibration_batches(n=2), progress=False)
    tflite = eightbit.quantize(
        ResidualNet().eval(), calibration_batches(n=2), config=QuantConfig(target=Target.TFLITE), progress=False
    )
    linear = lambda qm: any("linear" in e.tensors for e in qm.activation_encodings.values())  # noqa: E731
    assert not linear(onnx) and linear(tflite)  # ONNX keeps logits float; TFLite needs an int8 output
    assert not tflite.placement.float_ops
