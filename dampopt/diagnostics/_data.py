"""Batches, devices and modes: what every pass over a loader needs.

A loader yields ``(inputs, labels, ...)``: ``inputs`` a tensor, a tuple/list of tensors (passed
as ``model(*inputs)``) or a dict (``model(**inputs)``); ``labels`` integer class indices. Extra
items are ignored. Or it yields dicts (HF style, ``{"input_ids": ..., "attention_mask": ...,
"labels": ...}``): the model gets every entry but ``labels`` as keyword arguments. The model
returns logits or an object with ``.logits``; :mod:`._task` says how they are scored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from torch.utils.data.distributed import DistributedSampler


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, DataParallel or ``torch.compile``.

    The diagnostics take gradients with ``torch.autograd.grad`` and all-reduce them themselves;
    going through DDP's forward would arm its reducer for a backward that never comes. A
    compiled wrapper would prefix every parameter name with ``_orig_mod.``.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module, device=None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter."""
    if device is not None:
        return torch.device(device)
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def unpack(batch):
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ValueError("a dict batch must hold the targets under 'labels'")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("the loader must yield (inputs, labels) pairs or dicts with 'labels'")
    return batch[0], batch[1]


def to_device(inputs, device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def select(inputs, index: torch.Tensor):
    """Rows ``index`` of every tensor in ``inputs``."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if isinstance(inputs, dict):
        return {k: select(v, index) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(select(v, index) for v in inputs)
    return inputs


def outputs_of(model: nn.Module, inputs):
    """The model's raw output on ``inputs`` (``model(**dict)``, ``model(*tuple)``, ``model(x)``)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def logits_of(model: nn.Module, inputs) -> torch.Tensor:
    out = outputs_of(model, inputs)
    out = getattr(out, "logits", out)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError("the model must return logits of shape [batch, classes]")
    return out


def check_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError("labels must be a 1-D tensor of integer class indices")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}) for a model with {num_classes} outputs, "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.long()  # cross_entropy wants int64 class indices


@dataclass(frozen=True)
class LoaderOrder:
    """Where each position of this process's pass over a loader comes from.

    ``indices[k]``: the dataset index at position k, or ``indices is None`` when the order is not
    reproducible (a shuffling loader draws a new order each pass; a custom batch_sampler).
    ``padding[k]``: True where DistributedSampler repeated an example so that every rank gets
    the same count; the diagnostics skip those, so a sharded pass sees each example once.
    """

    indices: list | None
    padding: list | None

    def valid(self, offset: int, count: int, device) -> torch.Tensor | None:
        """Bool mask of the real (not padding) rows of the batch at ``offset``; None: all."""
        if self.padding is None:
            return None
        return torch.tensor(self.padding[offset : offset + count], device=device).logical_not()


def loader_order(loader) -> LoaderOrder:
    """Dataset indices (and DistributedSampler padding) of the loader's iteration, if known.

    Known for a DataLoader with a SequentialSampler (position == index) or a DistributedSampler
    (its order depends only on seed and epoch).
    """
    if not isinstance(loader, DataLoader):
        return LoaderOrder(None, None)
    batches = loader.batch_sampler
    # A custom batch_sampler decides the order itself; DataLoader.sampler is then a default.
    if type(batches) is not BatchSampler or batches.sampler is not loader.sampler:
        return LoaderOrder(None, None)
    sampler = loader.sampler
    if isinstance(sampler, SequentialSampler):
        return LoaderOrder(list(iter(sampler)), None)
    if isinstance(sampler, DistributedSampler):
        indices = list(iter(sampler))
        # rank r's k-th sample is position r + k * replicas of the padded global order;
        # positions past the dataset's end are the repeats
        size = len(sampler.dataset)
        padding = [sampler.rank + k * sampler.num_replicas >= size for k in range(len(indices))]
        return LoaderOrder(indices, padding if any(padding) else None)
    return LoaderOrder(None, None)


def index_of(order: LoaderOrder):
    """Position in the pass -> dataset index (or the position itself, when not known).

    A position may be ``(position, token)`` for per-position units: only the first is mapped.
    """
    if order.indices is None:
        return lambda p: p
    indices = order.indices

    def mapped(p):
        if isinstance(p, tuple):
            return (int(indices[p[0]]), p[1])
        return int(indices[p])

    return mapped


def gather_in_dataset_order(order: LoaderOrder, positions: list, *columns: list):
    """All ranks' ``(indices, *columns)`` for rows at ``positions`` of this rank's pass.

    With known dataset indices the rows come back sorted by dataset index, so the result does
    not depend on batching, shuffling or sharding (``kind == "dataset"``); otherwise they are
    positions, concatenated in rank order (``kind == "position"``). Returns
    ``(kind, indices, *columns)``.
    """
    from .._distributed import all_gather_objects

    known = order.indices is not None
    indices = [index_of(order)(p) for p in positions]
    parts = all_gather_objects((indices, *columns))
    merged = [[x for part in parts for x in part[k]] for k in range(len(columns) + 1)]
    if known:
        ranked = sorted(range(len(merged[0])), key=merged[0].__getitem__)
        merged = [[seq[i] for i in ranked] for seq in merged]
    return ("dataset" if known else "position", *merged)


@contextlib.contextmanager
def evaluation(model: nn.Module, params):
    """Eval mode, ``requires_grad`` on ``params`` and off on every other parameter of ``model``
    for the duration; modes and flags restored after, also on error.

    ``.grad`` fields stay as they were too: the passes either take gradients with
    ``torch.autograd.grad`` or set ``.grad`` aside and put it back (``_task.streamed_gradients``).
    With the other parameters frozen, the forward pass keeps no activations for their weight
    gradients, and none at all below the first requested parameter.
    """
    modes = [(module, module.training) for module in model.modules()]
    wanted = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in params]
    flags += [(p, p.requires_grad) for p in model.parameters() if id(p) not in wanted]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for module, training in modes:
            module.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def gradients(loss: torch.Tensor, params, retain_graph: bool = False) -> list:
    """fp32 gradients of ``loss`` w.r.t. ``params``; zeros for parameters it does not reach."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [
        torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
        for p, g in zip(params, grads)
    ]
