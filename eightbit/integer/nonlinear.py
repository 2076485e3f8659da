"""LOGISTIC and SOFTMAX on int8 codes as TensorFlow Lite Micro's reference kernels compute them: gemmlowp's
fixed-point exp, logistic and 1 / (1 + x) on int32 raw values, no float and no lookup table.

A gemmlowp fixed-point number with k integer bits holds the real value raw / 2^(31 - k) in an int32.  Products
are the saturating rounding doubling high multiply (the integer bits add up), `_rescale` moves a value to another
number of integer bits (a saturating left shift or a rounding right shift).  The functions below are pure numpy
on int64 arrays holding int32 values, element-wise, written from the algorithms' definitions:

- exp(x) for x <= 0: x = -(q / 4 + r) with r in (0, 1/4]; exp(-r) by a 4th-order Taylor series around -1/8,
  then one multiply by exp(-2^e) for each set bit e of the quarter count q (a "barrel shifter").
- 1 / (1 + x) for x in [0, 1): three Newton-Raphson steps from the 48/17 - 32/17 d initial guess.
- logistic(x) = 1 / (1 + exp(-|x|)), mirrored for negative x.
"""

from __future__ import annotations

import math

import numpy as np

from eightbit.integer.fixed_point import INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier, rounding_divide_by_pot
from eightbit.integer.fixed_point import saturating_rounding_doubling_high_mul as _mul

# exp(-1/8), 1/3, 48/17 and -32/17 in the fixed-point formats gemmlowp stores them in (Q0.31, Q0.31, Q2.29).
_EXP_MINUS_ONE_EIGHTH = 1895147668
_ONE_THIRD = 715827883
_48_OVER_17 = 1515870810
_MINUS_32_OVER_17 = -1010580540
# exp(-2^e) in Q0.31 for the barrel shifter's exponents e.
_EXP_MINUS_POWERS_OF_TWO = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535),
                            (3, 720401), (4, 242))  # fmt: skip


def _saturating_left_shift(x: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=np.int64) << amount, INT32_MIN, INT32_MAX)


def _rescale(x: np.ndarray, source_bits: int, target_bits: int) -> np.ndarray:
    """gemmlowp Rescale: the same real value with `target_bits` integer bits."""
    exponent = source_bits - target_bits
    return _saturating_left_shift(x, exponent) if exponent >= 0 else rounding_divide_by_pot(x, -exponent)


def _wrap(x: np.ndarray) -> np.ndarray:
    """An int32 addition's result as C computes it (two's complement)."""
    return ((np.asarray(x, dtype=np.int64) + 2**31) % 2**32) - 2**31


def _exp_on_quarter_interval(a: np.ndarray) -> np.ndarray:
    """exp(a) in Q0.31 for a in [-1/4, 0) in Q0.31: Taylor series around -1/8."""
    x = _wrap(a + (1 << 28))
    x2 = _mul(x, x)
    x3 = _mul(x2, x)
    x4 = _mul(x2, x2)
    x4_over_4 = rounding_divide_by_pot(x4, 2)
    series = rounding_divide_by_pot(_wrap(_mul(_wrap(x4_over_4 + x3), _ONE_THIRD) + x2), 1)
    return _wrap(_EXP_MINUS_ONE_EIGHTH + _mul(_EXP_MINUS_ONE_EIGHTH, _wrap(x + series)))


def exp_on_negative_values(a: np.ndarray, integer_bits: int) -> np.ndarray:
    """exp(a) in Q0.31 for a <= 0 held with `integer_bits` integer bits (gemmlowp exp_on_negative_values)."""
    a = np.asarray(a, dtype=np.int64)
    fractional_bits = 31 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_quarter = (a & (one_quarter - 1)) - one_quarter
    result = _exp_on_quarter_interval(_rescale(a_mod_quarter_minus_quarter, integer_bits, 0))
    remainder = a_mod_quarter_minus_quarter - a
    for exponent, multiplier in _EXP_MINUS_POWERS_OF_TWO:
        if integer_bits > exponent:
            bit = (remainder >> (fractional_bits + exponent)) & 1
            result = np.where(bit == 1, _mul(result, multiplier), result)
    if integer_bits > 5:  # exp(x < -32) is 0
        result = np.where(a < -(1 << (36 - integer_bits)), 0, result)
    return np.where(a == 0, INT32_MAX, result)


