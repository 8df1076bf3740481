"""Collects every benchmark's median and prints the table and the target checks at the end."""

from __future__ import annotations

import os

import pytest

# The benchmarks time the real kernels: never Triton's interpreter (tests/conftest.py sets it
# for the tests, which run in another session).
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise pytest.UsageError("unset TRITON_INTERPRET to run the benchmarks")

_MEASUREMENTS: list = []
_COPY_GB_PER_S: list = []


@pytest.fixture
def measurements():
    return _MEASUREMENTS


@pytest.fixture
def copy_bandwidth():
    return _COPY_GB_PER_S


def pytest_terminal_summary(terminalreporter):
    if not _MEASUREMENTS:
        return
    from .report import cpu_targets, format_table, format_targets, gpu_targets

    copy = _COPY_GB_PER_S[-1] if _COPY_GB_PER_S else None
    write = terminalreporter.write_line
    write("")
    import torch

    write(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    if copy:
        write(f"copy bandwidth measured in this run: {copy:.1f} GB/s")
    # On CPU, torch's copy_ is no ceiling (fused Adam moves bytes faster than it), so the
    # "% of copy bandwidth" column is only printed for GPUs, where the target is defined by it.
    on_gpu = any(m.backend == "triton" for m in _MEASUREMENTS)
    write(format_table(_MEASUREMENTS, copy if on_gpu else None))
    checks = cpu_targets(_MEASUREMENTS)
    if copy and on_gpu:
        checks += gpu_targets(_MEASUREMENTS, copy)
    if checks:
        write("")
        write(format_targets(checks))
