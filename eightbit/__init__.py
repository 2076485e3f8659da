"""eightbit: PyTorch models to int8 that really run faster, keep their accuracy, and explain themselves."""

from eightbit.api import Calibration, QuantizedModel, calibrate, quantize
from eightbit.config import (
    AdaRound,
    Equalize,
    Granularity,
    OpKind,
    QuantConfig,
    QuantSpec,
    Relu6Handling,
    SmoothQuant,
    int8_weights,
    uint8_activations,
)
from eightbit.graph import ops as _ops  # noqa: F401  (registers the eightbit:: torch ops)
from eightbit.graph.capture import CaptureError

__all__ = [
    "AdaRound",
    "Calibration",
    "calibrate",
    "CaptureError",
    "Equalize",
    "Granularity",
    "OpKind",
    "QuantConfig",
    "QuantSpec",
    "QuantizedModel",
    "Relu6Handling",
    "SmoothQuant",
    "int8_weights",
    "quantize",
    "uint8_activations",
]
