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

    Exact for min/max (and every method computed from it) and channel means.  Histograms are first put on one
    grid spanning all ranks' ranges (each rank's bins re-binned by their centres) and then summed, so
    histogram methods match a single pass up to that re-binning.  Moving averages depend on the order of the
    batches and cannot be merged afterwards: they are refused.  Kept input samples stay each rank's own."""
    from eightbit.calibration.observers import HistogramStats, Statistic

    if world_size() == 1:
        return
    for observer in calibration._observers.values():
        for statistic, stats in observer.stats.items():
            if statistic is Statistic.MINMAX:
                stats.lo, stats.hi = reduce_range(stats.lo, stats.hi)
            elif statistic is Statistic.CHANNEL_MEAN:
                _merge_channel_mean(stats)
            elif statistic is Statistic.HISTOGRAM:
                observer.stats[statistic] = _merged_histogram(stats, HistogramStats)
            elif statistic is Statistic.EMA_MINMAX:
                raise ValueError(
                    "moving-average statistics depend on the order of the batches and cannot be merged across "
                    "ranks; calibrate with a min/max or histogram method, or on one rank"
                )


def _merge_channel_mean(stats) -> None:
    count = torch.tensor([float(stats.count)], dtype=torch.float64)
    dist.all_reduce(count)
    if stats.total is not None:
        dist.all_reduce(stats.total)  # same channel count on every rank: the same graph saw the same shapes
    stats.count = int(count.item())


def _merged_histogram(stats, histogram_cls):
    lo = torch.tensor([stats.lo], dtype=torch.float64)
    hi = torch.tensor([stats.hi], dtype=torch.float64)
    lo, hi = reduce_range(lo, hi)
    merged = histogram_cls(stats.bins)
    merged._cover(float(lo), float(hi))
    merged.merge(stats)
    dist.all_reduce(merged.counts)
    return merged