def one_over_one_plus_x(a: np.ndarray) -> np.ndarray:
    """1 / (1 + a) in Q0.31 for a in [0, 1) in Q0.31 (gemmlowp one_over_one_plus_x_for_x_in_0_1)."""
    total = np.asarray(a, dtype=np.int64) + INT32_MAX
    half_denominator = np.where(total >= 0, (total + 1) // 2, -((-(total - 1)) // 2))  # RoundingHalfSum
    x = _wrap(_48_OVER_17 + _mul(half_denominator, _MINUS_32_OVER_17))  # Q2.29
    for _ in range(3):
        one_minus = _wrap((1 << 29) - _mul(half_denominator, x))
        x = _wrap(x + _saturating_left_shift(_mul(x, one_minus), 2))
    return _saturating_left_shift(x, 1)


def logistic_fixed(a: np.ndarray, integer_bits: int) -> np.ndarray:
    """logistic(a) in Q0.31 for any a held with `integer_bits` integer bits (gemmlowp logistic)."""
    a = np.asarray(a, dtype=np.int64)
    positive = a > 0
    on_positive = one_over_one_plus_x(exp_on_negative_values(np.where(positive, -a, a), integer_bits))
    result = np.where(positive, on_positive, INT32_MAX - on_positive)
    return np.where(a == 0, 1 << 30, result)


# ------------------------------------------------------------------------------------------- parameters


def _frexp_multiplier(real: float) -> tuple[int, int]:
    """TFLM's inline frexp split of a multiplier: (round(q * 2^31), exponent) with q in [0.5, 1)."""
    q, exponent = math.frexp(real)
    return int(math.floor(abs(q) * 2**31 + 0.5)), exponent


def input_radius(integer_bits: int, left_shift: int, total_bits: int = 31) -> int:
    """TFLite's CalculateInputRadius: the largest |input - zero point| whose rescaled value stays in range."""
    return math.floor(((1 << integer_bits) - 1) * (1 << (total_bits - integer_bits)) / (1 << left_shift))


def _multiply_greater_than_one(x: np.ndarray, multiplier: int, left_shift: int) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplierGreaterThanOne (double rounding build): the left shift, then the
    rounding doubling high multiply."""
    return _mul(np.asarray(x, dtype=np.int64) * (1 << left_shift), multiplier)


# ------------------------------------------------------------------------------------------- kernels

_LOGISTIC_INPUT_BITS = 4  # TFLM's logistic computes in Q4.27
_SOFTMAX_DIFF_BITS = 5  # x - max(x) rescaled to Q5.26
_SOFTMAX_SUM_BITS = 12  # the sum of exps in Q12.19


def logistic(x: np.ndarray, in_params) -> np.ndarray:
    """LOGISTIC int8 -> int8 (output scale 1/256, zero point -128) as TFLM's reference kernel."""
    scale, zero_point = in_params
    multiplier, left_shift = _frexp_multiplier(float(np.float32(scale)) * (1 << (31 - _LOGISTIC_INPUT_BITS)))
    radius = input_radius(_LOGISTIC_INPUT_BITS, left_shift)
    centered = np.asarray(x, dtype=np.int64) - zero_point
    in_q4 = multiply_by_quantized_multiplier(np.clip(centered, -radius, radius), multiplier, left_shift)
    out = rounding_divide_by_pot(logistic_fixed(in_q4, _LOGISTIC_INPUT_BITS), 31 - 8) - 128
    out = np.clip(out, -128, 127)
    return np.where(centered <= -radius, -128, np.where(centered >= radius, 127, out))


def softmax(x: np.ndarray, in_params, beta: float = 1.0) -> np.ndarray:
    """SOFTMAX int8 -> int8 over the last axis (output scale 1/256, zero point -128) as TFLM's reference kernel."""
    scale, _ = in_params
    real = min(float(beta) * float(np.float32(scale)) * (1 << (31 - _SOFTMAX_DIFF_BITS)), 2.0**31 - 1.0)
    if real <= 1.0:  # TFLite's QuantizeMultiplierGreaterThanOne refuses it (the kernel does not run)
        raise ValueError(f"SOFTMAX input scale {float(scale)} x beta {beta} is below 2^-26: TFLite cannot run it")
    multiplier, left_shift = _frexp_multiplier(real)
    if multiplier == 1 << 31:  # QuantizeMultiplier's carry (PreprocessSoftmaxScaling goes through it)
        multiplier, left_shift = multiplier // 2, left_shift + 1
    diff_min = -input_radius(_SOFTMAX_DIFF_BITS, left_shift)
    x = np.asarray(x, dtype=np.int64)
    diff = x - x.max(axis=-1, keepdims=True)
    counted = diff >= diff_min
    scaled = _multiply_greater_than_one(np.where(counted, diff, 0), multiplier, left_shift)
    exps = exp_on_negative_values(scaled, _SOFTMAX_DIFF_BITS)
    terms = np.where(counted, rounding_divide_by_pot(exps, _SOFTMAX_SUM_BITS), 0)
    sums = _wrap(terms.sum(axis=-1, keepdims=True))
    # GetReciprocal: sum = 2^(bits over one) * (1 + f), f in [0, 1); 1 / (1 + f) in Q0.31
    headroom_plus_one = 32 - np.array([int(s).bit_length() for s in sums.ravel()], np.int64).reshape(sums.shape)
    bits_over_unit = _SOFTMAX_SUM_BITS - headroom_plus_one
    shifted_minus_one = ((sums << headroom_plus_one) & (2**32 - 1)) - (1 << 31)
    reciprocal = one_over_one_plus_x(shifted_minus_one)
    exponent = bits_over_unit + 31 - 8
    out = rounding_divide_by_pot(_mul(reciprocal, exps), exponent) - 128
    return np.where(counted, np.clip(out, -128, 127), -128)
