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
