"""Statistics -> encodings: the pure functions that turn observed statistics, weights and chosen ranges into
quantization parameters (scale, zero point), as AIMET v2's encoding analyzers do.  No graph is touched here."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eightbit import qmath
from eightbit.calibration import methods
from eightbit.calibration.calibrate import activation_axis
from eightbit.calibration.observers import Observer, Statistic
from eightbit.config import QuantSpec, seven_bit
from eightbit.graph.placement import Placement


@dataclass
class Encoding:
    """Quantization parameters of one tensor group or weight, in a JSON-friendly form."""

    scale: list[float]
    zero_point: list[int]
    qmin: int
    qmax: int
    axis: int | None
    range: tuple[list[float], list[float]] | None = None
    tensors: list[str] = field(default_factory=list)
    mean: list[float] | None = None  # per-channel mean seen in calibration (bias correction)
    scheme: str = "uniform"  # a Scheme value; log2/fp16 are simulated, not integer codes
    rounding: str | None = None  # AdaRound's learned up/down decisions, one bit per weight (calibration.adaround)

    def tensors_(self) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.axis is not None
        scale = torch.tensor(self.scale, dtype=torch.float32)
        zp = torch.tensor(self.zero_point, dtype=qmath.storage_dtype(self.qmin, self.qmax))
        return (scale, zp) if per else (scale.reshape(()), zp.reshape(()))


def encoding_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, axis: int | None, error=None) -> Encoding:
    """Pure: a clipping range and a spec -> the encoding (scale, zero point) used by the graph.  `error`
    (scale, zero_point) -> squared error decides floor vs ceil for power-of-two scales."""
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=spec.qmin, qmax=spec.qmax, symmetric=spec.symmetric)
    if spec.power_of_two:
        scale, zp = methods.power_of_two(lo, hi, scale, zp, spec, error)
    as_list = lambda t: t.reshape(-1).tolist()  # noqa: E731
    return Encoding(
        as_list(scale), [int(v) for v in as_list(zp)], spec.qmin, spec.qmax, axis, (as_list(lo), as_list(hi))
    )


def activation_encodings(
    observers: dict[str, Observer], placement: Placement, spec: QuantSpec, ranges: dict | None = None
) -> dict[str, Encoding]:
    """Turn calibrated observers into encodings (pure given the observers' statistics).

    ranges: group -> (lo, hi) chosen by an output-aware search (`calibration.refine`), used instead of the method's
        range for those groups."""
    out = {}
    ranges = ranges or {}
    for group, observer in observers.items():
        if not observer.observed():
            raise RuntimeError(f"{observer.label} was never reached during calibration")
        if group in ranges:
            lo, hi = ranges[group]
        else:
            lo, hi = methods.lookup_method(spec.method).activation_range(observer.stats, spec)
        hist = observer.stats.get(Statistic.HISTOGRAM)
        error = None if hist is None else (lambda s, z, h=hist: methods.histogram_error(h, s, z, spec))
        enc = encoding_from_range(torch.as_tensor(lo), torch.as_tensor(hi), spec, activation_axis(spec), error)
        enc.tensors = list(placement.groups[group])
        mean = observer.channel_mean()
        enc.mean = None if mean is None else mean.tolist()
        enc.scheme = spec.scheme.value
        out[group] = enc
    return out


def layer_weight_spec(w: torch.Tensor, spec: QuantSpec, overflow_fix: bool) -> QuantSpec:
    """The spec convert uses for one layer's weight: 7-bit codes for GEMM-backed layers under the overflow fix
    (depthwise convolutions keep 8 bits)."""
    depthwise = w.dim() > 2 and w.shape[1] == 1
    return seven_bit(spec) if overflow_fix and not depthwise else spec


def weight_axis(spec: QuantSpec) -> int | None:
    """The weight's channel axis (None for per-tensor weights)."""
    return (spec.channel_axis or 0) if spec.per_channel else None


def weight_encoding(w: torch.Tensor, spec: QuantSpec, weight_range=None) -> Encoding:
    """Pure: a weight tensor and its spec -> its encoding (the method's range, or `weight_range` if given)."""
    axis = weight_axis(spec)
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("the model has NaN or Inf weights; they cannot be quantized")
    if weight_range is None:
        weight_range = methods.lookup_method(spec.method).weight_range(w, spec, axis)
    lo, hi = weight_range
    rows = methods._per_channel(w, axis)
    return encoding_from_range(lo, hi, spec, axis, lambda s, z: methods.weight_error(rows, s, z, spec))
