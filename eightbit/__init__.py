"""eightbit: PyTorch models to int8 that really run faster, keep their accuracy, and explain themselves."""

from eightbit.api import Calibration, QuantizedModel, calibrate, quantize
from eightbit.calibration.health import CollapsedRangeWarning
from eightbit.config import (
    AdaRound,
    Equalize,
    Granularity,
    OpKind,
    QuantConfig,
    QuantSpec,
    Relu6Handling,
    SmoothQuant,
    Target,
    int8_weights,
    uint8_activations,
)
from eightbit.export.onnx import ParityError
from eightbit.graph import ops as _ops  # noqa: F401  (registers the eightbit:: torch ops)
from eightbit.graph.capture import CaptureError
from eightbit.graph.macs import MostlyFloatWarning
from eightbit.qat import QATConfig, prepare_qat

__all__ = [
    "AdaRound",
    "Calibration",
    "calibrate",
    "CaptureError",
    "CollapsedRangeWarning",
    "Equalize",
    "Granularity",
    "OpKind",
    "ParityError",
    "QATConfig",
    "QuantConfig",
    "QuantSpec",
    "QuantizedModel",
    "Relu6Handling",
    "SmoothQuant",
    "Target",
    "MostlyFloatWarning",
    "int8_weights",
    "prepare_qat",
    "quantize",
    "uint8_activations",
]
