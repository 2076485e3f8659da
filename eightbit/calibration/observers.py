"""Streaming statistics and the calibration-method registry.

Observers collect statistics batch by batch in memory that does not grow with the number of samples;
`eightbit.calibration.methods` turns them into clipping ranges with pure functions (AIMET-v2 style).  Each method
declares the statistics it needs, so one calibration pass collects the union for every quantization point.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import nn


class Statistic(enum.Enum):
    MINMAX = "minmax"
    EMA_MINMAX = "ema_minmax"
    HISTOGRAM = "histogram"
    CHANNEL_MEAN = "channel_mean"
    INPUT_SAMPLES = "input_samples"  # the first few model inputs (output-aware methods replay them)


class EmaMinMaxStats:
    """Exponential moving average of each batch's min and max (TF/QAT-style `moving average` observer).

    Less sensitive than the global min/max to one extreme batch; the first batch initialises it.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        if self.lo is None:
            self.lo, self.hi = lo.double(), hi.double()
            return
        m = self.momentum
        self.lo = m * self.lo + (1 - m) * lo.double()
        self.hi = m * self.hi + (1 - m) * hi.double()


class ChannelMeanStats:
    """Running mean per channel: axis 1 of conv-shaped (4-D/5-D) tensors, the last axis of 2-D ones.

    Used by bias correction; 3-D tensors are ambiguous (conv1d vs. sequence) and are skipped.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if x.dim() == 2:
            total, count = x.detach().sum(0).double(), x.shape[0]
        elif x.dim() in (4, 5):
            dims = (0, *range(2, x.dim()))
            total, count = x.detach().sum(dims).double(), x.numel() // x.shape[1]
        else:
            return
        if self.total is not None and self.total.shape != total.shape:
            self.total = None  # channel count changed between uses: no meaningful mean
            return
        self.total = total if self.total is None else self.total + total
        self.count += count

    def mean(self) -> torch.Tensor | None:
        return None if self.total is None or self.count == 0 else (self.total / self.count).float()


class MinMaxStats:
    """Running min and max, per tensor or per channel along `axis`."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in a batch; returns the batch's own min and max (per channel when `axis` is set)."""
        if self.axis is None:
            lo, hi = torch.aminmax(x.detach())
        else:
            flat = x.detach().transpose(0, self.axis).reshape(x.shape[self.axis], -1)
            lo, hi = torch.aminmax(flat, dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        return lo, hi

    def merge(self, other: MinMaxStats) -> None:
        if other.lo is not None:
            self.update_range(other.lo, other.hi)

    def update_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


class HistogramStats:
    """A fixed-size histogram whose range grows when a batch falls outside it.

    Growth widens each bin by an integer factor and sums groups of old bins, so the counts stay exact
    (no re-interpolation error accumulates over batches).
    """

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.lo = 0.0
        self.width = 0.0  # bin width; 0 until the first nonzero-range batch

    @property
    def hi(self) -> float:
        return self.lo + self.width * self.bins

    def update(self, x: torch.Tensor, batch_range: tuple[float, float] | None = None) -> None:
        """Count a batch; `batch_range` is its (min, max) when the caller already knows it."""
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        lo, hi = batch_range or (float(v) for v in torch.aminmax(x))
        self._cover(lo, hi)
        self.counts += bin_counts(x, self.lo, self.width, self.bins)

    def _cover(self, lo: float, hi: float) -> None:
        if self.width == 0.0:
            span = hi - lo
            self.lo, self.width = (lo, span / self.bins) if span > 0 else (lo - 0.5, 1.0 / self.bins)
            # Nudge so the top value lands inside the last bin rather than on its open edge.
            self.width *= 1 + 1e-6
            return
        if lo >= self.lo and hi <= self.hi:
            return
        pad_left = max(0, math.ceil((self.lo - lo) / self.width))
        hi = max(hi, self.hi)
        factor = 1
        while self.lo - pad_left * self.width + self.bins * factor * self.width < hi:
            factor *= 2
        padded = torch.zeros(self.bins * factor, dtype=torch.float64)
        padded[pad_left : pad_left + self.bins] = self.counts
        self.counts = padded.reshape(self.bins, factor).sum(dim=1)
        self.lo -= pad_left * self.width
        self.width *= factor

    def merge(self, other: HistogramStats) -> None:
        if other.width == 0.0:
            return
        centres = other.lo + (torch.arange(other.bins, dtype=torch.float64) + 0.5) * other.width
        self._cover(other.lo, other.hi)
        idx = ((centres - self.lo) / self.width).long().clamp(0, self.bins - 1)
        self.counts.index_add_(0, idx, other.counts)

    def edges(self) -> torch.Tensor:
        return self.lo + torch.arange(self.bins + 1, dtype=torch.float64) * self.width


# Histogram counting works on chunks of at most this many values, through reused scratch buffers: memory stays
# bounded for any batch size, and no large tensor is allocated (and page-faulted in) per observed tensor.
_CHUNK = 1 << 22
_scratch: dict[str, torch.Tensor] = {}


def _buffer(name: str, numel: int, dtype: torch.dtype, fill: int | None = None) -> torch.Tensor:
    buf = _scratch.get(name)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype)
        _scratch[name] = buf if fill is None else buf.fill_(fill)
    return _scratch[name][:numel]


