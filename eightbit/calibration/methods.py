"""Calibration methods: pure functions from statistics (activations) or tensors (weights) to clipping ranges.

Activation methods see only the streaming statistics an observer collected (they never see activations);
weight methods see the whole weight tensor and work per channel.  A method declares the statistics it
needs, so one calibration pass serves every method that can be computed from them.  Adding a method is one
range function plus one `METHODS` entry.

Output-aware methods (`eq`, `cross_entropy`) also need a few model inputs (`Statistic.INPUT_SAMPLES`): their
range functions give the starting point, and `eightbit.calibration.refine` then searches each layer's clip against the
layer's float output (the math is in `eightbit.calibration.layerwise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from eightbit import qmath
from eightbit.calibration.observers import EmaMinMaxStats, HistogramStats, MinMaxStats, Statistic

Range = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A calibration method.

    needs: statistics the calibration pass must collect for it (activations).
    activation_range: (stats, spec) -> (lo, hi), or None if the method is for weights only.
    weight_range: (weight, spec, axis) -> per-channel (lo, hi), or None if for activations only.
    """

    needs: frozenset[Statistic]
    activation_range: Callable[[dict, object], Range] | None
    weight_range: Callable[[torch.Tensor, object, int | None], Range] | None

    @property
    def needs_histogram(self) -> bool:
        return Statistic.HISTOGRAM in self.needs

    @property
    def output_aware(self) -> bool:
        """Ranges are refined by searching against layer outputs on sample inputs (see `calibration.refine`)."""
        return Statistic.INPUT_SAMPLES in self.needs


# ---------------------------------------------------------------------------------------------- activations


def minmax_range(stats: dict, spec) -> Range:
    """The observed minimum and maximum."""
    mm: MinMaxStats = stats[Statistic.MINMAX]
    return _with_zero(mm.lo, mm.hi) if mm.lo.dim() == 0 else (mm.lo.clamp(max=0), mm.hi.clamp(min=0))


def ema_range(stats: dict, spec) -> Range:
    """Moving averages of the per-batch minimum and maximum."""
    ema: EmaMinMaxStats = stats[Statistic.EMA_MINMAX]
    return _with_zero(ema.lo, ema.hi)


def histogram_quantile(hist: HistogramStats, q: float) -> float:
    """The q-quantile (0..1) of the histogrammed data, interpolating linearly inside a bin."""
    left, right, _, counts = hist.view()
    cdf = torch.cumsum(counts, 0)
    total = float(cdf[-1])
    if total == 0:
        return 0.0
    target = q * total
    idx = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))[0].clamp(max=len(counts) - 1))
    before = float(cdf[idx - 1]) if idx > 0 else 0.0
    inside = float(counts[idx])
    frac = (target - before) / inside if inside > 0 else 0.0
    return float(left[idx]) + frac * float(right[idx] - left[idx])


def percentile_range(stats: dict, spec) -> Range:
    """Clip both tails at `spec.percentile` (e.g. 99.99 keeps the central 99.98% of values)."""
    hist: HistogramStats = stats[Statistic.HISTOGRAM]
    mm: MinMaxStats = stats[Statistic.MINMAX]
    p = spec.percentile / 100.0
    lo = max(histogram_quantile(hist, 1.0 - p), float(mm.lo))
    hi = min(histogram_quantile(hist, p), float(mm.hi))
    return _with_zero(lo, hi)


def _with_zero(lo: float, hi: float) -> Range:
    """(lo, hi) widened to contain 0, as every range is before it becomes a scale (real zero is exact)."""
    return torch.tensor(min(float(lo), 0.0)), torch.tensor(max(float(hi), 0.0))


def histogram_error(hist: HistogramStats, scale: torch.Tensor, zp: torch.Tensor, spec) -> torch.Tensor:
    """Squared quantization error of the histogrammed data for each candidate (scale, zero point), vectorised
    over candidates.  Each bin is represented by its centre, weighted by its count.  Far outliers (a
    histogram's tails) are left out: counted, one 1e6 among values of size 1 outweighs all of them, and the
    least-error range keeps it and puts every other value into one code."""
    _, _, centres, counts = hist.core_view()
    centres = centres.float()
    scale, zp = scale.reshape(-1), zp.reshape(-1)
    q = torch.clamp(torch.round(centres[None, :] / scale[:, None]) + zp[:, None], spec.qmin, spec.qmax)
    error = ((q - zp[:, None]) * scale[:, None] - centres[None, :]) ** 2
    return (error.double() * counts[None, :]).sum(dim=1)


