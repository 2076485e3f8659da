"""TFLite's fixed-point requantization as pure numpy functions on int64 arrays (values in int32 range).

A real multiplier M > 0 is stored as a 31-bit significand q (in [2^30, 2^31)) and a power-of-two exponent:
M = q * 2^(shift - 31) (`quantize_multiplier`, TFLite's QuantizeMultiplier).  x * M is then computed as TFLite
Micro does by default ("double rounding"): a left shift for positive exponents, the saturating rounding doubling
high multiply (gemmlowp's SaturatingRoundingDoublingHighMul: (x * q + nudge) / 2^31, truncating division) and a
rounding right shift (RoundingDivideByPOT: round half away from zero).  A power-of-two M has q = 2^30: the
multiply halves with rounding, so the whole requantization is shifts and adds only.
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(significand, shift) with real = significand * 2^(shift - 31), significand in [2^30, 2^31) (or (0, 0))."""
    if real == 0.0:
        return 0, 0
    mantissa, shift = math.frexp(real)
    q = _round_half_away(mantissa * (1 << 31))
    if q == 1 << 31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(q), int(shift)


def _round_half_away(value: float) -> int:
    return int(math.floor(abs(value) + 0.5)) * (1 if value >= 0 else -1)


def is_power_of_two_multiplier(significand: int) -> bool:
    """A multiplier that is an exact power of two: requantization by shifts only."""
    return significand == 1 << 30


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: int) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul for int32 a and scalar (or broadcast) int32 b."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    total = ab + nudge
    high = np.where(total >= 0, total >> 31, -((-total) >> 31))  # C++ division truncates toward zero
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(overflow, INT32_MAX, high)


def rounding_divide_by_pot(x: np.ndarray, exponent) -> np.ndarray:
    """x / 2^exponent rounded half away from zero (gemmlowp RoundingDivideByPOT)."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: np.ndarray, significand, shift) -> np.ndarray:
    """x * significand * 2^(shift - 31) as TFLite's MultiplyByQuantizedMultiplier (double rounding); significand
    and shift may be per-channel arrays broadcasting against x's last axis."""
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    scaled = np.asarray(x, dtype=np.int64) * (np.int64(1) << left)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(scaled, significand), right)


def multiply_smaller_than_one(x: np.ndarray, significand: int, shift: int) -> np.ndarray:
    """MultiplyByQuantizedMultiplierSmallerThanOneExp (shift <= 0): the high multiply, then the rounding shift."""
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, significand), -shift)


def quantize_value(value: float, scale: np.float32, zero_point: int) -> int:
    """TFLite's Quantize for activation bounds: zero_point + round(value / scale) computed in float32."""
    return int(zero_point) + _round_half_away(float(np.float32(value) / np.float32(scale)))


def int16_products_that_fit(weight_max: int = 127, activation_max: int = 128, bits: int = 16) -> int:
    """How many int8 x int8 products surely fit a signed `bits`-bit accumulator: floor((2^(bits-1) - 1) /
    (|w|max * |x|max)).  With int8 weights in [-127, 127] and activations in [-128, 127] this is n1 = 2."""
    return (2 ** (bits - 1) - 1) // (weight_max * activation_max)


def _trunc_div(x: np.ndarray, divisor: int) -> np.ndarray:
    """C integer division (truncates toward zero)."""
    return np.where(x >= 0, x // divisor, -((-x) // divisor))


def srdhm_int16(a: np.ndarray, b: int) -> np.ndarray:
    """gemmlowp's int16 SaturatingRoundingDoublingHighMul: (a * b + nudge) / 2^15, truncating."""
    a = np.asarray(a, dtype=np.int64)
    ab = a * int(b)
    nudge = np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    high = _trunc_div(ab + nudge, 1 << 15)
    return np.where((a == -(2**15)) & (b == -(2**15)), 2**15 - 1, high)


def doubling_high_mul_int16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """TFLite's int16 SaturatingDoublingHighMul: a * b / 2^15 truncated toward zero (no rounding nudge)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    return np.where((a == -(2**15)) & (b == -(2**15)), 2**15 - 1, _trunc_div(a * b, 1 << 15))


def saturating_left_shift_int16(x: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=np.int64) * (1 << amount), -(2**15), 2**15 - 1)


def int16_multiplier(significand: int) -> int:
    """TFLite's DownScaleInt32ToInt16Multiplier: the 31-bit significand rounded to 15 bits."""
    if significand >= INT32_MAX - (1 << 15):
        return 2**15 - 1
    return (significand + (1 << 15)) >> 16