def release_scratch() -> None:
    """Free the histogram scratch buffers (~80 MB at most) once a calibration pass is over."""
    _scratch.clear()


def bin_counts(x: torch.Tensor, lo: float, width: float, bins: int) -> torch.Tensor:
    """Counts of the float32 values `x` (1-D, all within [lo, lo + bins * width]) in `bins` equal bins, as
    float64; the top edge belongs to the last bin, as in `torch.histc`.

    About 6x faster than `torch.histc` on CPU: bin indices are computed in scratch buffers (one fused
    multiply-add, one conversion) and counted with a `scatter_add_` spread over one row per thread (histc and
    bincount run single-threaded).  Float-to-int conversion truncates, so a value a rounding error below `lo`
    lands in bin 0, and the top edge lands in an extra column that is folded into the last bin.
    """
    rows = max(1, torch.get_num_threads())
    counts = torch.zeros(rows, bins + 1, dtype=torch.int64)
    offset = torch.tensor(-lo / width, dtype=torch.float32)
    for start in range(0, x.numel(), _CHUNK):
        chunk = x[start : start + _CHUNK]
        n = chunk.numel()
        scaled = torch.add(offset, chunk, alpha=1.0 / width, out=_buffer("scaled", n, torch.float32))
        index = _buffer("index", n, torch.int64).copy_(scaled.clamp_(0, bins))
        ones = _buffer("ones", n, torch.int64, fill=1)
        r = rows if n % rows == 0 else 1
        counts[:r].scatter_add_(1, index.view(r, -1), ones.view(r, -1))
    total = counts.sum(0)
    total[bins - 1] += total[bins]
    return total[:bins].double()


class InputSamples:
    """The first `limit` calibration samples (positional model inputs), kept in the batches they came in.

    Output-aware methods (`eq`, `cross_entropy`) replay them through the float graph to see each layer's input
    and output.  Memory is bounded by `limit` samples, whatever the number of calibration samples.
    """

    def __init__(self, limit: int = 32) -> None:
        if limit < 1:
            raise ValueError(f"the input sample limit must be >= 1, got {limit}")
        self.limit = limit
        self.count = 0
        self.batches: list[tuple] = []

    def update(self, args: tuple) -> None:
        if self.count >= self.limit:
            return
        size = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), 0)
        if size == 0:
            return
        take = min(size, self.limit - self.count)
        # Cloned slices: a view would keep the whole calibration batch alive.
        self.batches.append(tuple(a[:take].clone() if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args))
        self.count += take


def histogram_bins(bits: int) -> int:
    """Histogram resolution for a target bit width: TensorRT's 2048 bins up to 8 bits, then 8 bins per code
    (capped at 65536), so that clipping searches can still choose between neighbouring code steps."""
    return 2048 if bits <= 8 else min(1 << 16, 8 << bits)


_COLLECTORS = {
    Statistic.EMA_MINMAX: lambda spec: EmaMinMaxStats(),
    Statistic.HISTOGRAM: lambda spec: HistogramStats(histogram_bins(spec.bits)),
}


class Observer(nn.Module):
    """Identity module that records statistics: min/max and channel means always, plus what the calibration
    method declares it needs.  One instance may observe several tensors that must share quantization
    parameters (e.g. the input and output of a max-pool)."""

    def __init__(self, spec, axis: int | None, label: str, needs: frozenset[Statistic] = frozenset()) -> None:
        super().__init__()
        self.spec = spec
        self.label = label
        self.stats: dict[Statistic, object] = {
            Statistic.MINMAX: MinMaxStats(axis if spec.per_channel else None),
            Statistic.CHANNEL_MEAN: ChannelMeanStats(),  # cheap; feeds bias correction
        }
        for statistic in needs:
            if statistic in _COLLECTORS:
                self.stats[statistic] = _COLLECTORS[statistic](spec)
        self.batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        minmax: MinMaxStats = self.stats[Statistic.MINMAX]
        lo, hi = minmax.update(x)
        # NaN and Inf propagate into the running min/max, so checking those two numbers checks every value.
        if not (torch.isfinite(minmax.lo).all() and torch.isfinite(minmax.hi).all()):
            raise ValueError(
                f"non-finite values (NaN or Inf) reached {self.label} during calibration; check the calibration "
                "inputs and that the float model itself produces finite outputs on them"
            )
        for statistic, collector in self.stats.items():
            if statistic is Statistic.HISTOGRAM:
                collector.update(x, (float(lo.min()), float(hi.max())))
            elif statistic is not Statistic.MINMAX:
                collector.update(x)
        self.batches += 1
        return x

    def observed(self) -> bool:
        return self.stats[Statistic.MINMAX].lo is not None

    def channel_mean(self) -> torch.Tensor | None:
        return self.stats[Statistic.CHANNEL_MEAN].mean()
