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
    cases.append(Case("PhysicsSGD", "for-loop", "fsdp"))
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
    """Per rank, what tests/_dist_training.run_worker saved, from one spawn of two gloo ranks."""
    out_dir = tmp_path_factory.mktemp("distributed")
    init_file = str(out_dir / "store")
    mp.spawn(
        _dist_training.run_worker,
        args=(init_file, CASES, str(out_dir)),
        nprocs=_dist_training.WORLD_SIZE,
        join=True,
    )
    return [
        torch.load(out_dir / f"rank{rank}.pt", weights_only=False)
        for rank in range(_dist_training.WORLD_SIZE)
    ]


@pytest.fixture(scope="module")
def training_results(distributed_results):
    """{case name: [rank 0 RunResult, rank 1 RunResult]}."""
    return {
        case.name: [results["training"][case.name] for results in distributed_results]
        for case in CASES
    }


_single_cache: dict = {}


def _single_process(case):
    """The same training in this process on the full batches (cached per optimizer/backend).

    The kernel backends are compared with the "torch" backend's single-process run: they are
    tested against it elsewhere, and the interpreter / a compile here would double their cost.
    """
    backend = "torch" if case.backend in ("triton", "compiled") else case.backend
    key = (case.optimizer, backend)
    if key not in _single_cache:
        _single_cache[key] = _dist_training.train(Case(case.optimizer, backend, "single"))
    return _single_cache[key]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_parameters_equal_single_process_full_batch(training_results, case):
    expected = _single_process(case).params
    rank0, rank1 = training_results[case.name]
    assert rank0.params.keys() == expected.keys()
    for name, value in expected.items():
        # Training moved the parameter, so agreement is not just the shared initialisation.
        assert _relative_error(_dist_training.make_model().state_dict()[name], value) > 1e-3
        assert _relative_error(rank0.params[name], value) < RELATIVE_TOLERANCE, name
        # Both ranks hold the same model (DDP replicas; FSDP2 shards gathered for comparison).
        assert torch.equal(rank0.params[name], rank1.params[name]), name


FSDP_CASES = [case for case in CASES if case.wrapper == "fsdp"]


@pytest.mark.parametrize("case", FSDP_CASES, ids=lambda case: case.name)
def test_fsdp_step_runs_on_local_shards(training_results, case):
    model = _dist_training.make_model()
    for rank, result in enumerate(training_results[case.name]):
        # Not one collective in 20 optimizer steps: no full parameter was gathered. (Not
        # counted for "compiled": torch.compile does not run under the counting dispatch mode;
        # it is handed the same local tensors as every other backend.)
        assert result.step_collectives == (None if case.backend == "compiled" else 0)
        assert result.sharded_state is True
        # FSDP2 shards dim 0 like torch.chunk: 5 rows -> 3 + 2; 1 row -> 1 + 0 (empty shard).
        assert result.local_numel["0.weight"] == (3 if rank == 0 else 2) * 6
        assert result.local_numel["4.bias"] == (1 if rank == 0 else 0)
        assert sum(result.local_numel.values()) < sum(p.numel() for p in model.parameters())


IKFAD_CASES = [case for case in CASES if case.optimizer == "iKFAD"]


@pytest.mark.parametrize("case", IKFAD_CASES, ids=lambda case: case.name)
def test_friction_summary_same_on_every_rank_and_unsharded(training_results, case):
    expected = _single_process(case).friction
    rank0, rank1 = training_results[case.name]
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


# -- diagnostics on a loader sharded by DistributedSampler ---------------------------------------

_dist_diagnostics = pytest.importorskip("_dist_diagnostics")


@pytest.fixture(scope="module")
def sharded_diagnostics(distributed_results):
    """{run name: [rank 0 result, rank 1 result]} of tests/_dist_diagnostics.run_sharded."""
    return {
        name: [results["diagnostics"][name] for results in distributed_results]
        for name, _, _ in _dist_diagnostics.SHARDED_RUNS
    }


_whole_cache: dict = {}


def _whole_data(size: int) -> dict:
    if size not in _whole_cache:
        _whole_cache[size] = _dist_diagnostics.run_pipeline(_dist_diagnostics.whole_loader(size))
    return _whole_cache[size]


