"""Worker side of tests/test_distributed.py: runs in processes spawned by the test.

One spawn of two gloo ranks trains every (optimizer, backend) case under DDP and under FSDP2,
runs the diagnostics of tests/_dist_diagnostics.py, and saves what the parent compares with a
single-process run: final parameters, iKFAD's friction summary, how many collectives the
optimizer steps issued, and the diagnostics' results. Spawning costs seconds, so everything
is batched into one spawn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import dampopt

WORLD_SIZE = 2
STEPS = 20
BATCH = 8  # full batch; each of the two ranks takes a contiguous half
IN_FEATURES = 6

# One row per optimizer: small-ish learning rates so 20 steps stay well conditioned, and
# c / gamma values that make the cubic and linear friction terms matter within 20 steps.
OPTIMIZERS = {
    "PhysicsSGD": (dampopt.PhysicsSGD, dict(lr=0.05)),
    "iKFAD": (dampopt.iKFAD, dict(lr=0.01, gamma=0.4, alpha=0.402, mu=1.87)),
    "CubicDampedSGD": (dampopt.CubicDampedSGD, dict(lr=0.01, gamma=0.17, c=2.0)),
    "CADAM": (dampopt.CADAM, dict(lr=1e-4, gamma=3.55, c=2.0, alpha=0.5)),
}


@dataclass(frozen=True)
class Case:
    """One training run: optimizer, backend (PhysicsSGD: a key of PHYSICS_SGD_PATHS) and the
    parallel wrapper."""

    optimizer: str
    backend: str | None
    wrapper: str  # "ddp" | "fsdp" | "single"

    @property
    def name(self) -> str:
        return f"{self.wrapper}-{self.optimizer}-{self.backend}"


def make_model() -> nn.Module:
    """Same weights on every rank and in the parent. The 1-output head has a 1-row weight and a
    1-element bias, so under FSDP2 rank 1 holds empty shards of them (an edge case worth
    running); the 5-row layer shards unevenly (3 + 2 rows)."""
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)
    )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    inputs = torch.randn(STEPS, BATCH, IN_FEATURES, generator=generator)
    targets = torch.randn(STEPS, BATCH, 1, generator=generator)
    return inputs, targets


#: PhysicsSGD has no ``backend``; its "backends" are torch's sgd paths (None: torch's default,
#: foreach for CPU tensors and DTensors). ``fused=True`` is left out: DTensor has no sharding
#: rule for aten._fused_sgd_ (torch.optim.SGD(fused=True) fails the same way under FSDP2).
PHYSICS_SGD_PATHS = {None: {}, "for-loop": {"foreach": False}}


def make_optimizer(case: Case, params):
    cls, kwargs = OPTIMIZERS[case.optimizer]
    kwargs = dict(kwargs)
    if case.optimizer == "PhysicsSGD":
        kwargs.update(PHYSICS_SGD_PATHS[case.backend])
    elif case.backend is not None:
        kwargs["backend"] = case.backend
    return cls(params, **kwargs)


@dataclass
class RunResult:
    params: dict  # name -> full parameter after STEPS steps (gathered for comparison only)
    friction: dict | None = None  # iKFAD friction summary as {name: FrictionStats.to_dict()}
    step_collectives: int | None = 0  # collectives inside optimizer.step(), all steps (None:
    # not counted)
    sharded_state: bool | None = None  # FSDP2: optimizer state is DTensor like its param
    local_numel: dict = field(default_factory=dict)  # FSDP2: name -> this rank's shard size
    resumed_friction: dict | None = None  # friction summary after a checkpoint round trip


def train(case: Case, rank: int = 0, world_size: int = 1, checkpoint_dir=None) -> RunResult:
    """Train ``make_model`` for STEPS full-batch steps; ranks see their half of each batch.

    FSDP2 iKFAD with the torch backend also round-trips its optimizer state through
    torch.distributed.checkpoint in ``checkpoint_dir``.
    """
    model = make_model()
    if case.wrapper == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif case.wrapper == "fsdp":
        _fully_shard(model)
    optimizer = make_optimizer(case, model.parameters())
    inputs, targets = make_data()
    share = BATCH // world_size
    rows = slice(rank * share, (rank + 1) * share)
    collectives = 0
    for step in range(STEPS):
        loss = nn.functional.mse_loss(model(inputs[step, rows]), targets[step, rows])
        loss.backward()
        if case.backend == "compiled":
            # CommDebugMode is a dispatch mode, under which torch.compile refuses to run.
            optimizer.step()
            collectives = None
        else:
            collectives += _count_collectives(optimizer.step)
        optimizer.zero_grad()
    named = list(_unwrap(model).named_parameters())
    result = RunResult(params={n: _full(p).clone() for n, p in named}, step_collectives=collectives)
    if isinstance(optimizer, dampopt.iKFAD):
        summary = optimizer.friction_summary(named)
        result.friction = {name: stats.to_dict() for name, stats in summary.items()}
    if case.wrapper == "fsdp":
        result.local_numel = {n: p.to_local().numel() for n, p in named}
        result.sharded_state = _state_sharded_like_params(optimizer, named)
        if case.optimizer == "iKFAD" and case.backend == "torch" and checkpoint_dir:
            resumed = _resume_from_checkpoint(model, optimizer, checkpoint_dir)
            summary = resumed.friction_summary(named)
            result.resumed_friction = {name: stats.to_dict() for name, stats in summary.items()}
    return result


def _fully_shard(model: nn.Module) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _count_collectives(step) -> int:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        step()
    return comm.get_total_counts()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def _state_sharded_like_params(optimizer, named) -> bool:
    """Each per-element state tensor is a DTensor with its param's shape and placements, so
    distributed checkpointing saves it sharded."""
    from torch.distributed.tensor import DTensor

    for _, param in named:
        state = optimizer.state[param]
        for name in getattr(optimizer, "state_names", ("momentum_buffer",)):
            value = state[name]
            if not isinstance(value, DTensor) or value.placements != param.placements:
                return False
            if value.shape != param.shape:
                return False
    return True


def _resume_from_checkpoint(model, optimizer, directory: str):
    """Save the optimizer with torch.distributed.checkpoint, load it into a fresh one and
    return that one: what a resumed FSDP2 run would train with."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=directory)
    fresh = type(optimizer)(model.parameters(), **optimizer.defaults)
    state = get_optimizer_state_dict(model, fresh)
    dcp.load(state, checkpoint_id=directory)
    set_optimizer_state_dict(model, fresh, state)
    return fresh


# -- process entry points ----------------------------------------------------------------------


def init_process(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)  # two ranks share CI's two cores
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )


def run_worker(rank: int, init_file: str, cases: list[Case], out_dir: str) -> None:
    """Spawn target: train every case on this rank, then run the sharded diagnostics; saves
    ``{"training": {case.name: RunResult}, "diagnostics": {...}}`` per rank."""
    import _dist_diagnostics

    init_process(rank, init_file)
    try:
        results = {
            "training": {
                case.name: train(case, rank, WORLD_SIZE, os.path.join(out_dir, "checkpoint"))
                for case in cases
            },
            "diagnostics": _dist_diagnostics.run_sharded(rank, WORLD_SIZE),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
