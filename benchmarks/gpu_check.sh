#!/usr/bin/env bash
# On a CUDA machine: check every Triton kernel against the torch reference (fp32, bf16, fp16),
# then time every case on the GPU and print the table, each ratio, and the % of the copy
# bandwidth measured in the same run. Budget: under 5 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh            # uses python3 (or $PYTHON)
#
# Works without installing dampopt: if `import dampopt.kernels` fails, it builds a shadow
# package in a temporary folder (dampopt/ plus kernels/ as dampopt/kernels, as setup.py maps).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"
unset TRITON_INTERPRET

if ! "$PY" -c "import dampopt.kernels" 2>/dev/null; then
    SHADOW="$(mktemp -d)"
    mkdir "$SHADOW/dampopt"
    for entry in "$ROOT"/dampopt/*; do ln -s "$entry" "$SHADOW/dampopt/"; done
    ln -s "$ROOT/kernels" "$SHADOW/dampopt/kernels"
    export PYTHONPATH="$SHADOW:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"

echo "== correctness: Triton kernels vs torch reference on CUDA"
timeout 120 "$PY" benchmarks/gpu_correctness.py

echo "== speed: one step per case, medians (20 steps per round)"
DAMPOPT_BENCH_DEVICE=cuda timeout 170 "$PY" -m pytest benchmarks/bench_step.py -q \
    -p no:cacheprovider --benchmark-columns=median,rounds --benchmark-sort=name
