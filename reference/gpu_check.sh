#!/usr/bin/env bash
# Measure the paper preset's training throughput on this GPU (target: >= 25,000 images/s on one
# H200 for one ResNet-18 training) and project the time of the whole preset. Two epochs on
# synthetic CIFAR-shaped data (no download needed); under 5 minutes on a recent GPU.
#   reference/gpu_check.sh            # eager
#   reference/gpu_check.sh --compile  # torch.compile (first epoch includes compilation)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PYTHON; nothing measured" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec timeout 300 "$PYTHON" reference/throughput.py --preset paper --device cuda --epochs 2 \
    --synthetic "$@"
