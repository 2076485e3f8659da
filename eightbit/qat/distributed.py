"""Observer statistics across DDP ranks: every rank must hold the same quantization parameters.

Nothing here is CPU-specific: the collectives run on the tensors' own device (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of ranks of the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, or when not distributed: only this process writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def reduce_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (min, max) over all ranks of each rank's batch range: the range of the global batch."""
    if world_size() == 1:
        return lo, hi
    lo, hi = lo.detach().clone(), hi.detach().clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return lo, hi


def merge_calibration(calibration) -> None:
    """Sharded calibration: after `eightbit.calibrate` ran on each rank's share of the data, all-reduce every
    observer's statistics so that each rank holds those of one pass over all ranks' data (then
    `calibration.quantize()` gives the same encodings everywhere).

    Exact for min/max (and every method computed from it) and channel means.  Histograms (`_merged_histogram`)
    are put on one grid, grown from the grid of the rank with the widest bins, and summed: exact for ranks whose
    bins nest in that grid (that rank's always; every rank's when their first batches spanned the same range);
    any other rank's bins are split in proportion, which moves a value by less than one of that rank's bins, so
    a histogram quantile (percentile) lies within (merged bin width + widest rank bin width) of the exact one,
    against one bin width for a single pass.  Moving averages (`ema`) depend on the order of the batches and
    cannot be merged afterwards: they are refused before any statistic is exchanged.  Kept input samples stay
    each rank's own."""
    from eightbit.calibration.observers import HistogramStats, Statistic

    if world_size() == 1:
        return
    if any(Statistic.EMA_MINMAX in o.stats for o in calibration._observers.values()):
        raise ValueError(
            "moving-average (ema) statistics depend on the order of the batches and cannot be merged across "
            "ranks; calibrate with a min/max or histogram method (minmax, percentile, mse, kl), or on one rank"
        )
    for observer in calibration._observers.values():
        for statistic, stats in observer.stats.items():
            if statistic is Statistic.MINMAX:
                stats.lo, stats.hi = reduce_range(stats.lo, stats.hi)
            elif statistic is Statistic.CHANNEL_MEAN:
                _merge_channel_mean(stats)
            elif statistic in (Statistic.HISTOGRAM, Statistic.SKETCH):
                observer.stats[statistic] = _merged_histogram(stats, HistogramStats)


def _merge_channel_mean(stats) -> None:
    count = torch.tensor([float(stats.count)], dtype=torch.float64)
    dist.all_reduce(count)
    if stats.total is not None:
        dist.all_reduce(stats.total)  # same channel count on every rank: the same graph saw the same shapes
    stats.count = int(count.item())


def _merged_histogram(stats, histogram_cls):
    """The histogram of all ranks' values, the same on every rank (see `merge_calibration` for the bound)."""
    world, rank = world_size(), dist.get_rank()
    grids = torch.zeros(world, 4, dtype=torch.float64)  # (width, lo, hi, tail extremes known) per rank
    if stats.width > 0.0:
        grids[rank] = torch.tensor([stats.width, stats.lo, stats.hi, 1.0], dtype=torch.float64)
    dist.all_reduce(grids)
    seen = grids[:, 0] > 0
    if not bool(seen.any()):
        return stats
    widest = int(torch.argmax(grids[:, 0]))  # first rank among equals: every rank picks the same
    merged = histogram_cls(stats.bins, resolve_spikes=getattr(stats, "resolve_spikes", False))
    merged.width, merged.lo = float(grids[widest, 0]), float(grids[widest, 1])
    merged._cover(float(grids[seen, 1].min()), float(grids[seen, 2].max()))
    merged.counts = stats.rebinned(merged.lo, merged.width)
    dist.all_reduce(merged.counts)
    tails = stats.tails.clone() if stats.tails is not None else merged._empty_tails()
    dist.all_reduce(tails)
    extremes = torch.tensor([-stats.tail_extremes[0], stats.tail_extremes[1]], dtype=torch.float64)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if float(tails.sum()) > 0:
        merged.tails, merged.tail_extremes = tails, [-float(extremes[0]), float(extremes[1])]
        merged._absorb_tails()
    return merged
