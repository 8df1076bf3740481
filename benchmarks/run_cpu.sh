#!/usr/bin/env bash
# The CPU benchmark table of benchmarks/README.md: every case on 1M, ResNet-18 and 64M params.
# Takes about 10 minutes on the 2-core development machine. Extra arguments go to pytest,
# e.g. DAMPOPT_BENCH_SETS=ResNet-18 bash benchmarks/run_cpu.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
unset TRITON_INTERPRET
uptime
DAMPOPT_BENCH_DEVICE=cpu "${PYTHON:-.venv/bin/python}" -m pytest benchmarks/bench_step.py -q \
    -p no:cacheprovider --benchmark-columns=median,rounds --benchmark-sort=name "$@"
uptime
