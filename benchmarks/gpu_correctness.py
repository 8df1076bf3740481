"""Each Triton kernel against its torch reference on a GPU: fp32 and bf16 (and fp16) params.

Run by ``benchmarks/gpu_check.sh``. Prints one line per (kernel, dtype) with the largest
error relative to the tensor's scale, and exits 1 if any exceeds its bound. With
``DAMPOPT_CHECK_DEVICE=cpu TRITON_INTERPRET=1`` it runs the same checks in Triton's
interpreter (a dry run of this script on a machine without a GPU).
"""

from __future__ import annotations

import os
import sys

import torch

from dampopt import kernels
from dampopt.testing import FRICTION_CASES

# the project's one table of configurations (dampopt/testing.py), as the CPU tests use it
RULES = {name: case.rule for name, case in FRICTION_CASES.items()}
# fp32 arrays within 1e-6 of each tensor's largest value; low-precision params also within
# twice their dtype's epsilon relative to the value: over three steps, a rounding that went the
# other way in one step (one unit in the last place) carries into the next
BOUND = {torch.float32: 1e-6, torch.bfloat16: 2 * 2**-7, torch.float16: 2 * 2**-10}


def sizes(device):
    count = 200 if device.type == "cuda" else 20  # the interpreter's dry run stays short
    small = torch.randint(1, 3000, (count,), generator=torch.Generator().manual_seed(1)).tolist()
    big = [0, 1, 1024, 1025, 3 * 1024 + 7] + ([1 << 22, (1 << 20) + 3]
                                              if device.type == "cuda" else [])
    return big + small


def worst_error(actual, expected, dtype):
    """max |a - e| / (|e| * bound_rel + scale * 1e-6), so <= 1 means within bounds."""
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().double()
    allowed = expected.double().abs() * BOUND[dtype] + 1e-6 * scale
    return ((actual.double() - expected.double()).abs() / allowed.clamp_min(1e-30)).max().item()


def check(name, dtype, device) -> float:
    rule = RULES[name]
    n_states, hyper = len(rule.state_names), FRICTION_CASES[name].hyperparameters
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = sizes(device)
    params = [torch.randn(n, device=device, generator=generator).to(dtype) for n in shapes]
    grads = [torch.randn(n, device=device, generator=generator).to(dtype) for n in shapes]
    states = [[0.3 * torch.rand(n, device=device, generator=generator) for n in shapes]
              for _ in range(n_states)]
    ref_params = [p.clone() for p in params]
    ref_states = [[s.clone() for s in state] for state in states]
    worst = 0.0
    for step, lr in enumerate((0.01, 0.02, 0.015)):
        kwargs = dict(lr=lr, weight_decay=0.01 * step, **hyper)
        scalars, flags = rule.scalars(**kwargs), dict(HAS_WEIGHT_DECAY=bool(step))
        sums = kernels.launch(name, params, grads, states, scalars, flags)
        for i, (p, g) in enumerate(zip(ref_params, grads)):  # the rule's single-tensor step
            rule.step(p, g, *[s[i] for s in ref_states], scalars, bool(step))
        ref_sums = rule.sums(ref_states)
        if ref_sums is not None:
            got, want = torch.stack(sums).double(), torch.stack(ref_sums).double()
            worst = max(worst, ((got - want).abs() / (1e-6 * want.abs()).clamp_min(1e-30))
                        .max().item())
    for p, ref in zip(params, ref_params):
        worst = max(worst, worst_error(p, ref, dtype))
    for state, ref_state in zip(states, ref_states):
        for s, ref in zip(state, ref_state):
            worst = max(worst, worst_error(s, ref, torch.float32))
    return worst


def main() -> int:
    device = torch.device(os.environ.get("DAMPOPT_CHECK_DEVICE", "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing checked", file=sys.stderr)
        return 2
    failures = 0
    for name in RULES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            worst = check(name, dtype, device)
            ok = worst <= 1.0
            failures += not ok
            print(f"{name:13s} {str(dtype):15s} worst error / bound = {worst:.3f}  "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