def _approx_dict(values: dict) -> dict:
    return {key: pytest.approx(value, rel=RELATIVE_TOLERANCE) for key, value in values.items()}


EVEN_RUNS = ["even", "even-shuffled"]  # the dataset size divides by the number of ranks


@pytest.mark.parametrize("run", EVEN_RUNS)
def test_localize_on_two_ranks_equals_one_rank(sharded_diagnostics, run):
    expected = _whole_data(_dist_diagnostics.EVEN_SIZE)["localization"]
    rank0, rank1 = (result["localization"] for result in sharded_diagnostics[run])
    assert rank0 == rank1  # every rank gets the same answer, bit for bit
    assert expected["num_errors"] > 0 and expected["problem_layers"]
    for key in ("num_examples", "num_errors", "error_indices", "error_labels",
                "error_predictions", "index_kind", "problem_layers", "ranking", "group_sizes"):
        assert rank0[key] == expected[key], key
    assert expected["index_kind"] == "dataset"
    # Summed gradients are all-reduced before the norm: equal up to summation order.
    assert rank0["norms"] == _approx_dict(expected["norms"])
    assert rank0["grad_norms"] == _approx_dict(expected["grad_norms"])
    # Not compared: specificity, intervals, p-values and correct_sample_size. They come from
    # cells cut within each rank's batches, so they depend on how batches are cut, which
    # sharding changes (as a different batch size would in one process).
    assert rank0["num_cells"] > 0 and set(rank0["p_values"]) == set(expected["p_values"])


@pytest.mark.parametrize("run", EVEN_RUNS)
def test_diagnose_on_two_ranks_equals_one_rank(sharded_diagnostics, run):
    expected = _whole_data(_dist_diagnostics.EVEN_SIZE)["diagnosis"]
    rank0, rank1 = (result["diagnosis"] for result in sharded_diagnostics[run])
    assert rank0 == rank1
    assert len(expected["pairs"]) >= 2
    assert rank0["num_errors"] == expected["num_errors"]
    for got, pair in zip(rank0["pairs"], expected["pairs"], strict=True):
        for key in ("true", "predicted", "count"):
            assert got[key] == pair[key], key
        assert got["grad_norms"] == _approx_dict(pair["grad_norms"])
        # attributed_layer is not compared: it comes from cells, which depend on batching


# "odd": 25 examples on 2 ranks. DistributedSampler pads rank 1's shard by repeating index 0;
# the diagnostics recognise the repeat (from the sampler) and skip it, so it counts once.
ALL_RUNS = [("even", _dist_diagnostics.EVEN_SIZE), ("even-shuffled", _dist_diagnostics.EVEN_SIZE),
            ("odd", _dist_diagnostics.ODD_SIZE)]  # fmt: skip


@pytest.mark.parametrize(("run", "size"), ALL_RUNS)
def test_verify_on_two_ranks_equals_one_rank(sharded_diagnostics, run, size):
    expected = _whole_data(size)["verification"]
    rank0, rank1 = (result["verification"] for result in sharded_diagnostics[run])
    assert rank0 == rank1
    assert expected["fixed"] + expected["new"] > 0
    assert expected["num_examples"] == size
    # Everything, indices included: predict returns rows in dataset order.
    assert rank0 == expected


@pytest.mark.parametrize(("run", "size"), ALL_RUNS)
def test_localize_and_diagnose_counts_each_example_once(sharded_diagnostics, run, size):
    expected = _whole_data(size)
    got = sharded_diagnostics[run][0]
    localization = got["localization"]
    assert localization["num_examples"] == expected["localization"]["num_examples"] == size
    for key in ("num_errors", "error_indices", "error_labels", "error_predictions"):
        assert localization[key] == expected["localization"][key], key
    assert len(set(localization["error_indices"])) == len(localization["error_indices"])
    assert localization["grad_norms"] == _approx_dict(expected["localization"]["grad_norms"])
    counts = [pair["count"] for pair in got["diagnosis"]["pairs"]]
    assert counts == [pair["count"] for pair in expected["diagnosis"]["pairs"]]
