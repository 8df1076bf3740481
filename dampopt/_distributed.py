"""Reductions that are no-ops in a single process and all-reduce under torch.distributed.

Diagnostics accumulate sums and counts (never means of means) and pass each through here, so
a loader sharded with DistributedSampler gives the same result as one process on all data.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return rank_and_world_size()[1] > 1


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


_DTENSOR: list = []  # the DTensor class (or None without torch.distributed), once looked up


def _dtensor_type():
    # a plain module-level cache, not functools.cache: torch.compile traces optimizer steps
    # through this, and warns about (and ignores) lru_cache wrappers
    if not _DTENSOR:
        if dist.is_available():
            from torch.distributed.tensor import DTensor

            _DTENSOR.append(DTensor)
        else:
            _DTENSOR.append(None)
    return _DTENSOR[0]


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


def is_sharded(tensor) -> bool:
    """True for a DTensor sharded over at least one dimension of its device mesh."""
    return is_dtensor(tensor) and any(p.is_shard() for p in tensor.placements)


def shard_accumulator(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A zero accumulator for a quantity summed over ``param``'s elements on this rank.

    For a sharded DTensor parameter it is a DTensor of global shape ``mesh.shape``, one element
    per rank (placed ``Shard(i)`` on mesh dimension ``i``), so distributed checkpointing saves
    and restores every rank's own value; a plain tensor in optimizer state would be saved once,
    from rank 0, as if it were replicated. Otherwise a 0-d tensor. Update it in place through
    :func:`local_tensor`; read whole-tensor totals with :func:`accumulator_totals`.
    """
    device = local_tensor(param).device
    if not is_sharded(param):
        return torch.zeros((), dtype=dtype, device=device)
    from torch.distributed.tensor import DTensor, Shard

    mesh = param.device_mesh
    local = torch.zeros((1,) * mesh.ndim, dtype=dtype, device=device)
    return DTensor.from_local(local, mesh, [Shard(i) for i in range(mesh.ndim)], run_check=False)


def accumulator_totals(params, accumulators) -> list[torch.Tensor]:
    """Per parameter, the whole-tensor value of its :func:`shard_accumulator`: summed over the
    mesh dimensions the parameter is sharded on, taken once over those it is replicated on.

    The same 0-d tensor on every rank. A collective when any parameter is sharded (one small
    all-gather per mesh): call it on every rank with the same parameters in the same order.
    """
    totals = list(accumulators)
    groups: dict = {}
    for i, accumulator in enumerate(accumulators):
        if is_dtensor(accumulator):
            groups.setdefault((id(accumulator.device_mesh), accumulator.dtype), []).append(i)
    if not groups:
        return totals
    from torch.distributed.tensor import DTensor, Shard

    for index in groups.values():
        mesh = accumulators[index[0]].device_mesh
        local = torch.stack([local_tensor(accumulators[i]) for i in index], dim=-1)
        placements = [Shard(i) for i in range(mesh.ndim)]
        gathered = DTensor.from_local(local, mesh, placements, run_check=False).full_tensor()
        for k, i in enumerate(index):
            values = gathered[..., k]  # [*mesh.shape]: every rank's own value
            for dim in reversed(range(mesh.ndim)):
                sharded = params[i].placements[dim].is_shard()
                values = values.sum(dim) if sharded else values.select(dim, 0)
            totals[i] = values
    return totals
