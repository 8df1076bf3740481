"""Step 4, Treat: retrain only the problem layers (or parameters) of a copy of the model.

The paper's protocol (Sec. 5.5, Table 16): freeze everything except the flagged groups, retrain
30 epochs with physics momentum on a per-epoch cosine schedule from lr = 0.01 down to lr/100
(epoch 30 runs at 1.3e-4, as in Table 16). Methods C/D train only the top 30% / 15% of
individual parameters by iKFAD friction: :func:`friction_mask`.

Guarantees: the input model is never modified (a deep copy is trained); parameters that are
not trained, and the untrained elements of a masked parameter, are bit-identical in the copy,
and modules none of whose own parameters train run in eval mode, so their buffers (BatchNorm
running statistics) are left as they were too.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._distributed import all_reduce_sum_, is_distributed
from .._validation import check_learning_rate, check_non_negative
from ..physics_sgd import PhysicsSGD
from . import _data
from ._report import Report, markdown_table
from .groups import parameter_names, resolve_groups
from .localize import Localization
from .scan import cosine_schedule

OPTIMIZERS = ("physics", "sgd", "adam")


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
    lr_schedule: list  # lr of each epoch
    momentum_schedule: list  # momentum (or Adam's beta1) in effect at the end of each epoch
    epoch_losses: list  # mean cross-entropy of each epoch (without the EWC term)
    ewc: float
    weight_decay: float
    wall_time_s: float

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
                ("optimizer", self.optimizer),
                ("epochs", self.epochs),
                ("steps", self.steps),
                ("EWC strength", self.ewc),
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
):
    """Retrain the chosen groups (or masked elements) of a copy of ``model``.

    Args:
        model: left untouched; a deep copy is trained.
        loader: training batches ``(inputs, labels)``; cross-entropy loss.
        layers: group names (``"layer3"``, ``"layer1.0"``...), ``{name: [parameters]}``, or a
            :class:`Localization` (its ``problem_layers``).
        mask: ``{parameter or parameter name: bool tensor of its shape}`` (e.g.
            :func:`friction_mask`); only True elements train. With ``layers`` too, an element
            trains when it is in a chosen group *and* True in the mask.
        epochs: passes over ``loader``; the lr follows a per-epoch cosine from ``lr`` to
            ``lr_min`` (default ``lr / 100``), the paper's correction schedule.
        optimizer: "physics" (:class:`dampopt.PhysicsSGD`, the paper's), "sgd" (torch SGD with
            ``momentum``), "adam", or a callable ``(params, lr) -> optimizer``.
        ewc: strength of the penalty ``(ewc / 2) * ||theta - theta_0||^2`` toward the original
            weights of the trained parameters: the isotropic (identity-Fisher) variant of
            elastic weight consolidation, not a Fisher-weighted one.
        weight_decay: L2 coupling passed to the optimizer (untrained elements are unaffected).
        device: where the copy trains (default: the model's device).

    Returns:
        ``(corrected_copy, TreatReport)``; the copy has the input's ``requires_grad`` flags and
        train/eval modes.
    """
    model = _data.unwrap(model)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    lr = check_learning_rate(lr)
    lr_min = lr / 100 if lr_min is None else check_learning_rate(lr_min, "lr_min", allow_zero=True)
    ewc = check_non_negative("ewc", ewc)
    weight_decay = check_non_negative("weight_decay", weight_decay)
    if not (isinstance(optimizer, str) and optimizer in OPTIMIZERS) and not callable(optimizer):
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a callable, got {optimizer!r}")
    names = parameter_names(model)
    element_masks, layer_names = _trainable(model, names, layers, mask)
    if not element_masks:
        raise ValueError("nothing to train: the chosen layers/mask select no parameter element")

    device = _data.model_device(model, device)
    corrected = copy.deepcopy(model).to(device)
    flags = {name: p.requires_grad for name, p in corrected.named_parameters()}
    surgery = _Surgery.prepare(corrected, element_masks, ewc, device)
    opt, optimizer_name = _build_optimizer(optimizer, surgery.trained(), lr, weight_decay, momentum)
    lrs = cosine_schedule(lr, lr_min, epochs)

    _train_modes(corrected)
    steps, losses, momenta = 0, [], []
    _synchronize(device)
    start = time.perf_counter()
    for epoch_lr in lrs:
        for group in opt.param_groups:
            group["lr"] = epoch_lr
        loss, batches = _train_epoch(corrected, loader, opt, surgery, device)
        steps += batches
        losses.append(loss)
        momenta.append(_momentum_of(opt))
    _synchronize(device)
    wall = time.perf_counter() - start

    for name, p in corrected.named_parameters():
        p.requires_grad_(flags[name])
    for source, target in zip(model.modules(), corrected.modules()):
        target.training = source.training
    report = _report(
        model,
        names=names,
        element_masks=element_masks,
        layer_names=layer_names,
        masked=mask is not None,
        epochs=epochs,
        steps=steps,
        optimizer_name=optimizer_name,
        lrs=lrs,
        momenta=momenta,
        losses=losses,
        ewc=ewc,
        weight_decay=weight_decay,
        wall=wall,
    )
    return corrected, report


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


def _build_optimizer(optimizer, params, lr, weight_decay, momentum):
    if optimizer == "physics":
        return PhysicsSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay), "physics"
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay), "sgd"
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay), "adam"
    built = optimizer(params, lr)
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError("optimizer callable must return a torch.optim.Optimizer")
    return built, getattr(optimizer, "__name__", type(built).__name__)


def _train_modes(model: nn.Module) -> None:
    """Train mode, except modules with buffers none of whose own parameters train (frozen BN)."""
    model.train()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        has_buffers = any(True for _ in module.buffers(recurse=False))
        if has_buffers and not any(p.requires_grad for p in own):
            module.eval()


@dataclass
class _Surgery:
    """What trains in the copy, and how its gradients are edited before each step."""

    params: dict  # {name: parameter of the copy}
    element_masks: dict  # {name: None (whole tensor trains) or bool mask}
    partial: dict  # {name: (mask, original values)} for partly trained tensors
    anchors: dict  # {name: original values} for the EWC penalty
    ewc: float

    @classmethod
    def prepare(cls, model, element_masks, ewc, device):
        params = dict(model.named_parameters())
        for name, p in params.items():
            p.requires_grad_(name in element_masks)
        partial = {
            name: (m.to(device), params[name].detach().clone())
            for name, m in element_masks.items()
            if m is not None
        }
        anchors = {name: params[name].detach().clone() for name in element_masks} if ewc else {}
        return cls(params, element_masks, partial, anchors, ewc)

    def trained(self) -> list:
        return [self.params[name] for name in self.element_masks]

    def edit_gradients(self) -> None:
        world = dist.get_world_size() if is_distributed() else 1
        for name in self.element_masks:
            p = self.params[name]
            if p.grad is None:
                continue
            if world > 1:  # keep every rank's copy identical: average the gradients
                all_reduce_sum_(p.grad).div_(world)
            if self.ewc:  # gradient of (ewc / 2) * ||theta - theta_0||^2
                p.grad.add_(p.detach() - self.anchors[name], alpha=self.ewc)
            if name in self.partial:
                p.grad.mul_(self.partial[name][0])

    @torch.no_grad()
    def restore_untrained(self) -> None:
        # Gradient masking alone leaves weight decay and optimizer state able to move an
        # element; writing the originals back makes "untrained" exact whatever the optimizer.
        for name, (mask, original) in self.partial.items():
            self.params[name].copy_(torch.where(mask, self.params[name], original))


def _train_epoch(model, loader, opt, surgery: _Surgery, device) -> tuple[float, int]:
    """One pass of cross-entropy training; returns (mean loss over all ranks, steps)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = steps = 0
    for batch in loader:
        inputs, labels = _data.unpack(batch)
        inputs = _data.to_device(inputs, device)
        logits = _data.logits_of(model, inputs)
        labels = _data.check_labels(torch.as_tensor(labels).to(device), logits.shape[1])
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        surgery.edit_gradients()
        opt.step()
        surgery.restore_untrained()
        loss_sum += loss.detach().double() * len(labels)
        count += len(labels)
        steps += 1
    totals = all_reduce_sum_(torch.stack([loss_sum, loss_sum.new_tensor(float(count))]))
    if totals[1] == 0:  # after the reduction, so every rank raises together
        raise ValueError("loader yielded no batch: nothing to train on")
    return float(totals[0] / totals[1]), steps


def _momentum_of(opt) -> float | None:
    group = opt.param_groups[0]
    if "momentum" in group:
        return float(group["momentum"])
    if "betas" in group:
        return float(group["betas"][0])
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _report(
    model,
    *,
    names,
    element_masks,
    layer_names,
    masked,
    epochs,
    steps,
    optimizer_name,
    lrs,
    momenta,
    losses,
    ewc,
    weight_decay,
    wall,
) -> TreatReport:
    by_name = dict(model.named_parameters())
    total_elements = sum(p.numel() for p in by_name.values())
    trainable_elements = sum(
        by_name[name].numel() if m is None else int(m.sum()) for name, m in element_masks.items()
    )
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
        epoch_losses=losses,
        ewc=ewc,
        weight_decay=weight_decay,
        wall_time_s=wall,
    )
