"""Training part of a copy of a model: what :func:`treat`, its controls and the probe share.

Guarantees: parameters that are not trained, and the untrained elements of a masked parameter,
stay bit-identical; modules none of whose own parameters train run in eval mode, so their
buffers (BatchNorm running statistics) are left as they were too.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from .._distributed import all_reduce_sum_, is_distributed
from ..momentum import momentum_in_effect
from ..physics_sgd import PhysicsSGD
from . import _data

OPTIMIZERS = ("physics", "sgd", "adam", "adamw")


def step_cosine(lr_max: float, lr_min: float, steps: int) -> list[float]:
    """Cosine annealing over steps: ``lr_max`` at the first step, ``lr_min`` at the last.

    ``lr[t] = lr_min + (lr_max - lr_min) * (1 + cos(pi * t / (steps - 1))) / 2`` for
    ``t = 0 .. steps-1`` (one step: ``lr_max``). Over 30 epochs of many steps, epoch ``e``
    starts at about ``lr_min + (lr_max - lr_min) (1 + cos(pi e / 30)) / 2``: the paper's Table 16.
    """
    if steps == 1:
        return [lr_max]
    return [
        lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * t / (steps - 1))) / 2
        for t in range(steps)
    ]


def build_optimizer(optimizer, params, lr, weight_decay, momentum):
    """``(optimizer, name)`` for the names of :data:`OPTIMIZERS` or a ``(params, lr)`` callable."""
    if optimizer == "physics":
        return PhysicsSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay), "physics"
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay), "sgd"
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay), "adam"
    if optimizer == "adamw":  # decoupled weight decay, how LoRA adapters are usually trained
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "adamw"
    built = optimizer(params, lr)
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError("optimizer callable must return a torch.optim.Optimizer")
    return built, getattr(optimizer, "__name__", type(built).__name__)


def check_optimizer(optimizer) -> None:
    if not (isinstance(optimizer, str) and optimizer in OPTIMIZERS) and not callable(optimizer):
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a callable, got {optimizer!r}")


def train_modes(model: nn.Module) -> None:
    """Train mode, except modules with buffers none of whose own parameters train (frozen BN)."""
    model.train()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        has_buffers = any(True for _ in module.buffers(recurse=False))
        if has_buffers and not any(p.requires_grad for p in own):
            module.eval()


@contextlib.contextmanager
def seeded(loader, seed: int | None, device=None):
    """Run the body with every source of batch order seeded by ``seed``; all restored after.

    Seeded: torch's global RNG (a DataLoader that shuffles without a generator of its own draws
    its order from it, as does dropout), the loader's own ``generator``, its sampler's
    ``generator`` (``RandomSampler(generator=...)``), and a ``DistributedSampler``'s seed (its
    epoch is set per epoch by :func:`treat`). Every body run under the same seed therefore sees
    the same batches in the same order, which is what makes two treatments a paired
    comparison. The caller's RNG states (CPU and every initialised CUDA device), generators and
    sampler seed/epoch are restored after. ``seed=None``: nothing is seeded; only a
    DistributedSampler's epoch is restored.
    """
    sampler = getattr(loader, "sampler", None)
    distributed = sampler if isinstance(sampler, DistributedSampler) else None
    if seed is None:  # only the sampler's epoch (treat sets it per epoch) is restored
        saved_epoch = distributed.epoch if distributed is not None else None
        try:
            yield
        finally:
            if distributed is not None:
                distributed.epoch = saved_epoch
        return
    generators = []
    for owner in (loader, getattr(loader, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            generators.append((generator, generator.get_state()))
    saved_sampler = (distributed.seed, distributed.epoch) if distributed is not None else None
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for generator, _ in generators:
                generator.manual_seed(seed)
            if distributed is not None:
                distributed.seed = seed
            yield
    finally:
        for generator, state in generators:
            generator.set_state(state)
        if distributed is not None:
            distributed.seed, distributed.epoch = saved_sampler


def set_epoch(loader, epoch: int) -> None:
    """``DistributedSampler.set_epoch``, so that each epoch of a treatment has its own order."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def progress_bar(iterable, enabled, description: str, total=None):
    """``iterable`` wrapped in a tqdm bar when enabled (None: when stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if is_distributed() and dist.get_rank() != 0:
        enabled = False
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is never worth an error
        return iterable
    return tqdm(iterable, desc=description, total=total, leave=False, file=sys.stderr)


@dataclass
class Surgery:
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


def train_step(model, batch, opt, surgery: Surgery, device, task=None) -> tuple[torch.Tensor, int]:
    """One step on ``batch``; returns (detached fp64 loss sum, number of units).

    ``task`` (a :class:`._task.Task`) scores per-position outputs (a language model's tokens,
    ``shift_labels``, ``ignore_index``, ``loss_fn``): the step then minimises the mean loss over
    the batch's units. A classifier's ``[batch, classes]`` logits with no ignored label take
    the plain cross-entropy path, exactly as before tasks existed.
    """
    inputs, labels = _data.unpack(batch)
    inputs = _data.to_device(inputs, device)
    if task is None:
        logits = _data.logits_of(model, inputs)
        return _classifier_step(logits, labels, opt, surgery, device)
    outputs = _data.outputs_of(model, inputs)
    labels = _data.to_device(torch.as_tensor(labels) if isinstance(labels, list) else labels,
                             device)  # fmt: skip
    logits = getattr(outputs, "logits", outputs)
    plain = (
        task.loss_fn is None and not task.shift_labels and isinstance(logits, torch.Tensor)
        and logits.dim() == 2 and isinstance(labels, torch.Tensor) and labels.dim() == 1
        and (task.ignore_index is None or not bool((labels == task.ignore_index).any()))
    )  # fmt: skip
    if plain:
        return _classifier_step(logits, labels, opt, surgery, device)
    units = task.evaluate(outputs, labels)
    count = int(units.valid.sum())
    if count == 0:  # every label ignored: nothing to learn from this batch
        return torch.zeros((), dtype=torch.float64, device=device), 0
    total = units.losses[units.valid].sum()
    opt.zero_grad(set_to_none=True)
    (total / count).backward()
    surgery.edit_gradients()
    opt.step()
    surgery.restore_untrained()
    return total.detach().double(), count


def _classifier_step(logits, labels, opt, surgery, device):
    labels = _data.check_labels(torch.as_tensor(labels).to(device), logits.shape[1])
    loss = F.cross_entropy(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    surgery.edit_gradients()
    opt.step()
    surgery.restore_untrained()
    return loss.detach().double() * len(labels), len(labels)


def momentum_of(opt) -> float | None:
    return momentum_in_effect(opt.param_groups[0])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
