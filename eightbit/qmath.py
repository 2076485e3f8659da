"""Quantization math as pure tensor functions: ranges -> (scale, zero_point), quantize, dequantize.

Nothing here knows about graphs or observers; everything is tested against brute-force references.
Rounding is half-to-even, as in ONNX QuantizeLinear, so simulated and exported models agree bit for bit.
"""

from __future__ import annotations

import torch

_TINY = torch.finfo(torch.float32).tiny
_FLOAT32_MAX = torch.finfo(torch.float32).max


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, *, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the real range [lo, hi] onto the integer range [qmin, qmax].

    The range is first widened to contain 0 so that real zero (padding, ReLU outputs) is exactly
    representable.  A zero-width range (a constant-zero tensor or an all-zero weight channel) gets a scale
    borrowed from the other channels, or 1.0, so that it still quantizes to exactly zero and any bias
    quantized with it keeps a sensible step.  Any finite range gives a finite scale: where float32 overflows
    (hi - lo beyond 3.4e38) the scale is computed in float64 and clamped to the float32 range.
    """
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float32), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float32), torch.zeros(()))
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("cannot compute quantization parameters from a non-finite range (NaN or Inf seen)")
    if symmetric:
        scale = _fill_zero_scales(_finite_scale(torch.maximum(-lo, hi), (qmax - qmin) / 2))
        zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2)
    else:
        scale = _fill_zero_scales(_finite_scale(hi - lo, qmax - qmin, lo, hi))
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return _grid_within_float32(scale, zero_point, qmin, qmax), zero_point.to(torch.int32)


def _grid_within_float32(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Shrink (by at most a rounding step) any scale whose end codes would dequantize beyond the float32 range,
    so that (q - zero_point) * scale stays finite for every code.  Ordinary scales are returned unchanged."""
    steps = torch.maximum(zero_point - qmin, qmax - zero_point).double().clamp_min(1)
    over = scale.double() * steps > _FLOAT32_MAX
    if not over.any():
        return scale
    capped = torch.nextafter((_FLOAT32_MAX / steps).float(), torch.zeros(()))
    return torch.where(over, capped, scale)


def _finite_scale(span: torch.Tensor, steps: float, lo=None, hi=None) -> torch.Tensor:
    """span / steps in float32 (bit for bit what it always was); where that overflows, the same quotient in
    float64 (span recomputed from lo and hi when given), clamped to the largest float32."""
    scale = span / steps
    overflow = ~torch.isfinite(scale)
    if not overflow.any():
        return scale
    wide = (hi.double() - lo.double()) if lo is not None else span.double()
    return torch.where(overflow, (wide / steps).clamp(max=_FLOAT32_MAX).float(), scale)


def _fill_zero_scales(scale: torch.Tensor) -> torch.Tensor:
    """Replace zero scales with the mean of the nonzero ones (or 1.0 when there are none)."""
    zero = scale <= _TINY
    if not zero.any():
        return scale
    fallback = scale[~zero].double().mean().float() if (~zero).any() else torch.tensor(1.0)
    return torch.where(zero, fallback, scale)


def broadcast(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """`param` (a scalar or one value per channel) shaped to broadcast against `x` along `axis`."""
    if param.dim() == 0 or axis is None:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Integer codes clamp(round(x / scale) + zero_point, qmin, qmax), as int32 (the caller picks storage)."""
    s = broadcast(scale, x, axis)
    z = broadcast(zero_point, x, axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Real values (q - zero_point) * scale."""
    s = broadcast(scale, q, axis)
    z = broadcast(zero_point, q, axis)
    return (q.to(torch.float32) - z.to(torch.float32)) * s


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """dequantize(quantize(x)): the value the int8 model sees in place of x."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)


def storage_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest standard integer type that holds [qmin, qmax] (uint8, int8, uint16 or int16)."""
    for dtype in (torch.uint8, torch.int8, torch.uint16, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    raise ValueError(f"no 8/16-bit integer type holds [{qmin}, {qmax}]")


_INT32_LIMIT = 2**31 - 1


def _bias_quotient(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """bias / (input_scale * weight_scale) in float64, the scale rounded to float32 first as the graph stores it."""
    scale = (torch.as_tensor(input_scale, dtype=torch.float32) * weight_scale).double()
    return bias.double() / scale


def quantize_bias(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Bias as int32 with scale input_scale * weight_scale, the form int8 conv/gemm kernels accumulate into.

    Codes are computed and clamped in float64 and converted through int64: a float32 clamp rounds 2^31 - 1 up to
    2^31, which the cast wraps to -2^31.  Saturated codes keep the bias's sign; a NaN quotient (zero or NaN
    scale) gives the saturated code of that sign, or 0.  Use `bias_representable` to tell whether the codes
    are faithful."""
    codes = torch.round(_bias_quotient(bias, input_scale, weight_scale))
    codes = torch.where(torch.isnan(codes), torch.sign(bias.double()) * _INT32_LIMIT, codes)
    return codes.clamp(-_INT32_LIMIT, _INT32_LIMIT).to(torch.int64).to(torch.int32)


def bias_representable(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """Whether every bias value has an int32 code at scale input_scale * weight_scale: the scale is a finite
    normal float32 and no code saturates."""
    scale = torch.as_tensor(input_scale, dtype=torch.float32) * weight_scale
    if not (torch.isfinite(scale).all() and (scale >= _TINY).all()):
        return False
    codes = torch.round(_bias_quotient(bias, input_scale, weight_scale))
    return bool(torch.isfinite(codes).all() and (codes.abs() < _INT32_LIMIT).all())


def log2_quantize(w: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    """Logarithmic (exponential) quantization: sign(w) * m * 2^-k with m the per-channel (or tensor) max |w|.

    One bit is the sign and one code means zero, so k takes 2^(bits-1) - 1 values.  Rounding is to the nearest
    power of two in the log domain; magnitudes under half the smallest level (nearer zero than that level)
    flush to zero.
    """
    levels = 2 ** (bits - 1) - 1
    magnitude = w.abs()
    if axis is None:
        peak = magnitude.amax()
    else:
        dims = [d for d in range(w.dim()) if d != axis]
        peak = magnitude.amax(dim=dims, keepdim=True) if dims else magnitude
    ratio = magnitude / torch.where(peak > 0, peak, torch.ones_like(peak))
    k = torch.round(-torch.log2(ratio.clamp_min(torch.finfo(torch.float32).tiny)))
    levels_value = peak * torch.exp2(-k.clamp(max=levels - 1))
    keep = ratio >= 2.0 ** -(levels - 1) / 2
    return torch.where(keep, torch.sign(w) * levels_value, torch.zeros_like(w))


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest float16 value (beyond +-65504 it becomes +-inf, as on the hardware)."""
    return x.to(torch.float16).to(x.dtype)
