"""What a batch's outputs and labels mean: per-unit losses, predictions and the units to skip.

A *unit* is what can fail: an example (logits ``[batch, classes]``, labels ``[batch]``) or a
position (logits ``[batch, positions, classes]``, labels ``[batch, positions]``, e.g. a token of
a language model). Units are held as ``[batch, positions]`` tensors, with one position for
per-example tasks. Labels equal to ``ignore_index`` (HF's -100) are not units: they get no
loss, are never failures or references and are not counted.

``shift_labels=True`` is for HF causal LMs, whose labels equal ``input_ids`` and are shifted
inside the model: logits at position ``t`` are scored against the label at ``t + 1``.
A custom ``loss_fn(outputs, labels)`` returns per-example ``[batch]`` or per-position
``[batch, positions]`` losses (summed over the units a gradient is taken on); predictions, and
with them the default failures, come from argmax of the logits only when the labels are
integer class indices laid out like those losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _data


def logits_from(outputs) -> torch.Tensor:
    """The logits in a model's output: the tensor itself or its ``.logits``."""
    logits = getattr(outputs, "logits", outputs)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            "the model's output is neither a tensor nor has .logits (got "
            f"{type(outputs).__name__}); pass loss_fn= to say how it is scored"
        )
    return logits


@dataclass
class Units:
    """One batch's units, all ``[batch, positions]``."""

    losses: torch.Tensor  # float32; 0 where not valid
    valid: torch.Tensor  # bool: a unit (not ignore_index)
    labels: torch.Tensor | None  # int64 class indices, None when the labels are not classes
    predictions: torch.Tensor | None  # argmax of the logits, None without class labels
    per_position: bool  # False: one unit per example
    label_offset: int  # a unit at position t scores the label at t + label_offset
    logits: object  # what failures= callables receive, with ``targets``
    targets: object

    @property
    def shape(self) -> tuple:
        return tuple(self.valid.shape)


@dataclass(frozen=True)
class Task:
    """How :func:`localize` and its companions score a batch (see the module docstring)."""

    ignore_index: int | None = -100
    shift_labels: bool = False
    loss_fn: Callable | None = None

    @classmethod
    def of(cls, ignore_index=-100, shift_labels=False, loss_fn=None) -> Task:
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        if not isinstance(shift_labels, bool):
            raise ValueError(f"shift_labels must be True or False, got {shift_labels!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable (outputs, labels) -> losses, got "
                             f"{type(loss_fn).__name__}")  # fmt: skip
        if loss_fn is not None and shift_labels:
            raise ValueError(
                "shift_labels=True shifts the built-in cross-entropy's labels; with loss_fn= "
                "do the shift inside loss_fn"
            )
        return cls(ignore_index, shift_labels, loss_fn)

    def evaluate(self, outputs, labels) -> Units:
        """Losses, validity and predictions of every unit of a batch (keeps the graph)."""
        if self.loss_fn is not None:
            return self._custom(outputs, labels)
        logits = logits_from(outputs)
        labels = self._class_labels(labels)
        logits, labels, per_position = self._layout(logits, labels)
        valid = self._valid(labels)
        classes = logits.shape[-1]
        chosen = labels[valid]
        if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= classes):
            ignored = self.ignore_index
            hint = f" (or ignore_index={ignored})" if ignored is not None else ""
            raise ValueError(
                f"labels must be in [0, {classes}){hint} for a model with {classes} outputs, "
                f"got values in [{int(chosen.min())}, {int(chosen.max())}]"
            )
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        losses = F.cross_entropy(
            logits.float().flatten(0, 1), safe.flatten(), reduction="none"
        ).view(labels.shape)
        losses = torch.where(valid, losses, torch.zeros_like(losses))
        targets = labels if per_position else labels[:, 0]
        return Units(
            losses=losses,
            valid=valid,
            labels=labels,
            predictions=logits.detach().argmax(dim=-1),
            per_position=per_position,
            label_offset=int(self.shift_labels),
            logits=logits if per_position else logits[:, 0],
            targets=targets,
        )

    def _class_labels(self, labels) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() not in (
            1, 2,
        ):  # fmt: skip
            raise ValueError(
                "labels must be integer class indices, [batch] or [batch, positions] (got a "
                f"{labels.dtype} tensor of shape {tuple(labels.shape)}); for other targets "
                "pass loss_fn= and failures="
            )
        return labels.long()

    def _layout(self, logits, labels):
        """Logits ``[B, T, C]`` and labels ``[B, T]``, aligned; T = 1 for per-example tasks."""
        if logits.dim() == 2 and labels.dim() == 1 and len(labels) == len(logits):
            if self.shift_labels:
                raise ValueError(
                    "shift_labels=True needs logits [batch, positions, classes] and labels "
                    f"[batch, positions]; got logits {tuple(logits.shape)}"
                )
            return logits[:, None], labels[:, None], False
        if logits.dim() == 3 and labels.dim() == 2 and labels.shape == logits.shape[:2]:
            if self.shift_labels:
                return logits[:, :-1], labels[:, 1:], True
            return logits, labels, True
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} match no layout of logits of shape "
            f"{tuple(logits.shape)}: expected logits [batch, classes] with labels [batch], or "
            "logits [batch, positions, classes] with labels [batch, positions]"
        )

    def _valid(self, labels) -> torch.Tensor:
        if self.ignore_index is None:
            return torch.ones_like(labels, dtype=torch.bool)
        return labels != self.ignore_index

    def _custom(self, outputs, labels) -> Units:
        losses = self.loss_fn(outputs, labels)
        if not isinstance(losses, torch.Tensor) or losses.dim() not in (1, 2):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else None
            raise ValueError(
                "loss_fn(outputs, labels) must return per-example [batch] or per-position "
                f"[batch, positions] losses, got {type(losses).__name__} of shape {shape}"
            )
        per_position = losses.dim() == 2
        losses = losses.float() if per_position else losses.float()[:, None]
        logits = getattr(outputs, "logits", outputs)
        class_labels = predictions = None
        valid = torch.ones_like(losses, dtype=torch.bool)
        if (
            isinstance(labels, torch.Tensor)
            and not labels.dtype.is_floating_point
            and labels.dtype != torch.bool
            and isinstance(logits, torch.Tensor)
            and logits.dim() == losses.dim() + (0 if per_position else 1)
            and tuple(labels.shape) == tuple(logits.shape[:-1])
        ):
            class_labels = labels.long() if per_position else labels.long()[:, None]
            valid = self._valid(class_labels)
            predictions = logits.detach().argmax(dim=-1)
            predictions = predictions if per_position else predictions[:, None]
        if class_labels is not None and class_labels.shape != losses.shape:
            class_labels = predictions = None
            valid = torch.ones_like(losses, dtype=torch.bool)
        losses = torch.where(valid, losses, torch.zeros_like(losses))
        return Units(losses, valid, class_labels, predictions, per_position, 0, logits, labels)


