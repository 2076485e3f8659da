"""Integer kernels of the TFLite int8 operators, as TensorFlow Lite Micro's reference kernels compute them.

Pure numpy functions on NHWC int8 codes (held as int64 for the arithmetic).  Dot products (CONV_2D,
DEPTHWISE_CONV_2D, FULLY_CONNECTED) go through `accumulate`, which can also simulate a narrower accumulator and
measure the largest partial sum.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from eightbit.integer.fixed_point import (
    doubling_high_mul_int16,
    int16_multiplier,
    multiply_by_quantized_multiplier,
    multiply_smaller_than_one,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_left_shift_int16,
    srdhm_int16,
)

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1


class AccumulatorMode(enum.Enum):
    """How dot products accumulate: exact int32 (what TFLM does), int16 saturating on every addition, or int16
    chunks of `spill_every` products, each spilled (added) into an int32 total."""

    INT32 = "int32"
    INT16_SATURATE = "int16_saturate"
    INT16_SPILL = "int16_spill"


@dataclass(frozen=True, kw_only=True)
class Accumulator:
    mode: AccumulatorMode = AccumulatorMode.INT32
    spill_every: int = 2
    measure: bool = False  # record the largest |partial sum| of products per layer (slower: one pass per product)

    def __post_init__(self) -> None:
        if not isinstance(self.mode, AccumulatorMode):
            raise TypeError(f"mode must be an AccumulatorMode, got {self.mode!r}")
        if self.spill_every < 1:
            raise ValueError(f"spill_every must be >= 1, got {self.spill_every}")

    @property
    def exact(self) -> bool:
        return self.mode is AccumulatorMode.INT32 and not self.measure


@dataclass
class AccumulatorStats:
    """Per layer: the largest |partial sum of products| seen, and whether an int16 accumulator overflowed."""

    max_abs_partial: int = 0
    int16_overflow: bool = False

    def update(self, partial: np.ndarray) -> None:
        peak = int(np.abs(partial).max(initial=0))
        self.max_abs_partial = max(self.max_abs_partial, peak)
        self.int16_overflow = self.int16_overflow or peak > INT16_MAX


def accumulate(terms_a: np.ndarray, terms_b: np.ndarray, acc: Accumulator, stats: AccumulatorStats | None):
    """sum_k a[p, k, o] * b[k, o] for a of shape (P, K, O or 1) and b of shape (K, O), in product order k.

    Exact int32 accumulation uses one float64 matrix product (exact: |sums| stay far below 2^53)."""
    if acc.exact:
        if terms_a.shape[2] == 1:
            return np.rint(terms_a[:, :, 0].astype(np.float64) @ terms_b.astype(np.float64)).astype(np.int64)
        return np.einsum("pko,ko->po", terms_a, terms_b)
    total = np.zeros((terms_a.shape[0], terms_b.shape[1]), dtype=np.int64)
    chunk = np.zeros_like(total)
    for k in range(terms_a.shape[1]):
        product = terms_a[:, k, :] * terms_b[k]
        if acc.mode is AccumulatorMode.INT16_SATURATE:
            exact = total + product
            if stats is not None:
                stats.update(exact)
            total = np.clip(exact, INT16_MIN, INT16_MAX)
        elif acc.mode is AccumulatorMode.INT16_SPILL:
            exact = chunk + product
            if stats is not None:
                stats.update(exact)
            chunk = np.clip(exact, INT16_MIN, INT16_MAX)
            if (k + 1) % acc.spill_every == 0 or k == terms_a.shape[1] - 1:
                total, chunk = total + chunk, np.zeros_like(chunk)
        else:
            total = total + product
            if stats is not None:
                stats.update(total)
    return total


# ------------------------------------------------------------------------------------------- windows


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int, int]:
    """(output size, pad before, pad after) of TFLite's SAME padding."""
    out = (size + stride - 1) // stride
    effective = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective - size, 0)
    return out, total // 2, total - total // 2


def valid_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    return (size - ((kernel - 1) * dilation + 1) + stride) // stride


def window_geometry(shape, kernel, stride, dilation, same: bool):
    """Output (h, w) and pads (top, bottom, left, right) of a window op on an NHWC tensor."""
    (_, h, w, _), (kh, kw) = shape, kernel
    if same:
        oh, top, bottom = same_padding(h, kh, stride[0], dilation[0])
        ow, left, right = same_padding(w, kw, stride[1], dilation[1])
        return (oh, ow), (top, bottom, left, right)
    return (valid_size(h, kh, stride[0], dilation[0]), valid_size(w, kw, stride[1], dilation[1])), (0, 0, 0, 0)


