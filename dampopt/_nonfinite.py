"""``nonfinite=``: what an optimizer does with a NaN or inf gradient (all four optimizers).

None (the default) is torch's behaviour: the update runs and the NaN spreads into the
parameters and the state. ``"raise"``: a ValueError naming the parameter, before anything
changes. ``"skip"``: the whole step is skipped, like GradScaler's skipped steps, and counted in
every group's ``"nonfinite_skips"`` (a key that appears with the first skip). Checking costs
one pass over the gradients and one device synchronization per step, so it is opt-in.
"""

from __future__ import annotations

import torch

from ._distributed import all_reduce_sum_, is_distributed, local_tensor

MODES = (None, "raise", "skip")


def check_mode(value):
    if value not in MODES:
        raise ValueError(f"nonfinite must be None, 'raise' or 'skip', got {value!r}")
    return value


def handle(optimizer) -> bool:
    """Apply each group's mode to its gradients; True when the step is to be skipped.

    Under torch.distributed every rank reduces one count, whatever parameters it holds (also
    none), so that all ranks raise or skip together.
    """
    modes = {group.get("nonfinite") for group in optimizer.param_groups} - {None}
    if not modes:
        return False
    checked = [(i, j, p) for i, group in enumerate(optimizer.param_groups)
               if group.get("nonfinite") is not None
               for j, p in enumerate(group["params"]) if p.grad is not None]  # fmt: skip
    by_device = {}
    for k, (_, _, p) in enumerate(checked):
        grad = local_tensor(p.grad)
        by_device.setdefault(grad.device, []).append((k, torch.isfinite(grad).all()))
    finite = torch.ones(len(checked), dtype=torch.bool)
    for entries in by_device.values():  # one synchronization per device
        flags = torch.stack([flag for _, flag in entries]).cpu()
        for (k, _), flag in zip(entries, flags):
            finite[k] = flag
    bad = int((~finite).sum())
    if is_distributed():
        device = next(iter(by_device), None) or _default_device()
        bad = int(all_reduce_sum_(torch.tensor([float(bad)], device=device))[0])
    if bad == 0:
        return False
    if "raise" in modes:
        if (~finite).any():
            i, j, p = checked[int((~finite).nonzero()[0])]
            where = f"param_groups[{i}]['params'][{j}] (shape {tuple(p.shape)})"
        else:
            where = "a parameter held by another rank"
        raise ValueError(
            f"non-finite gradient in {where}; nothing was updated (nonfinite='raise')"
        )
    for group in optimizer.param_groups:
        group["nonfinite_skips"] = group.get("nonfinite_skips", 0) + 1
    return True


def _default_device():
    import torch.distributed as dist

    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
