"""dampopt under torch.distributed: DDP and FSDP2 on CPU with gloo, two spawned ranks.

Every optimizer trained for 20 steps under DDP and under FSDP2 (each rank sees half of every
batch) must end with the parameters of a single-process run on the full batches, to 1e-6
relative; under FSDP2 the optimizer step must run on the local shards without a single
collective, and iKFAD's friction summary must be the same on both ranks and equal the
unsharded one. The training runs in one spawn (tests/_dist_training.py); the tests compare.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

_dist_training = pytest.importorskip("_dist_training")
Case = _dist_training.Case

FRICTION_OPTIMIZERS = ("iKFAD", "CubicDampedSGD", "CADAM")
RELATIVE_TOLERANCE = 1e-6


def _triton_backend_landed() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import dampopt.kernels

    return hasattr(dampopt.kernels, "launch")


def _compiled_backend_landed() -> bool:
    return importlib.util.find_spec("dampopt._compiled") is not None


def _cases() -> list:
    cases = [Case("PhysicsSGD", None, wrapper) for wrapper in ("ddp", "fsdp")]
    for optimizer in FRICTION_OPTIMIZERS:
        for backend in ("torch", "loop"):
            cases += [Case(optimizer, backend, wrapper) for wrapper in ("ddp", "fsdp")]
    # The kernels see plain local tensors either way; FSDP2 is the case that needs running.
    # The interpreter and torch.compile are slow on CPU, so these stay few.
    if _triton_backend_landed():
        cases += [Case(optimizer, "triton", "fsdp") for optimizer in FRICTION_OPTIMIZERS]
    if _compiled_backend_landed():
        cases.append(Case("iKFAD", "compiled", "fsdp"))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """{case name: [rank 0 result, rank 1 result]} from one spawn of two gloo ranks."""
    out_dir = tmp_path_factory.mktemp("distributed")
    init_file = str(out_dir / "store")
    mp.spawn(
        _dist_training.run_training_cases,
        args=(init_file, CASES, str(out_dir)),
        nprocs=_dist_training.WORLD_SIZE,
        join=True,
    )
    per_rank = [
        torch.load(out_dir / f"training-rank{rank}.pt", weights_only=False)
        for rank in range(_dist_training.WORLD_SIZE)
    ]
    return {case.name: [results[case.name] for results in per_rank] for case in CASES}


_single_cache: dict = {}


def _single_process(case):
    """The same training in this process on the full batches (cached per optimizer/backend)."""
    key = (case.optimizer, case.backend)
    if key not in _single_cache:
        _single_cache[key] = _dist_training.train(Case(case.optimizer, case.backend, "single"))
    return _single_cache[key]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_parameters_equal_single_process_full_batch(distributed_results, case):
    expected = _single_process(case).params
    rank0, rank1 = distributed_results[case.name]
    assert rank0.params.keys() == expected.keys()
    for name, value in expected.items():
        # Training moved the parameter, so agreement is not just the shared initialisation.
        assert _relative_error(_dist_training.make_model().state_dict()[name], value) > 1e-3
        assert _relative_error(rank0.params[name], value) < RELATIVE_TOLERANCE, name
        # Both ranks hold the same model (DDP replicas; FSDP2 shards gathered for comparison).
        assert torch.equal(rank0.params[name], rank1.params[name]), name


FSDP_CASES = [case for case in CASES if case.wrapper == "fsdp"]


@pytest.mark.parametrize("case", FSDP_CASES, ids=lambda case: case.name)
def test_fsdp_step_runs_on_local_shards(distributed_results, case):
    model = _dist_training.make_model()
    for rank, result in enumerate(distributed_results[case.name]):
        # Not one collective in 20 optimizer steps: no full parameter was gathered.
        assert result.step_collectives == 0
        assert result.sharded_state is True
        # FSDP2 shards dim 0 like torch.chunk: 5 rows -> 3 + 2; 1 row -> 1 + 0 (empty shard).
        assert result.local_numel["0.weight"] == (3 if rank == 0 else 2) * 6
        assert result.local_numel["4.bias"] == (1 if rank == 0 else 0)
        assert sum(result.local_numel.values()) < sum(p.numel() for p in model.parameters())


IKFAD_CASES = [case for case in CASES if case.optimizer == "iKFAD"]


@pytest.mark.parametrize("case", IKFAD_CASES, ids=lambda case: case.name)
def test_friction_summary_same_on_every_rank_and_unsharded(distributed_results, case):
    expected = _single_process(case).friction
    rank0, rank1 = distributed_results[case.name]
    # The reduction hands every rank the same bits.
    assert rank0.friction == rank1.friction
    assert rank0.friction.keys() == expected.keys()
    for name, stats in expected.items():
        got = rank0.friction[name]
        assert got["numel"] == stats["numel"]  # the global size, not the shard's
        assert got["steps"] == stats["steps"] == _dist_training.STEPS
        assert stats["mean"] > 0
        for field in ("mean", "accumulated"):
            assert got[field] == pytest.approx(stats[field], rel=RELATIVE_TOLERANCE), (name, field)
