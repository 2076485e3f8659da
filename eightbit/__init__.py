"""eightbit: PyTorch models to int8 that really run faster, keep their accuracy, and explain themselves."""

from eightbit.api import Calibration, QuantizedModel, calibrate, quantize
from eightbit.config import (
    Granularity,
    OpKind,
    QuantConfig,
    QuantSpec,
    SmoothQuant,
    int8_weights,
    uint8_activations,
)
from eightbit.graph import ops as _ops  # noqa: F401  (registers the eightbit:: torch ops)
from eightbit.graph.capture import CaptureError
from eightbit.qat import QATConfig, prepare_qat

__all__ = [
    "Calibration",
    "calibrate",
    "CaptureError",
    "Granularity",
    "OpKind",
    "QATConfig",
    "QuantConfig",
    "QuantSpec",
    "QuantizedModel",
    "SmoothQuant",
    "int8_weights",
    "prepare_qat",
    "quantize",
    "uint8_activations",
]
