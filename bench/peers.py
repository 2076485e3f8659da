"""Peer int8 quantizers that eightbit is compared against, all starting from the same fp32 ONNX file.

* ORT `quantize_static`, QDQ, per-channel weights, MinMax calibration, with
  (a) uint8 activations x int8 weights (U8S8: the format x86 integer kernels run fast) and
  (b) ORT's default int8 activations x int8 weights (S8S8).
* NNCF post-training quantization of an OpenVINO model read from the ONNX file (default preset),
  saved as OpenVINO IR and meant to run on OpenVINO with the f32 precision hint.

Calibration data is a list of arrays, each one feed (batch 1) for the model's single input.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Peer", "PeerResult", "quantize_peer"]


class Peer(enum.Enum):
    """A third-party int8 quantization recipe."""

    ORT_U8S8 = "ort-qdq-u8s8"
    ORT_DEFAULT = "ort-qdq-s8s8"
    NNCF = "nncf-openvino"


@dataclass(frozen=True, kw_only=True)
class PeerResult:
    """Where a peer wrote its model and how long quantization took (seconds, wall clock)."""

    peer: Peer
    path: Path
    seconds: float


def _input_name(onnx_path: Path) -> str:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ValueError(f"peers expect a single-input model; {onnx_path} has inputs {names}")
    return names[0]


def _ort_static(fp32: Path, calib: Sequence[np.ndarray], out: Path, activation_u8: bool) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = _input_name(fp32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {name: x}

    # ORT's documented recipe: shape inference + graph optimization (folds BatchNorm into Conv, so the
    # quantizer sees Conv -> Relu rather than Conv -> BatchNormalization it would leave in float).
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    act = QuantType.QUInt8 if activation_u8 else QuantType.QInt8
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=act,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    pre.unlink(missing_ok=True)
    return out


def _ort_u8s8(fp32: Path, calib: Sequence[np.ndarray], out: Path) -> Path:
    return _ort_static(fp32, calib, out, activation_u8=True)


def _ort_default(fp32: Path, calib: Sequence[np.ndarray], out: Path) -> Path:
    return _ort_static(fp32, calib, out, activation_u8=False)


def _nncf(fp32: Path, calib: Sequence[np.ndarray], out: Path) -> Path:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    dataset = nncf.Dataset(list(calib))
    quantized = nncf.quantize(model, dataset, subset_size=len(calib))
    xml = out.with_suffix(".xml")
    # save_model would otherwise store remaining float weights as fp16; keep f32 for a like-with-like run.
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return xml


_PEERS: dict[Peer, Callable[[Path, Sequence[np.ndarray], Path], Path]] = {
    Peer.ORT_U8S8: _ort_u8s8,
    Peer.ORT_DEFAULT: _ort_default,
    Peer.NNCF: _nncf,
}


def quantize_peer(peer: Peer, fp32_onnx: str | Path, calib: Sequence[np.ndarray], out: str | Path) -> PeerResult:
    """Quantize `fp32_onnx` with `peer`, calibrating on `calib` (one batch-1 array per sample).

    `out` is the target file; NNCF writes OpenVINO IR next to it (`out` with an .xml suffix, plus .bin).
    """
    try:
        fn = _PEERS[peer]
    except KeyError:
        raise ValueError(f"unknown peer {peer!r}; valid: {[p.value for p in _PEERS]}") from None
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    if not fp32_onnx.is_file():
        raise FileNotFoundError(f"fp32 model {fp32_onnx} does not exist; export it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = fn(fp32_onnx, calib, out)
    return PeerResult(peer=peer, path=path, seconds=time.perf_counter() - t0)
