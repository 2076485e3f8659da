"""Checks on calibrated ranges: a range that leaves nearly all of a tensor's values in a handful of codes.

One far outlier sets a min/max range (and can set others); every other value then falls into one or two codes,
and the int8 model loses that tensor without a word.  After calibration each per-tensor activation range is
checked against the histogram its observer kept (the full histogram, or the small sketch that every observer
keeps otherwise) and reported with a `CollapsedRangeWarning` that names the tensor and the methods to try.
"""

from __future__ import annotations

import warnings

import torch

from eightbit.calibration.observers import HistogramStats, Observer, Statistic

# "Nearly all values in a handful of codes": at least this share of the values in at most this many codes (not
# 99%: a pooled head holds one value per sample and channel, so one outlier sample of 16 is 6% of its values) ...
COLLAPSE_SHARE = 0.9
COLLAPSE_CODES = 4
# ... while at least this share of them are not a few exact values that the range represents (a 0/1 mask, exact
# zeros, a constant: those sit in few codes and lose nothing).  Measured as the mass in those codes beyond the
# COLLAPSE_CODES fullest bins, plus the mass of those bins that the range cannot represent (see `lost_spikes`).
SPREAD_SHARE = 0.1
# A fullest bin is lost when its values come back off by at least this share of their size (a constant 0.25
# under the range [0, 1e4] comes back as 0).
LOST_ERROR = 0.5

_SUGGESTIONS = {
    "minmax": "percentile, mse or kl",
    "ema": "percentile, mse or kl",
    "percentile": "mse or kl (or a lower percentile)",
    "mse": "kl",
    "kl": "mse",
}


class CollapsedRangeWarning(UserWarning):
    """eightbit: a calibrated range leaves nearly all of a tensor's values in a handful of codes."""


def code_mass(hist: HistogramStats, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """The histogram's mass per integer code (qmin..qmax) under (scale, zero point); a bin that spans several
    codes is spread evenly over them."""
    left, right, _, counts = hist.view()

    def code(v: torch.Tensor) -> torch.Tensor:
        return (torch.round(v / scale) + zero_point).clamp(qmin, qmax).long() - qmin

    first, last = code(left), code(right)
    density = counts / (last - first + 1)
    diff = torch.zeros(qmax - qmin + 2, dtype=torch.float64)
    diff.index_add_(0, first, density)
    diff.index_add_(0, last + 1, -density)
    return torch.cumsum(diff, 0)[:-1]


def lost_spikes(
    hist: HistogramStats, scale: float, zero_point: int, qmin: int, qmax: int, bounds: tuple[float, float] | None
) -> float:
    """The mass of the COLLAPSE_CODES fullest bins whose values the range cannot represent: every value in the bin
    (clipped to the observed `bounds`, min and max) comes back off by at least LOST_ERROR of its size.  A bin that
    may hold exact zeros (it contains 0) is never lost: zero is always exact."""
    left, right, _, counts = hist.view()
    top = counts.topk(min(COLLAPSE_CODES, counts.numel())).indices
    lo, hi = left[top], right[top]
    if bounds is not None:
        lo, hi = lo.clamp(bounds[0], bounds[1]), hi.clamp(bounds[0], bounds[1])

    def relative_error(v: torch.Tensor) -> torch.Tensor:
        q = (torch.clamp(torch.round(v / scale) + zero_point, qmin, qmax) - zero_point) * scale
        return (q - v).abs() / v.abs()

    lost = ((lo > 0) | (hi < 0)) & (relative_error(lo) >= LOST_ERROR) & (relative_error(hi) >= LOST_ERROR)
    return float(counts[top][lost].sum())


def collapsed_share(
    hist: HistogramStats,
    scale: float,
    zero_point: int,
    qmin: int,
    qmax: int,
    bounds: tuple[float, float] | None = None,
) -> float | None:
    """The share of values in the COLLAPSE_CODES fullest codes if the range has collapsed (see the constants),
    else None.  `bounds`: the observed minimum and maximum (they place a spike that the histogram's bins only
    bracket)."""
    total = float(hist.counts.sum()) + hist.tail_count()
    if total == 0 or qmax - qmin + 1 <= 2 * COLLAPSE_CODES:
        return None
    per_code = code_mass(hist, scale, zero_point, qmin, qmax)
    in_codes = float(per_code.topk(COLLAPSE_CODES).values.sum())
    _, _, _, counts = hist.view()
    in_bins = float(counts.topk(min(COLLAPSE_CODES, counts.numel())).values.sum())
    if in_codes < COLLAPSE_SHARE * total:
        return None
    lost = lost_spikes(hist, scale, zero_point, qmin, qmax, bounds)
    if in_codes - in_bins + lost >= SPREAD_SHARE * total:
        return in_codes / total
    return None


def collapsed_ranges(observers: dict[str, Observer], encodings: dict, spec) -> list[str]:
    """One message per per-tensor activation whose calibrated range has collapsed."""
    messages = []
    for group, observer in observers.items():
        enc = encodings.get(group)
        hist = observer.stats.get(Statistic.HISTOGRAM) or observer.stats.get(Statistic.SKETCH)
        if enc is None or enc.axis is not None or hist is None or hist.width == 0.0 or enc.scheme != "uniform":
            continue
        minmax = observer.stats[Statistic.MINMAX]
        bounds = (float(minmax.lo.min()), float(minmax.hi.max()))
        share = collapsed_share(hist, enc.scale[0], enc.zero_point[0], enc.qmin, enc.qmax, bounds)
        if share is None:
            continue
        lo, hi = (enc.qmin - enc.zero_point[0]) * enc.scale[0], (enc.qmax - enc.zero_point[0]) * enc.scale[0]
        messages.append(
            f"{observer.label}: {share:.1%} of its calibration values fall in {COLLAPSE_CODES} of "
            f"{enc.qmax - enc.qmin + 1} codes of the {spec.method} range [{lo:.4g}, {hi:.4g}], so the int8 model "
            f"loses most of this tensor's variation (far outliers set such a range); use "
            f"{_SUGGESTIONS.get(spec.method, 'mse or kl')}, or keep it float"
        )
    return messages


def warn_collapsed_ranges(observers: dict[str, Observer], encodings: dict, spec) -> list[str]:
    """`collapsed_ranges`, each also issued as a `CollapsedRangeWarning`; returns the messages."""
    messages = collapsed_ranges(observers, encodings, spec)
    for message in messages:
        warnings.warn(f"eightbit: {message}", CollapsedRangeWarning, stacklevel=3)
    return messages
