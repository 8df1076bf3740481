"""Reductions that are no-ops in a single process and all-reduce under torch.distributed.

Diagnostics accumulate sums and counts (never means of means) and pass each through here, so
a loader sharded with DistributedSampler gives the same result as one process on all data.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (nothing to do in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    """``[obj]`` in one process; every rank's ``obj``, in rank order, under torch.distributed."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