def mse_range(stats: dict, spec) -> Range:
    """The range, shrunk from min/max by a common factor, that minimises the L2 quantization error.

    Factors run from 1 down to 5% of the observed range, then geometrically down to 1/256 of it; with far
    outliers (see `HistogramStats`) the same factors are also applied to the dense part's range."""
    mm: MinMaxStats = stats[Statistic.MINMAX]
    hist: HistogramStats = stats[Statistic.HISTOGRAM]
    factors = torch.cat([torch.linspace(0.05, 1.0, 96), torch.logspace(math.log10(1 / 256), math.log10(0.05), 24)[:-1]])
    lo, hi = float(mm.lo) * factors, float(mm.hi) * factors
    if hist.tail_count():
        core_lo, core_hi = hist.occupied()
        core_lo, core_hi = max(core_lo, float(mm.lo)), min(core_hi, float(mm.hi))
        lo, hi = torch.cat([lo, min(core_lo, 0.0) * factors]), torch.cat([hi, max(core_hi, 0.0) * factors])
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=spec.qmin, qmax=spec.qmax, symmetric=spec.symmetric)
    best = int(torch.argmin(histogram_error(hist, scale, zp, spec)))
    return _with_zero(lo[best], hi[best])


def kl_threshold(counts: torch.Tensor, levels: int, stride: int = 1) -> int:
    """TensorRT's entropy calibration on a histogram: the bin count i (>= `levels`) whose clipped
    distribution P (outliers folded into its last bin) is best approximated, in KL divergence, by the
    unclipped bins merged into `levels` quantization levels and spread back over their nonzero bins.

    Groups follow TensorRT/MXNet: i // levels bins each, the remainder merged into the last group.  Within a
    group Q is constant on the nonzero bins, so KL(P || Q) splits into prefix sums of c, c·log c and of the
    nonzero-bin count: every candidate costs O(levels), not O(bins), and all are evaluated at once.
    """
    counts = counts.double()
    bins = len(counts)
    cand = torch.arange(levels, bins + 1, stride)
    if len(cand) == 0:
        return bins
    zero = torch.zeros(1, dtype=torch.float64)
    prefix = torch.cat([zero, torch.cumsum(counts, 0)])
    c_log_c = torch.cat([zero, torch.cumsum(torch.xlogy(counts, counts), 0)])
    nonzero_prefix = torch.cat([zero, torch.cumsum((counts > 0).double(), 0)])
    total = float(prefix[-1])
    width = torch.div(cand, levels, rounding_mode="floor")  # bins per group, per candidate
    group = torch.arange(levels)
    start = group[None, :] * width[:, None]
    end = torch.where(group[None, :] == levels - 1, cand[:, None], (group[None, :] + 1) * width[:, None])
    group_sum = prefix[end] - prefix[start]
    log_avg = torch.log(group_sum / (nonzero_prefix[end] - nonzero_prefix[start]).clamp_min(1)).nan_to_num(neginf=0.0)
    last = counts[cand - 1]  # the last kept bin, which also receives the outliers
    kept = prefix[cand]  # = the sum of Q before normalisation
    # P·log P and P·log Q over the kept bins except the last one, then the last bin on its own.
    p_log_p = c_log_c[cand - 1] - prefix[cand - 1] * math.log(total)
    p_log_q = (group_sum * log_avg).sum(1) - last * log_avg[:, -1] - prefix[cand - 1] * torch.log(kept)
    p_last = (last + total - kept) / total
    q_last = torch.where(last > 0, torch.exp(log_avg[:, -1]) / kept, torch.full_like(kept, 1e-12))
    kl = (p_log_p - p_log_q) / total + torch.xlogy(p_last, p_last) - p_last * torch.log(q_last)
    kl = torch.where(kept > 0, kl, torch.full_like(kl, math.inf))
    # Exact ties (empty bins past the data) resolve to the smallest threshold, as a sequential search would;
    # the tolerance absorbs the rounding of the closed form.
    best = float(kl.min())
    return int(cand[int(torch.nonzero(kl <= best + 1e-12 * max(1.0, abs(best)))[0])])


# KL calibration estimates the data's distribution over the quantization levels: with fewer values than this per
# level (a pooled head: one value per sample and channel) there is no distribution to compare.
KL_MIN_VALUES_PER_LEVEL = 2
# ... and the clip never leaves more than this share of the values outside the range.
KL_MAX_CLIPPED = 0.01


