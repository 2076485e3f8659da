"""Quantization-aware training: Float -> QAT -> Quantized, on the PTQ pipeline's own graph.

`prepare_qat(model, calibration_data, config=QuantConfig(...), qat=QATConfig(...))` calibrates the model exactly as
`eightbit.calibrate` does, puts a learnable fake quantizer (`fake_quant`) at every point where PTQ places a
Q/DQ pair and on every quantized weight (`layers`, with simulated BatchNorm folding), initialises them from the
PTQ encodings, and returns a trainable `QATModel`; `QATModel.convert()` runs the PTQ convert and returns the same
`QuantizedModel` (summary, encodings, ONNX export).  `distributed` reduces observer statistics across ranks.

May import: `eightbit.qmath`, `eightbit.config`, `eightbit.graph`, `eightbit.calibration`, `eightbit.convert`,
`eightbit.api`, `eightbit.runtime.hw`, and modules of this package.  Never `demos`, `cli`, `analysis` or `export`:
QAT reuses the pipeline, and export goes through `QuantizedModel`.
"""

from eightbit.qat.config import BatchNormMode, QATConfig
from eightbit.qat.fake_quant import FakeQuantizer
from eightbit.qat.prepare import QATModel, prepare_qat

__all__ = ["BatchNormMode", "FakeQuantizer", "QATConfig", "QATModel", "prepare_qat"]
