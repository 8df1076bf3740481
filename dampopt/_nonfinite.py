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
    """Apply each group's mode to its gradients; True when the step is to be skipped."""
    checked = [(i, j, p) for i, group in enumerate(optimizer.param_groups)
               if group.get("nonfinite") is not None
               for j, p in enumerate(group["params"]) if p.grad is not None]  # fmt: skip
    if not checked:
        return False
    finite = torch.stack([torch.isfinite(local_tensor(p.grad)).all().cpu() for _, _, p in checked])
    if is_distributed():  # every rank decides alike, also when only one shard holds the NaN
        bad = all_reduce_sum_((~finite).double().to(_device(checked)))
        finite = (bad == 0).cpu()
    if bool(finite.all()):
        return False
    i, j, p = checked[int((~finite).nonzero()[0])]
    if any(optimizer.param_groups[g]["nonfinite"] == "raise" for g, _, _ in
           (checked[k] for k in (~finite).nonzero().flatten().tolist())):  # fmt: skip
        raise ValueError(
            f"non-finite gradient in param_groups[{i}]['params'][{j}] (shape "
            f"{tuple(p.shape)}); nothing was updated (nonfinite='raise')"
        )
    for group in optimizer.param_groups:
        group["nonfinite_skips"] = group.get("nonfinite_skips", 0) + 1
    return True


def _device(checked):
    return local_tensor(checked[0][2].grad).device