def kl_range(stats: dict, spec) -> Range:
    """Entropy (KL) calibration.  Non-negative data (after ReLU) is searched on [0, max] with as many levels
    as the type has codes; signed data on a histogram of |x| with half as many (TensorRT's symmetric scheme).
    The search runs on the observer's histogram (2048 bins up to 8 bits, more for wider types, see
    `histogram_bins`; fewer after range growth); with no more bins than levels there is nothing to choose and
    the full range is kept.  With far outliers (tails, see `HistogramStats`) the search spans the dense part
    only and the outliers are folded into its last bin.  The threshold never drops below the smallest
    magnitude seen (a clip below every value scores a perfect KL of 0 and saturates everything), data with fewer
    than KL_MIN_VALUES_PER_LEVEL values per level keeps its full range (nothing to estimate), the clip leaves at
    most KL_MAX_CLIPPED of the values outside, and the range always contains 0."""
    hist: HistogramStats = stats[Statistic.HISTOGRAM]
    mm: MinMaxStats = stats[Statistic.MINMAX]
    lo, hi = float(mm.lo), float(mm.hi)
    levels = spec.qmax - spec.qmin + 1
    _, _, centres, counts = hist.view()
    if lo >= 0:
        magnitude, top = centres, hi
    else:
        magnitude, top, levels = centres.abs(), max(-lo, hi), max(2, levels // 2)
    if hist.tail_count():
        top = min(top, max(abs(hist.lo), abs(hist.hi)))
    floor = lo if lo > 0 else -hi if hi < 0 else 0.0  # the smallest magnitude present
    # Fold at the observer's own resolution: re-binning into finer bins than were observed leaves a comb of
    # empty bins, and the KL search then "finds" thresholds where each group holds one nonzero bin.
    bins = min(max(8192, 8 * levels), int(round(top / hist.width))) if top > 0 else 0
    if bins <= levels or floor >= top:
        return _with_zero(lo, hi)  # too few observed bins to choose a clip
    folded = torch.zeros(bins, dtype=torch.float64).index_add_(
        0, (magnitude / top * bins).long().clamp(0, bins - 1), counts
    )
    if lo >= 0:
        # The exact zeros of a ReLU are a spike in bin 0 that any clip represents exactly; left in, they
        # dominate P and make the search accept clipping most of the real signal (ReLU6 nets).
        folded[0] = 0
    if float(counts.sum()) < KL_MIN_VALUES_PER_LEVEL * levels:
        # Too few values to estimate a distribution over the levels (a pooled or max head holds one value per
        # sample and channel): groups hold at most one nonzero bin, Q equals P for most thresholds and only the
        # folded tail scores, so the search clips real values for nothing.  Keep the full range.
        return _with_zero(lo, hi)
    # Every 4th candidate (neighbouring thresholds differ by well under 1% of the range), sparser at high bit
    # widths so that the [candidates, levels] work stays below ~2 M entries.
    stride = max(4, math.ceil((bins - levels) * levels / (1 << 21)))
    chosen = kl_threshold(folded, min(levels, bins), stride=stride)
    # KL judges bins by their share of P, not by how far a clip moves them: a tensor that is a few discrete values
    # (a saturated hardtanh, a constant input) had a quarter of its values clipped.  A clip is for outliers.
    cdf = torch.cumsum(folded, 0)
    keep = int(torch.searchsorted(cdf, (1 - KL_MAX_CLIPPED) * cdf[-1:])[0]) + 1
    threshold = max(max(chosen, keep) * top / bins, floor)
    return _with_zero(max(lo, -threshold), min(hi, threshold))


# -------------------------------------------------------------------------------------------------- weights


def _per_channel(w: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Weights as [channels, values] (one row when per-tensor)."""
    if axis is None:
        return w.reshape(1, -1)
    return w.transpose(0, axis).reshape(w.shape[axis], -1)


def _shape_range(lo: torch.Tensor, hi: torch.Tensor, axis: int | None) -> Range:
    """Per-channel (lo, hi) widened to contain 0, reshaped to 0-d for a per-tensor weight."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    return (lo.reshape(()), hi.reshape(())) if axis is None else (lo, hi)


def weight_minmax(w: torch.Tensor, spec, axis: int | None) -> Range:
    """Per-channel minimum and maximum."""
    lo, hi = torch.aminmax(_per_channel(w, axis), dim=1)
    return _shape_range(lo, hi, axis)


def weight_percentile(w: torch.Tensor, spec, axis: int | None) -> Range:
    """Per-channel percentiles of the weights."""
    rows = _per_channel(w, axis).float()
    p = spec.percentile / 100.0
    return _shape_range(torch.quantile(rows, 1 - p, dim=1), torch.quantile(rows, p, dim=1), axis)


def _row_error(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec) -> torch.Tensor:
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=spec.qmin, qmax=spec.qmax, symmetric=spec.symmetric)
    return weight_error(rows, scale, zp, spec)


def weight_error(rows: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec) -> torch.Tensor:
    """Per-row squared error of quantizing `rows` ([channels, values]) with per-row (scale, zero point)."""
    fq = qmath.fake_quantize(rows, scale, zp, spec.qmin, spec.qmax, axis=0)
    return ((fq - rows) ** 2).sum(dim=1)


def weight_mse(w: torch.Tensor, spec, axis: int | None) -> Range:
    """Per channel, the min/max range shrunk by the factor (searched on a grid) with the least L2 error."""
    rows = _per_channel(w, axis).float()
    lo0, hi0 = torch.aminmax(rows, dim=1)
    factors = torch.linspace(0.3, 1.0, 71)
    errors = torch.stack([_row_error(rows, lo0 * f, hi0 * f, spec) for f in factors])  # [factors, channels]
    best = factors[errors.argmin(dim=0)]
    return _shape_range(lo0 * best, hi0 * best, axis)


def admm_scale(rows: torch.Tensor, qmin: int, qmax: int, iterations: int = 50) -> torch.Tensor:
    """Symmetric per-row scale by alternating minimisation (MNN's ADMM): q = clip(round(w / s)), then the
    least-squares s = <w, q> / <q, q>, until the codes stop changing.  The result is a fixed point.

    An all-zero row gets scale 0 (not a tiny placeholder), so that `qmath.qparams_from_range` gives it the
    scale borrowed from the other channels, and a bias quantized with it keeps a sensible step."""
    peak = rows.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak, torch.ones_like(peak)) / qmax
    codes = None
    for _ in range(iterations):
        new_codes = torch.clamp(torch.round(rows / scale[:, None]), qmin, qmax)
        if codes is not None and torch.equal(new_codes, codes):
            break
        codes = new_codes
        energy = (codes * codes).sum(dim=1)
        scale = torch.where(energy > 0, (rows * codes).sum(dim=1) / energy.clamp_min(1e-12), scale)
    return torch.where(peak > 0, scale, torch.zeros_like(scale))


