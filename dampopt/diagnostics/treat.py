"""Step 4, Treat: retrain only the problem layers (or parameters) of a copy of the model.

The paper's protocol (Sec. 5.5, Table 16): freeze everything except the flagged groups, retrain
30 epochs with physics momentum, the lr annealed by a cosine from 0.01 down to lr/100. Here the
cosine runs over optimizer steps and ends exactly at ``lr_min`` on the last step, so a one- or
two-epoch treatment anneals too; over 30 epochs each epoch starts where the paper's per-epoch
schedule puts it (epoch 30 at 1.3e-4, Table 16). Methods C/D train only the top 30% / 15% of
individual parameters by iKFAD friction: :func:`friction_mask`. :func:`treat_controls` (in
:mod:`.controls`) trains control choices of layers at the same budget.

Guarantees: the input model is never modified (a deep copy is trained); parameters that are
not trained, and the untrained elements of a masked parameter, are bit-identical in the copy,
and modules none of whose own parameters train run in eval mode, so their buffers (BatchNorm
running statistics) are left as they were too.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from .._distributed import all_reduce_sum_
from .._validation import check_int, check_learning_rate, check_non_negative, check_seed
from . import _data
from ._report import Report, markdown_table
from ._surgery import (
    OPTIMIZERS,
    Surgery,
    build_optimizer,
    check_optimizer,
    momentum_of,
    progress_bar,
    seeded,
    set_epoch,
    step_cosine,
    synchronize,
    train_modes,
    train_step,
)
from ._task import Task
from .groups import parameter_names, resolve_groups
from .localize import Localization
from .lora import flagged_parameters, lora_targets, require_peft, wrap_with_lora

__all__ = ["OPTIMIZERS", "TreatReport", "friction_mask", "treat"]


def friction_mask(optimizer, fraction: float = 0.15) -> dict:
    """``{parameter: bool tensor}``: the top ``fraction`` of elements by iKFAD friction xi.

    The ranking is across all parameters of ``optimizer`` together (the paper's Methods C/D:
    fraction 0.30 / 0.15); exactly ``round(fraction * total elements)`` (at least 1) elements are
    True. Keys are the optimizer's parameter tensors; :func:`treat` maps them onto its copy.
    """
    if not callable(getattr(optimizer, "friction", None)):
        raise TypeError(
            "optimizer must be an iKFAD optimizer (one with friction()), got "
            f"{type(optimizer).__name__}"
        )
    fraction = check_non_negative("fraction", fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    params = list({id(p): p for g in optimizer.param_groups for p in g["params"]}.values())
    if not any(optimizer.state.get(p) for p in params):
        raise ValueError("optimizer has not taken a step: its friction is all zeros")
    device = params[0].device
    flat = torch.cat([optimizer.friction(p).detach().flatten().float().to(device) for p in params])
    keep = max(1, round(fraction * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    chosen[torch.topk(flat, keep).indices] = True
    masks, start = {}, 0
    for p in params:
        masks[p] = chosen[start : start + p.numel()].view_as(p).to(p.device)
        start += p.numel()
    return masks


@dataclass
class TreatReport(Report):
    """What :func:`treat` trained, for how long, and how (``wall_time_s`` measured, seconds)."""

    layers: list  # groups trained ([] when only a mask was given)
    masked: bool
    trainable_tensors: int
    total_tensors: int
    tensor_fraction: float
    trainable_elements: int
    total_elements: int
    element_fraction: float
    epochs: int
    steps: int
    optimizer: str
    lr_schedule: list  # lr of each epoch's first step
    momentum_schedule: list  # momentum (or Adam's beta1) of each epoch's first step
    final_lr: float  # lr of the last step (== lr_min)
    epoch_losses: list  # mean cross-entropy of each epoch (without the EWC term)
    ewc: float
    weight_decay: float
    seed: int | None  # torch seed the treatment ran under (batch order), None: not seeded
    wall_time_s: float
    adapter: str | None = None  # "lora": adapters trained, the base weights frozen
    rank: int | None = None  # LoRA rank r
    lora_alpha: float | None = None  # LoRA scale numerator (update = alpha / r * B A)
    targets: list | None = None  # adapted module names (lora_targets)
    merged: bool = False  # the returned model has the adapters merged into its weights
    trainable_parameters: int = 0  # parameter elements the optimizer updated

    def to_markdown(self) -> str:
        summary = markdown_table(
            ["Metric", "Value"],
            [
                ("layers", ", ".join(self.layers) or "—"),
                ("per-parameter mask", self.masked),
                ("trainable tensors", f"{self.trainable_tensors}/{self.total_tensors}"),
                ("tensor fraction", self.tensor_fraction),
                ("trainable elements", f"{self.trainable_elements}/{self.total_elements}"),
                ("element fraction", self.element_fraction),
                (
                    "adapter",
                    "—"
                    if self.adapter is None
                    else f"{self.adapter} (r={self.rank}, alpha={self.lora_alpha:g}, "
                    f"{len(self.targets)} modules{', merged' if self.merged else ''})",
                ),
                ("trainable parameters", self.trainable_parameters),
                ("optimizer", self.optimizer),
                ("epochs", self.epochs),
                ("steps", self.steps),
                ("lr, first and last step", f"{self.lr_schedule[0]:.4g} -> {self.final_lr:.4g}"),
                ("EWC strength", self.ewc),
                ("seed", self.seed),
                ("wall time (s, measured)", self.wall_time_s),
            ],
        )
        log = markdown_table(
            ["Epoch", "lr", "mu", "Loss"],
            [
                (e + 1, lr, mu, loss)
                for e, (lr, mu, loss) in enumerate(
                    zip(self.lr_schedule, self.momentum_schedule, self.epoch_losses)
                )
            ],
        )
        return f"{summary}\n\n{log}"


def treat(
    model: nn.Module,
    loader,
    layers=None,
    mask=None,
    epochs: int = 30,
    lr: float = 0.01,
    optimizer="physics",
    ewc: float = 0.0,
    *,
    lr_min: float | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    device=None,
    seed: int | None = None,
    progress: bool | None = None,
    adapter: str | None = None,
    rank: int = 8,
    alpha: float = 16,
    merge: bool = False,
    ignore_index: int | None = -100,
    shift_labels: bool = False,
    loss_fn=None,
):
    """Retrain the chosen groups (or masked elements) of a copy of ``model``, or adapt them.

    Args:
        model: left untouched; a deep copy is trained.
        loader: training batches ``(inputs, labels)`` or dicts with ``"labels"``; the mean
            cross-entropy over the batch's units (examples, or a sequence model's positions).
            Needs ``len()``.
        layers: group names (``"layer3"``, ``"layer1.0"``...), ``{name: [parameters]}``, or a
            :class:`Localization` (its ``problem_layers``).
        mask: ``{parameter or parameter name: bool tensor of its shape}`` (e.g.
            :func:`friction_mask`); only True elements train. With ``layers`` too, an element
            trains when it is in a chosen group *and* True in the mask.
        epochs: passes over ``loader``. The lr of step ``t`` of ``T = epochs * len(loader)``
            is ``lr_min + (lr - lr_min) * (1 + cos(pi * t / (T - 1))) / 2``: ``lr`` at the
            first step, ``lr_min`` (default ``lr / 100``) exactly at the last.
        optimizer: "physics" (:class:`dampopt.PhysicsSGD`, the paper's; its momentum follows
            the lr of every step), "sgd" (torch SGD with ``momentum``), "adam", "adamw" (how
            LoRA adapters are usually trained), or a callable ``(params, lr) -> optimizer``.
        ewc: strength of the penalty ``(ewc / 2) * ||theta - theta_0||^2`` toward the original
            weights of the trained parameters: the isotropic (identity-Fisher) variant of
            elastic weight consolidation, not a Fisher-weighted one.
        weight_decay: L2 coupling passed to the optimizer (untrained elements are unaffected).
        device: where the copy trains (default: the model's device).
        seed: if given, the treatment runs with torch's RNG, the loader's and its sampler's
            own generators and a DistributedSampler's seed all set from it (and restored
            after): a shuffling loader then yields the same batches for the same seed, which
            is what makes two treatments a paired comparison. A DistributedSampler gets
            ``set_epoch(e)`` for each epoch either way (its epoch is restored after).
        progress: a tqdm bar over the steps; None: when stderr is a terminal.
        adapter: None (retrain the chosen parameters themselves) or "lora": surgical LoRA.
            The copy is wrapped by peft with LoRA adapters of rank ``rank`` and scale
            ``alpha / rank`` on the modules of the chosen groups only (:func:`lora_targets`:
            ``nn.Linear`` and GPT-2's ``Conv1D``); only the adapters train, with the same
            protocol (optimizer, cosine lr, seed, EWC toward their initial values). The
            adapters' initialisation is drawn under ``seed``. Needs peft (``pip install
            "dampopt[llm]"``); not with ``mask``.
        merge: with ``adapter="lora"``, return the plain model with the adapters merged into
            its weights (peft's ``merge_and_unload``) instead of the peft model.
        ignore_index, shift_labels, loss_fn: how units are scored, as for :func:`localize`
            (pass the same values: ``shift_labels=True`` for HF causal LMs).

    Returns:
        ``(corrected_copy, TreatReport)``; the copy has the input's ``requires_grad`` flags and
        train/eval modes. With ``adapter="lora"``: a ``peft.PeftModel`` (base weights frozen,
        bit-identical to the input's; adapters trainable), or with ``merge=True`` the merged
        plain model (input's flags and modes).
    """
    model = _data.unwrap(model)
    check_int("epochs", epochs, 1)
    lr = check_learning_rate(lr)
    lr_min = lr / 100 if lr_min is None else check_learning_rate(lr_min, "lr_min", allow_zero=True)
    if lr_min > lr:
        raise ValueError(f"lr_min ({lr_min}) must not exceed lr ({lr})")
    ewc = check_non_negative("ewc", ewc)
    weight_decay = check_non_negative("weight_decay", weight_decay)
    check_optimizer(optimizer)
    check_seed(seed, allow_none=True)
    task = Task.of(ignore_index, shift_labels, loss_fn)
    if adapter not in (None, "lora"):
        raise ValueError(f'adapter must be None or "lora", got {adapter!r}')
    if adapter is not None and mask is not None:
        raise ValueError('adapter="lora" adapts whole modules; it does not take mask=')
    if not isinstance(merge, bool):
        raise ValueError(f"merge must be True or False, got {merge!r}")
    if merge and adapter is None:
        raise ValueError('merge=True merges adapters: it needs adapter="lora"')
    try:
        steps_per_epoch = len(loader)
    except TypeError:
        raise ValueError("treat needs a loader with len(): its steps set the lr") from None
    if steps_per_epoch < 1:
        raise ValueError("loader yields no batch: nothing to train on")
    names = parameter_names(model)
    targets = None
    if adapter is None:
        element_masks, layer_names = _trainable(model, names, layers, mask)
        if not element_masks:
            raise ValueError("nothing to train: the chosen layers/mask select no parameter element")
    else:
        check_int("rank", rank, 1)
        if layers is None:
            raise ValueError('adapter="lora" needs layers (group names or a Localization)')
        require_peft()
        layer_names, _ = flagged_parameters(model, layers)
        targets = lora_targets(model, layers)

    device = _data.model_device(model, device)
    corrected = copy.deepcopy(model).to(device)
    flags = {name: p.requires_grad for name, p in corrected.named_parameters()}
    if adapter is not None:
        corrected = wrap_with_lora(corrected, targets, rank, alpha, seed)
        element_masks = {name: None for name, p in corrected.named_parameters()
                         if p.requires_grad}  # fmt: skip
    surgery = Surgery.prepare(corrected, element_masks, ewc, device)
    opt, optimizer_name = build_optimizer(optimizer, surgery.trained(), lr, weight_decay, momentum)
    lrs = step_cosine(lr, lr_min, epochs * steps_per_epoch)

    train_modes(corrected)
    steps, losses, epoch_lrs, momenta = 0, [], [], []
    bar = progress_bar(range(len(lrs)), progress, "treat", total=len(lrs))
    ticks = iter(bar)
    synchronize(device)
    start = time.perf_counter()
    with seeded(loader, seed, device), contextlib.closing(_Closable(bar)):
        for epoch in range(epochs):
            set_epoch(loader, epoch)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            count = 0
            for n, batch in enumerate(loader):
                step_lr = lrs[min(steps, len(lrs) - 1)]  # a loader longer than len(): lr_min
                for group in opt.param_groups:
                    group["lr"] = step_lr
                batch_loss, size = train_step(corrected, batch, opt, surgery, device, task)
                if n == 0:
                    epoch_lrs.append(step_lr)
                    momenta.append(momentum_of(opt))
                loss_sum += batch_loss
                count += size
                steps += 1
                next(ticks, None)
            totals = all_reduce_sum_(torch.stack([loss_sum, loss_sum.new_tensor(float(count))]))
            if totals[1] == 0:  # after the reduction, so every rank raises together
                raise ValueError("loader yielded no batch: nothing to train on")
            losses.append(float(totals[0] / totals[1]))
    synchronize(device)
    wall = time.perf_counter() - start

    if adapter is None:
        for name, p in corrected.named_parameters():
            p.requires_grad_(flags[name])
        for source, target in zip(model.modules(), corrected.modules()):
            target.training = source.training
        trainable = None
    else:
        trainable = {name: p.numel() for name, p in corrected.named_parameters()
                     if name in element_masks}  # fmt: skip
        corrected.train(model.training)
        if merge:
            corrected = corrected.merge_and_unload()
            for name, p in corrected.named_parameters():
                p.requires_grad_(flags[name])
            for source, target in zip(model.modules(), corrected.modules()):
                target.training = source.training
    report = _report(
        model,
        trainable=trainable,
        names=names,
        element_masks=element_masks,
        layer_names=layer_names,
        masked=mask is not None,
        epochs=epochs,
        steps=steps,
        optimizer_name=optimizer_name,
        lrs=epoch_lrs,
        final_lr=lrs[min(steps, len(lrs)) - 1],
        momenta=momenta,
        losses=losses,
        ewc=ewc,
        weight_decay=weight_decay,
        seed=seed,
        wall=wall,
    )
    if adapter is not None:
        report.adapter, report.rank, report.lora_alpha = adapter, rank, float(alpha)
        report.targets, report.merged = targets, merge
    return corrected, report


class _Closable:
    """Closes a tqdm bar (or does nothing for a plain iterable), also when training raises."""

    def __init__(self, bar):
        self.bar = bar

    def close(self) -> None:
        if hasattr(self.bar, "close"):
            self.bar.close()


def _trainable(model, names, layers, mask):
    """``{parameter name: None (all elements) or bool mask}`` and the chosen group names."""
    chosen_layers = None
    layer_names = []
    if isinstance(layers, Localization):
        if not layers.problem_layers:
            raise ValueError("layers: the localization flagged no problem layer")
        layers = layers.problem_layers
    if layers is not None:
        groups = resolve_groups(model, layers, argument="layers")
        layer_names = list(groups)
        chosen_layers = {names[id(p)] for ps in groups.values() for p in ps}
    if mask is None:
        if chosen_layers is None:
            raise ValueError("give layers (group names) or mask (per-parameter bool tensors)")
        return {name: None for name in names.values() if name in chosen_layers}, layer_names
    by_name = dict(model.named_parameters())
    if not isinstance(mask, dict):
        raise TypeError(
            f"mask must be a dict {{parameter or name: bool tensor}}, got {type(mask).__name__}"
        )
    masks = {}
    for key, value in mask.items():
        name = key if isinstance(key, str) else names.get(id(key))
        if name not in by_name:
            raise ValueError(
                f"mask key {key if isinstance(key, str) else 'tensor'!r} is not a parameter "
                "of model"
            )
        value = torch.as_tensor(value)
        if value.dtype != torch.bool or value.shape != by_name[name].shape:
            raise ValueError(
                f"mask[{name!r}] must be a bool tensor of shape {tuple(by_name[name].shape)}, "
                f"got {value.dtype} {tuple(value.shape)}"
            )
        if chosen_layers is not None and name not in chosen_layers:
            continue
        if bool(value.any()):
            masks[name] = None if bool(value.all()) else value
    # keep the model's parameter order, so optimizers see parameters as the model lists them
    return {name: masks[name] for name in names.values() if name in masks}, layer_names


def _report(
    model,
    *,
    trainable=None,
    names,
    element_masks,
    layer_names,
    masked,
    epochs,
    steps,
    optimizer_name,
    lrs,
    final_lr,
    momenta,
    losses,
    ewc,
    weight_decay,
    seed,
    wall,
) -> TreatReport:
    by_name = dict(model.named_parameters())
    total_elements = sum(p.numel() for p in by_name.values())
    if trainable is None:
        trainable_elements = sum(
            by_name[name].numel() if m is None else int(m.sum())
            for name, m in element_masks.items()
        )
    else:  # adapters: parameters of the wrapped copy, counted against the base model's
        trainable_elements = sum(trainable.values())
    return TreatReport(
        layers=layer_names,
        masked=masked,
        trainable_tensors=len(element_masks),
        total_tensors=len(by_name),
        tensor_fraction=len(element_masks) / len(by_name),
        trainable_elements=trainable_elements,
        total_elements=total_elements,
        element_fraction=trainable_elements / total_elements,
        epochs=epochs,
        steps=steps,
        optimizer=optimizer_name,
        lr_schedule=list(lrs),
        momentum_schedule=momenta,
        final_lr=final_lr,
        epoch_losses=losses,
        ewc=ewc,
        weight_decay=weight_decay,
        seed=seed,
        wall_time_s=wall,
        trainable_parameters=trainable_elements,
    )