def patches(x: np.ndarray, kernel, stride, dilation, out_hw, pads, fill) -> np.ndarray:
    """(N, OH, OW, KH*KW, C) windows of NHWC x, padded with `fill`, in TFLM's loop order (ky, kx)."""
    top, bottom, left, right = pads
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    oh, ow = out_hw
    views = []
    for ky in range(kernel[0]):
        for kx in range(kernel[1]):
            y0, x0 = ky * dilation[0], kx * dilation[1]
            views.append(
                padded[
                    :, y0 : y0 + (oh - 1) * stride[0] + 1 : stride[0], x0 : x0 + (ow - 1) * stride[1] + 1 : stride[1], :
                ]
            )
    return np.stack(views, axis=3)


# ------------------------------------------------------------------------------------------- requantization


def wrap_int32(acc: np.ndarray) -> np.ndarray:
    """acc as a C int32 holds it: TFLM adds the bias to the int32 sum of products without a saturation check, so a
    bias at the int32 limit (a dead channel with a tiny weight scale) wraps around.  The reference does the same."""
    return ((acc + 2**31) % 2**32) - 2**31


def requantize(acc: np.ndarray, multipliers, shifts, out_zp: int, act_min: int, act_max: int) -> np.ndarray:
    out = multiply_by_quantized_multiplier(acc, multipliers, shifts) + out_zp
    return np.clip(out, act_min, act_max)


