"""Reductions that are no-ops in a single process and all-reduce under torch.distributed.

Diagnostics accumulate sums and counts (never means of means) and pass each through here, so
a loader sharded with DistributedSampler gives the same result as one process on all data.
"""

from __future__ import annotations

import functools

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


# -- sharded (FSDP2 / DTensor) parameters ----------------------------------------------------


@functools.cache
def _dtensor_type():
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 makes parameters DTensors)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach the DTensor), else itself.

    Optimizer steps run on these shards, so no rank ever gathers a full parameter.
    """
    if is_dtensor(tensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


def sum_over_shards(params, local_sums) -> list[torch.Tensor]:
    """Per parameter, its ``local_sums`` entry added up over the ranks that hold its shards.

    ``local_sums[i]`` is a sum (any shape) over the local shard of ``params[i]``. For a DTensor
    sharded over some mesh dimensions the result is the sum over the whole tensor, identical on
    every rank; for a replicated or plain tensor it is returned as is. All ranks must call this
    with the same parameters in the same order (it is a collective); parameters on the same mesh
    and placements share one all-reduce.
    """
    results = list(local_sums)
    groups: dict = {}
    for i, param in enumerate(params):
        if is_dtensor(param) and any(p.is_shard() for p in param.placements):
            key = (id(param.device_mesh), tuple(param.placements), local_sums[i].dtype)
            groups.setdefault(key, []).append(i)
    for index in groups.values():
        results_for_group = _sum_partial(params[index[0]], [local_sums[i] for i in index])
        for i, total in zip(index, results_for_group):
            results[i] = total
    return results


def _sum_partial(param, sums) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor, Partial, Replicate

    flat = torch.cat([s.reshape(-1) for s in sums])
    # Sharded mesh dimensions hold parts of a sum (Partial); replicated ones hold copies.
    placements = [Partial() if p.is_shard() else Replicate() for p in param.placements]
    total = DTensor.from_local(flat, param.device_mesh, placements, run_check=False).full_tensor()
    pieces = total.split([s.numel() for s in sums])
    return [piece.reshape(s.shape) for piece, s in zip(pieces, sums)]