def batch_units(model, task: Task, batch, device):
    """``(inputs on device, labels on device, Units)`` for one batch, without grad."""
    inputs, labels = _data.unpack(batch)
    inputs = _data.to_device(inputs, device)
    labels = _data.to_device(torch.as_tensor(labels) if isinstance(labels, list) else labels,
                             device)  # fmt: skip
    with torch.no_grad():
        units = task.evaluate(_data.outputs_of(model, inputs), labels)
    return inputs, labels, units


def summed_loss(model, task: Task, inputs, labels, chosen: torch.Tensor) -> torch.Tensor:
    """Sum of the losses of the units ``chosen`` (bool ``[batch, positions]``), with grad.

    Only the examples holding a chosen unit are run through the model.
    """
    rows = chosen.any(dim=1).nonzero().flatten()
    units = task.evaluate(
        _data.outputs_of(model, _data.select(inputs, rows)), _data.select(labels, rows)
    )
    return units.losses[chosen[rows]].sum()


def unit_gradients(model, task: Task, inputs, labels, chosen, params) -> list:
    """fp32 gradients w.r.t. ``params`` of the summed loss over the units ``chosen``."""
    return _data.gradients(summed_loss(model, task, inputs, labels, chosen), params)


def streamed_gradients(model, task: Task, inputs, labels, chosen, params, sums=None):
    """Squared fp32 norm of each parameter's gradient of the summed loss over ``chosen``
    (float64 ``[len(params)]``), each gradient added into ``sums[i]`` when given.

    Each gradient is used and freed as soon as autograd has it (a post-accumulate-grad hook),
    so the pass holds one parameter's gradient at a time rather than a model-sized list.
    ``.grad`` fields are set aside for the pass and put back after, also on error;
    ``params`` must be distinct leaves. Where a parameter already has post-accumulate-grad
    hooks of its own (an optimizer stepping inside backward, say), which a backward pass would
    run, the gradients are taken with ``torch.autograd.grad`` instead (no hook runs; a
    model-sized list of gradients at once).
    """
    loss = summed_loss(model, task, inputs, labels, chosen)
    squares = torch.zeros(len(params), dtype=torch.float64, device=loss.device)
    index = {id(p): i for i, p in enumerate(params)}

    def record(i, grad):
        squares[i] = torch.linalg.vector_norm(grad.float()).double().to(squares.device) ** 2
        if sums is not None:
            sums[i].add_(grad)

    def use(param):
        if param.grad is not None:
            record(index[id(param)], param.grad)
        param.grad = None

    if any(getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for i, grad in enumerate(grads):
                if grad is not None:
                    record(i, grad)
        return squares

    saved = [p.grad for p in params]
    handles = []
    try:
        for p in params:
            p.grad = None
        handles = [p.register_post_accumulate_grad_hook(use) for p in params]
        if loss.requires_grad:
            torch.autograd.backward(loss, inputs=list(params))
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in zip(params, saved):
            p.grad = grad
    return squares


def flat_mask(shape, flat_indices: torch.Tensor) -> torch.Tensor:
    """Bool ``shape`` tensor, True at the row-major positions ``flat_indices``."""
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=flat_indices.device)
    mask[flat_indices] = True
    return mask.view(shape)