def channel_multipliers(in_scale: float, weight_scales, out_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (significand, shift) of in_scale * weight_scale / out_scale, in double as TFLM does."""
    pairs = [quantize_multiplier(float(in_scale) * float(s) / float(out_scale)) for s in weight_scales]
    return np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64)


# ------------------------------------------------------------------------------------------- kernels


def conv2d(x, in_zp, filt, bias, geometry, groups: int, acc: Accumulator, stats) -> np.ndarray:
    """int32 accumulators of CONV_2D: x NHWC, filt (O, KH, KW, C/groups); returns (N, OH, OW, O)."""
    kernel, stride, dilation, out_hw, pads = geometry
    win = patches(x, kernel, stride, dilation, out_hw, pads, in_zp).astype(np.int64) - in_zp
    n, oh, ow, kk, c = win.shape
    out_channels, per_group = filt.shape[0], filt.shape[3]
    outs = []
    for g in range(groups):
        chans = slice(g * per_group, (g + 1) * per_group)
        o = slice(g * (out_channels // groups), (g + 1) * (out_channels // groups))
        a = win[..., chans].reshape(n * oh * ow, kk * per_group, 1)
        b = filt[o].reshape(filt[o].shape[0], -1).T.astype(np.int64)
        outs.append(accumulate(a, b, acc, stats))
    total = wrap_int32(np.concatenate(outs, axis=1) + bias.astype(np.int64))
    return total.reshape(n, oh, ow, out_channels)


def depthwise_conv2d(x, in_zp, filt, bias, geometry, multiplier: int, acc: Accumulator, stats) -> np.ndarray:
    """int32 accumulators of DEPTHWISE_CONV_2D: filt (1, KH, KW, C*multiplier)."""
    kernel, stride, dilation, out_hw, pads = geometry
    win = patches(x, kernel, stride, dilation, out_hw, pads, in_zp).astype(np.int64) - in_zp
    n, oh, ow, kk, c = win.shape
    win = np.repeat(win, multiplier, axis=-1).reshape(n * oh * ow, kk, c * multiplier)
    b = filt.reshape(kk, c * multiplier).astype(np.int64)
    total = (win * b).sum(axis=1) if acc.exact else accumulate(win, b, acc, stats)
    return wrap_int32(total + bias.astype(np.int64)).reshape(n, oh, ow, c * multiplier)


def fully_connected(x, in_zp, weights, bias, acc: Accumulator, stats) -> np.ndarray:
    a = (x.astype(np.int64) - in_zp).reshape(x.shape[0], -1, 1)
    return wrap_int32(accumulate(a, weights.T.astype(np.int64), acc, stats) + bias.astype(np.int64))


def add(a, a_params, b, b_params, out_params, act_min: int, act_max: int) -> np.ndarray:
    """ADD with TFLM's rescaling: both inputs to a common scale (left shift 20), sum, then to the output scale."""
    (sa, za), (sb, zb), (so, zo) = a_params, b_params, out_params
    left_shift = 20
    twice_max = 2 * float(max(np.float32(sa), np.float32(sb)))
    m1, s1 = quantize_multiplier(float(sa) / twice_max)
    m2, s2 = quantize_multiplier(float(sb) / twice_max)
    mo, shift_o = quantize_multiplier(twice_max / ((1 << left_shift) * float(so)))
    x1 = multiply_smaller_than_one((a.astype(np.int64) - za) * (1 << left_shift), m1, s1)
    x2 = multiply_smaller_than_one((b.astype(np.int64) - zb) * (1 << left_shift), m2, s2)
    out = multiply_smaller_than_one(x1 + x2, mo, shift_o) + zo
    return np.clip(out, act_min, act_max)


def mul(a, a_params, b, b_params, out_params, act_min: int, act_max: int) -> np.ndarray:
    (sa, za), (sb, zb), (so, zo) = a_params, b_params, out_params
    m, s = quantize_multiplier(float(sa) * float(sb) / float(so))
    product = (a.astype(np.int64) - za) * (b.astype(np.int64) - zb)
    return np.clip(multiply_by_quantized_multiplier(product, m, s) + zo, act_min, act_max)


def mean(x, axes, keepdims: bool, in_params, out_params) -> np.ndarray:
    """MEAN as TFLM's QuantizedMeanOrSum: raw sum, 1/count folded into the multiplier, then requantized."""
    (si, zi), (so, zo) = in_params, out_params
    total = x.astype(np.int64).sum(axis=tuple(axes), keepdims=keepdims)
    count = int(np.prod([x.shape[a] for a in axes]))
    m, shift = quantize_multiplier(float(si) / float(so))
    extra = min(count.bit_length() - 1, 32, 31 + shift)
    m = (m << extra) // count
    shift -= extra
    out = multiply_by_quantized_multiplier(total - zi * count, m, shift) + zo
    return np.clip(out, -128, 127)


def pool(x, kernel, stride, same: bool, average: bool, act_min: int, act_max: int) -> np.ndarray:
    """AVERAGE_POOL_2D / MAX_POOL_2D over the window's valid positions only (TFLite SAME excludes padding)."""
    out_hw, pads = window_geometry(x.shape, kernel, stride, (1, 1), same)
    valid = patches(np.ones(x.shape[:3] + (1,), np.int64), kernel, stride, (1, 1), out_hw, pads, 0)
    if average:
        win = patches(x.astype(np.int64), kernel, stride, (1, 1), out_hw, pads, 0)
        total, count = win.sum(axis=3), valid.sum(axis=3)
        half = count // 2
        out = np.where(total > 0, (total + half) // count, -((-(total - half)) // count))
    else:
        win = patches(x.astype(np.int64), kernel, stride, (1, 1), out_hw, pads, -(2**31))
        out = win.max(axis=3)
    return np.clip(out, act_min, act_max)


def requantize_int8(x, in_params, out_params) -> np.ndarray:
    """QUANTIZE int8 -> int8 as TFLM's Requantize."""
    (si, zi), (so, zo) = in_params, out_params
    m, s = quantize_multiplier(float(si) / float(so))
    return np.clip(multiply_by_quantized_multiplier(x.astype(np.int64) - zi, m, s) + zo, -128, 127)


def hard_swish(x, in_params, out_params) -> np.ndarray:
    """HARD_SWISH as TFLite's int16 fixed-point kernel: x on a 2^7 finer input scale, a "relu-ish" factor
    relu6(x + 3) / 6 in [0, 1] as a 16-bit fixed-point value, their product, then the output shift."""
    (si, zi), (so, zo) = in_params, out_params
    hires = np.float32(si) * np.float32(1.0 / 128.0)
    out_m, out_shift = quantize_multiplier(float(np.float32(hires / np.float32(so))))
    relu_m, relu_shift = quantize_multiplier(float(np.float32(hires / np.float32(3.0 / 32768.0))))
    out_m16, relu_m16 = int16_multiplier(out_m), int16_multiplier(relu_m)
    value = (x.astype(np.int64) - zi) * (1 << 7)
    preshift = srdhm_int16(value, out_m16)
    reluish = value
    if relu_shift > 0:
        reluish = saturating_left_shift_int16(reluish, relu_shift - 1)
    reluish = srdhm_int16(reluish, relu_m16)
    if relu_shift > 0:
        reluish = saturating_left_shift_int16(reluish, 1)
    if relu_shift < 0:
        reluish = rounding_divide_by_pot(reluish, -relu_shift)
    reluish = (reluish + (1 << 15)) >> 1
    out = rounding_divide_by_pot(doubling_high_mul_int16(reluish, preshift), -out_shift) + zo
    return np.clip(out, -128, 127)