def weight_admm(w: torch.Tensor, spec, axis: int | None) -> Range:
    """ADMM scales (symmetric schemes only), returned as the range they imply."""
    if not spec.symmetric:
        raise ValueError("the admm method needs a symmetric weight spec")
    rows = _per_channel(w, axis).float()
    half = (spec.qmax - spec.qmin) / 2
    bound = admm_scale(rows, spec.qmin, spec.qmax) * half
    return _shape_range(-bound, bound, axis)


_HIST = frozenset({Statistic.MINMAX, Statistic.HISTOGRAM})
_SAMPLES = frozenset({Statistic.INPUT_SAMPLES})

METHODS: dict[str, Method] = {
    "minmax": Method(frozenset({Statistic.MINMAX}), minmax_range, weight_minmax),
    "ema": Method(frozenset({Statistic.EMA_MINMAX}), ema_range, None),
    "percentile": Method(_HIST, percentile_range, weight_percentile),
    "mse": Method(_HIST, mse_range, weight_mse),
    "kl": Method(_HIST, kl_range, None),
    "admm": Method(frozenset({Statistic.MINMAX}), None, weight_admm),
    # EasyQuant: starts from min/max (activations) and max |w| per channel, then searches both scales per layer
    # for the best output cosine.
    "eq": Method(frozenset({Statistic.MINMAX}) | _SAMPLES, minmax_range, weight_minmax),
    # mse everywhere, except the input of the layer producing the logits: clip searched for the least softmax KL.
    "cross_entropy": Method(_HIST | _SAMPLES, mse_range, None),
}


def lookup_method(name: str) -> Method:
    """The registered method called `name`; the error lists the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown calibration method {name!r}; valid methods: {sorted(METHODS)}") from None


def power_of_two(
    lo: torch.Tensor,
    hi: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    spec,
    error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Range:
    """Round scales to powers of two (for shift-only hardware), per element choosing floor or ceil by
    `error(scale, zero_point)`; without an error function, ceil (never clips more than the method chose)."""
    exponent = torch.log2(scale)
    # The largest power of two whose whole code grid stays finite in float32 (only huge ranges reach it).
    top = math.floor(math.log2(torch.finfo(torch.float32).max / max(1, spec.qmax - spec.qmin)))
    options = []
    for s in (torch.exp2(torch.floor(exponent).clamp(max=top)), torch.exp2(torch.ceil(exponent).clamp(max=top))):
        z = (
            zp
            if spec.symmetric
            else torch.clamp(spec.qmin - torch.round(torch.minimum(lo, torch.zeros(())) / s), spec.qmin, spec.qmax).to(
                zp.dtype
            )
        )
        options.append((s, z))
    if error is None:
        return options[1]
    (s_floor, z_floor), (s_ceil, z_ceil) = options
    floor_wins = (error(s_floor, z_floor) < error(s_ceil, z_ceil)).reshape(scale.shape)
    return torch.where(floor_wins, s_floor, s_ceil), torch.where(floor_wins, z_floor, z_ceil)
