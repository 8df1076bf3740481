"""Time one optimizer step per case (pytest-benchmark); the table prints at the end.

Run: ``.venv/bin/python -m pytest benchmarks/bench_step.py -q`` (see benchmarks/README.md).
Environment: ``DAMPOPT_BENCH_DEVICE`` (default cuda when available, else cpu),
``DAMPOPT_BENCH_SETS`` (comma-separated subset of 1M, ResNet-18, 64M) and
``DAMPOPT_BENCH_THREADS`` (CPU threads; default torch's, one per core).
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

from .cases import PARAMETER_SETS, bytes_moved, cases, make_parameters, numel
from .report import Measurement


def bench_device() -> torch.device:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(os.environ.get("DAMPOPT_BENCH_DEVICE", default))


def bench_sets() -> list[str]:
    names = os.environ.get("DAMPOPT_BENCH_SETS", ",".join(PARAMETER_SETS)).split(",")
    return [n for n in names if n]


DEVICE = bench_device()
if os.environ.get("DAMPOPT_BENCH_THREADS"):
    # On a shared 2-core machine one thread gives steadier medians: a 2-thread kernel stalls
    # whenever another process holds the second core.
    torch.set_num_threads(int(os.environ["DAMPOPT_BENCH_THREADS"]))
# CPU steps take 1-500 ms: fewer rounds for bigger sets. A GPU step is shorter than the
# launch and sync overhead, so a GPU round is STEPS_PER_ROUND steps and one synchronize.
ROUNDS = {"1M": 15, "ResNet-18": 9, "64M": 5} if DEVICE.type == "cpu" else {
    "1M": 15, "ResNet-18": 15, "64M": 15}
STEPS_PER_ROUND = 1 if DEVICE.type == "cpu" else 20


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


PARAMS = [(s, case) for s in bench_sets() for case in cases(DEVICE, s)]


@pytest.mark.parametrize("parameter_set,case", PARAMS,
                         ids=[f"{s}-{c.label}" for s, c in PARAMS])
def test_step(benchmark, parameter_set, case, measurements):
    gc.collect()  # the previous case's 64M-parameter optimizer must be gone before timing
    params = make_parameters(parameter_set, DEVICE)
    optimizer = case.build(params)
    synchronize()
    start = time.perf_counter()
    optimizer.step()  # creates state; for backend="compiled" this is when compiling happens
    synchronize()
    first_step = time.perf_counter() - start

    def steps():
        for _ in range(STEPS_PER_ROUND):
            optimizer.step()
        synchronize()

    benchmark.group = parameter_set
    benchmark.pedantic(steps, rounds=ROUNDS[parameter_set], warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median / STEPS_PER_ROUND
    measurements.append(Measurement(parameter_set, case.label, case.rule, case.backend, median,
                                    bytes_moved(case, parameter_set), first_step))
    assert all(torch.isfinite(p).all() for p in params)  # a diverged run times nothing useful


def test_copy_bandwidth(benchmark, copy_bandwidth):
    """The device's copy bandwidth on the largest set: read + write of one fp32 array."""
    n = max(numel(s) for s in bench_sets())
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)

    def copies():
        for _ in range(STEPS_PER_ROUND):
            dst.copy_(src)
        synchronize()

    benchmark.group = "copy"
    benchmark.pedantic(copies, rounds=15, warmup_rounds=2, iterations=1)
    median = benchmark.stats.stats.median / STEPS_PER_ROUND
    copy_bandwidth.append(2 * 4 * n / median / 1e9)
    assert torch.equal(dst, src)
