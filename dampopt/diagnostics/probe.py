"""``localize(criterion="probe")``: each group's measured repair gain at a small, fixed budget.

For each group alone, on a copy of the model: ``steps`` steps of PhysicsSGD at a constant lr
on the training loader, every group with the same batches (the same seed); then the loss of
every failure and reference example of the localize pass, before and after. The drop on the
failures is "what retraining this group buys"; the rise on the references is its side effect.
For the test, each example's drop is centred on its mean over groups (so a group is not
credited for what training any group does), and per cell the references' mean is subtracted
from the failures': ``d[cell, group]``, which exchanging a cell's two sets negates.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._distributed import is_distributed
from .._validation import check_int, check_learning_rate
from ..physics_sgd import PhysicsSGD
from . import _data
from ._surgery import Surgery, progress_bar, seeded, synchronize, train_modes, train_step
from .groups import parameter_names


@dataclass
class ProbeOutcome:
    per_group: dict  # {group: {failure_loss_drop, reference_loss_rise, fixed, broken}}
    cost: dict  # {steps_per_group, groups, training_steps, lr, seconds}
    cell_differences: torch.Tensor  # [cells, groups]


def check_probe_arguments(loader, steps, lr) -> None:
    if loader is None:
        raise ValueError(
            "criterion='probe' needs probe_loader= the training loader (the probe trains on it)"
        )
    check_int("probe_steps", steps, 1)
    check_learning_rate(lr, "probe_lr")
    if is_distributed():
        raise ValueError("criterion='probe' runs in one process (each rank would probe its own)")


def _cycle(loader):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("probe_loader yielded no batch: nothing to probe with")


@torch.no_grad()
def _losses(model, examples, device):
    """Per example of ``examples``: (cross-entropy, correctly classified), concatenated."""
    losses, right = [], []
    with _data.evaluation(model, []):
        for _, _, inputs, labels in examples:
            logits = _data.logits_of(model, _data.to_device(inputs, device)).float()
            labels = labels.to(device)
            losses.append(F.cross_entropy(logits, labels, reduction="none").double().cpu())
            right.append((logits.argmax(dim=1) == labels).cpu())
    return torch.cat(losses), torch.cat(right)


def probe_groups(model, groups, found, loader, *, steps, lr, seed, device, progress):
    """Train each group alone for ``steps`` steps on a copy; losses before and after."""
    device = _data.model_device(model, device)
    names = list(groups)
    examples = found.examples
    cost = {"steps_per_group": steps, "groups": len(names), "training_steps": steps * len(names),
            "lr": lr, "seconds": 0.0}  # fmt: skip
    if not examples:
        zero = {"failure_loss_drop": 0.0, "reference_loss_rise": 0.0, "fixed": 0, "broken": 0}
        return ProbeOutcome({name: dict(zero) for name in names}, cost,
                            torch.zeros(0, len(names), dtype=torch.float64))  # fmt: skip
    kind = torch.cat([torch.full((len(e[3]),), e[0] == "failure") for e in examples])
    cell = torch.cat([torch.full((len(e[3]),), e[1]) for e in examples])
    parameter_name = parameter_names(model)
    before, right_before = _losses(model, examples, device)

    drops, right_after = [], []
    synchronize(device)
    start = time.perf_counter()
    for name in progress_bar(names, progress, "probe", total=len(names)):
        trial = copy.deepcopy(model)
        chosen = {parameter_name[id(p)] for p in groups[name]}
        masks = {n: None for n, _ in model.named_parameters() if n in chosen}
        surgery = Surgery.prepare(trial, masks, 0.0, device)
        opt = PhysicsSGD(surgery.trained(), lr=lr)
        train_modes(trial)
        with seeded(loader, seed, device):
            batches = _cycle(loader)
            for _ in range(steps):
                train_step(trial, next(batches), opt, surgery, device)
        after, right = _losses(trial, examples, device)
        drops.append(before - after)
        right_after.append(right)
        del trial, opt, surgery
    synchronize(device)
    cost["seconds"] = time.perf_counter() - start

    drop = torch.stack(drops, dim=1)  # [examples, groups]
    per_group = {}
    for j, name in enumerate(names):
        per_group[name] = {
            "failure_loss_drop": float(drop[kind, j].mean()),
            "reference_loss_rise": float(-drop[~kind, j].mean()) if (~kind).any() else 0.0,
            "fixed": int((kind & ~right_before & right_after[j]).sum()),
            "broken": int((~kind & right_before & ~right_after[j]).sum()),
        }
    centred = drop - drop.mean(dim=1, keepdim=True)
    cells = sorted({int(c) for c in cell.tolist() if c >= 0})
    differences = torch.stack([
        centred[kind & (cell == c)].mean(dim=0) - centred[~kind & (cell == c)].mean(dim=0)
        for c in cells
    ]) if cells else torch.zeros(0, len(names), dtype=torch.float64)  # fmt: skip
    return ProbeOutcome(per_group, cost, differences)
