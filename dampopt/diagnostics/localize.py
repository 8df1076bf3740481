"""Step 2, Localize: which layer groups are confused by the errors (the paper, Sec. 5.3).

The paper's signal: the gradient of the mean cross-entropy over the misclassified examples
*only*, model in eval mode, its L2 norm per layer group; groups above the median are the
"problem layers". Other criteria rank by the same error gradient scaled differently, or by the
friction an iKFAD optimizer accumulated (the paper's Method B).

Distributed: each rank sums losses over its own errors, and the summed gradients and the counts
are all-reduced before any norm is taken, so with a DistributedSampler every rank gets the
single-process answer (up to the examples DistributedSampler repeats to even out the shards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from statistics import median

import torch
import torch.nn.functional as F
from torch import nn

from .._distributed import all_reduce_sum_
from . import _data
from ._report import PRIVATE, Report, markdown_table
from .groups import parameter_names, resolve_groups

CRITERIA = ("grad_norm", "relative", "rms", "friction")
RULES = ("median", "topk", "gap")


def select_problem_layers(values: dict, rule: str = "median", k: int = 3) -> list:
    """Names of the flagged groups, largest value first.

    Rules: "median" flags values strictly above the median of all values (the paper's rule:
    3 of 7 ResNet-18 groups); "topk" the ``k`` largest; "gap" everything before the largest
    drop between consecutive values sorted in decreasing order. Nothing is flagged when every
    value is 0 (e.g. no misclassified example).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    ranking = sorted(values, key=lambda name: values[name], reverse=True)
    if not ranking or all(values[name] == 0 for name in ranking):
        return []
    if rule == "median":
        middle = median(values.values())
        return [name for name in ranking if values[name] > middle]
    if rule == "topk":
        return ranking[:k]
    if len(ranking) < 2:
        return []
    drops = [values[a] - values[b] for a, b in pairwise(ranking)]
    return ranking[: drops.index(max(drops)) + 1]


@dataclass
class ErrorGradients:
    """What one pass over a loader collects: summed gradients on errors and on a correct sample.

    ``error_sums[i]`` is the gradient of the *sum* of cross-entropies over all misclassified
    examples w.r.t. ``params[i]`` (all-reduced over ranks); ``correct_sums`` the same over the
    correctly classified sample (in each batch, the first as many correct examples as that batch
    has errors). Divide by the counts for gradients of means.
    """

    params: list = field(metadata=PRIVATE)
    error_sums: list = field(metadata=PRIVATE)
    correct_sums: list = field(metadata=PRIVATE)
    num_examples: int
    num_errors: int
    num_correct_sample: int
    error_indices: list
    error_labels: list
    error_predictions: list
    index_kind: str  # "dataset" or "position"


def error_gradients(model: nn.Module, loader, params, device=None) -> ErrorGradients:
    """One pass over ``loader``: find the errors and sum their loss gradients w.r.t. ``params``.

    Indices: dataset indices, sorted, when the loader's order is reproducible (a DataLoader with
    a SequentialSampler or DistributedSampler, ``index_kind="dataset"``); otherwise positions in
    this pass's iteration order (``index_kind="position"``; under torch.distributed each rank's
    positions, concatenated in rank order). Examples DistributedSampler repeats to even out
    the shards are skipped, so a sharded pass counts each example once.
    """
    device = _data.model_device(model, device)
    order = _data.loader_order(loader)
    error_sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    correct_sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    positions, labels_wrong, preds_wrong = [], [], []
    offset = seen = errors = correct = 0
    with _data.evaluation(model, params):
        for batch in loader:
            inputs, labels, preds = _data.classify_batch(model, batch, device)
            valid = order.valid(offset, len(labels), device)
            is_wrong, is_right = preds != labels, preds == labels
            if valid is not None:
                is_wrong, is_right = is_wrong & valid, is_right & valid
            wrong = is_wrong.nonzero().flatten()
            right = is_right.nonzero().flatten()[: len(wrong)]
            positions += (wrong + offset).tolist()
            labels_wrong += labels[wrong].tolist()
            preds_wrong += preds[wrong].tolist()
            offset += len(labels)
            seen += len(labels) if valid is None else int(valid.sum())
            if len(wrong) == 0:
                continue
            chosen = torch.cat([wrong, right])
            losses = F.cross_entropy(
                _data.logits_of(model, _data.select(inputs, chosen)).float(),
                labels[chosen],
                reduction="none",
            )
            _accumulate(
                error_sums, _data.gradients(losses[: len(wrong)].sum(), params, len(right) > 0)
            )
            if len(right):
                _accumulate(correct_sums, _data.gradients(losses[len(wrong) :].sum(), params))
            errors += len(wrong)
            correct += len(right)
    for tensor in error_sums + correct_sums:
        all_reduce_sum_(tensor)
    counts = all_reduce_sum_(
        torch.tensor([seen, errors, correct], dtype=torch.float64, device=device)
    )
    index_kind, indices, labels_wrong, preds_wrong = _data.gather_in_dataset_order(
        order, positions, labels_wrong, preds_wrong
    )
    seen, errors, correct = (int(c) for c in counts.tolist())
    return ErrorGradients(
        params=list(params),
        error_sums=error_sums,
        correct_sums=correct_sums,
        num_examples=seen,
        num_errors=errors,
        num_correct_sample=correct,
        error_indices=indices,
        error_labels=labels_wrong,
        error_predictions=preds_wrong,
        index_kind=index_kind,
    )


def _accumulate(sums, grads) -> None:
    for total, grad in zip(sums, grads):
        total.add_(grad)


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


@dataclass
class Localization(Report):
    """Result of :func:`localize`. Values per group are floats; ``specificity`` may be None."""

    criterion: str
    rule: str
    norms: dict  # {group: value of the criterion}, in group order
    problem_layers: list  # flagged groups, largest value first
    ranking: list  # all groups, largest value first
    grad_norms: dict  # {group: ||gradient of the mean loss on the errors||_2}, any criterion
    specificity: dict  # {group: grad norm on errors / grad norm on the correct sample}
    num_examples: int
    num_errors: int
    correct_sample_size: int
    error_indices: list
    index_kind: str  # "dataset" (dataset indices) or "position" (iteration order)
    error_labels: list
    error_predictions: list
    group_sizes: dict  # {group: number of parameter elements}
    message: str
    groups: dict = field(default=None, repr=False, metadata=PRIVATE)  # {group: [parameters]}

    def to_markdown(self) -> str:
        problems = set(self.problem_layers)
        # the error grad norm gets its own column only when it is not already the criterion
        extra = self.criterion != "grad_norm"
        headers = ["Group", self.criterion] + (["grad norm on errors"] if extra else [])
        rows = []
        for name in self.ranking:
            row = [name, self.norms[name]] + ([self.grad_norms.get(name)] if extra else [])
            status = "Problem" if name in problems else "Normal"
            rows.append((*row, self.specificity.get(name), status))
        table = markdown_table([*headers, "specificity", "Status"], rows)
        return f"{self.message}\n\n{table}"


def localize(
    model: nn.Module,
    loader,
    groups=None,
    criterion: str = "grad_norm",
    rule: str = "median",
    device=None,
    *,
    k: int = 3,
    optimizer=None,
) -> Localization:
    """Rank layer groups by how much the misclassified examples pull on them.

    Args:
        model: a classifier returning logits; put in eval mode for the pass and restored after.
            Its parameters, ``.grad`` fields and ``requires_grad`` flags are left as they were.
        loader: yields ``(inputs, labels)``; may be None only for ``criterion="friction"``.
        groups: None (``layer_groups(model)``), group names, or ``{name: [parameters]}``.
        criterion: "grad_norm" (||g||_2 of the mean loss on the errors, the paper's),
            "relative" (||g|| / ||theta||, Auto-RGN of Lee et al. 2023), "rms" (||g|| /
            sqrt(elements)), or "friction" (accumulated iKFAD friction per element of the
            group, averaged over the group's elements: the paper's Method B; needs
            ``optimizer=`` the :class:`dampopt.iKFAD` the model was trained with).
        rule: "median", "topk" (with ``k``) or "gap"; see :func:`select_problem_layers`.
        device: where batches go (default: the device of the model's parameters).

    Specificity is a group's grad norm on the errors over its grad norm on an equal-size sample
    of correctly classified examples; None where that sample is empty or its gradient is zero.
    The sample is drawn per batch (each batch's first correct examples, as many as it has
    errors) to keep to one pass, so specificity depends on how the loader batches (and shards)
    the data; norms, counts and indices do not.

    Indices (``error_indices``): dataset indices when the loader's order is reproducible
    (``index_kind="dataset"``), else positions in the pass's iteration order; see
    :func:`error_gradients`. Pass the bare module, not one wrapped for FSDP (DDP and
    DataParallel wrappers are unwrapped).
    """
    model = _data.unwrap(model)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    select_problem_layers({}, rule, k)  # validates rule and k before any work
    if criterion == "friction" and not hasattr(optimizer, "friction_summary"):
        raise ValueError(
            "criterion='friction' needs optimizer= an iKFAD optimizer (friction_summary)"
        )
    if loader is None and criterion != "friction":
        raise ValueError(f"loader is required for criterion={criterion!r}")
    groups = resolve_groups(model, groups)
    params = _unique(p for ps in groups.values() for p in ps)
    sizes = {name: sum(p.numel() for p in ps) for name, ps in groups.items()}

    if loader is not None:
        found = error_gradients(model, loader, params, device)
    else:
        found = _no_pass(params)
    position = {id(p): i for i, p in enumerate(params)}
    grad_norms, specificity = {}, {}
    for name, ps in groups.items():
        rows = [position[id(p)] for p in ps]
        error_norm = _norm(found.error_sums[i] for i in rows) / max(found.num_errors, 1)
        correct_norm = _norm(found.correct_sums[i] for i in rows) / max(found.num_correct_sample, 1)
        grad_norms[name] = error_norm
        specificity[name] = error_norm / correct_norm if correct_norm > 0 else None

    if criterion == "friction":
        norms = _friction_values(model, groups, optimizer)
    elif criterion == "grad_norm":
        norms = dict(grad_norms)
    elif criterion == "relative":
        norms = {}
        for name, ps in groups.items():
            weight = _norm(p.detach() for p in ps)
            norms[name] = grad_norms[name] / weight if weight > 0 else 0.0
    else:  # rms
        norms = {name: grad_norms[name] / math.sqrt(max(sizes[name], 1)) for name in groups}

    problem_layers = select_problem_layers(norms, rule, k)
    ranking = sorted(norms, key=lambda name: norms[name], reverse=True)
    message = _message(found, loader, criterion, problem_layers, len(groups))
    return Localization(
        criterion=criterion,
        rule=rule,
        norms=norms,
        problem_layers=problem_layers,
        ranking=ranking,
        grad_norms=grad_norms,
        specificity=specificity,
        num_examples=found.num_examples,
        num_errors=found.num_errors,
        correct_sample_size=found.num_correct_sample,
        error_indices=found.error_indices,
        index_kind=found.index_kind,
        error_labels=found.error_labels,
        error_predictions=found.error_predictions,
        group_sizes=sizes,
        message=message,
        groups=groups,
    )


def _unique(params) -> list:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _no_pass(params) -> ErrorGradients:
    zeros = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    return ErrorGradients(params, zeros, zeros, 0, 0, 0, [], [], [], "position")


def _friction_values(model, groups, optimizer) -> dict:
    names = parameter_names(model)
    summary = optimizer.friction_summary(named_parameters=model.named_parameters())
    values = {}
    for group, ps in groups.items():
        total = elements = 0.0
        for p in ps:
            stats = summary.get(names[id(p)])
            if stats is None:
                raise ValueError(
                    f"parameter {names[id(p)]!r} of group {group!r} is not in the optimizer: "
                    "criterion='friction' needs the iKFAD optimizer that trained this model"
                )
            total += stats.accumulated * stats.numel
            elements += stats.numel
        values[group] = total / elements if elements else 0.0
    return values


def _message(found, loader, criterion, problem_layers, num_groups) -> str:
    if loader is None:
        where = "no loader given: errors not examined"
    elif found.num_errors == 0:
        where = f"no misclassified examples among {found.num_examples}: nothing to localize"
        if criterion != "friction":
            return where
    else:
        where = f"{found.num_errors} misclassified of {found.num_examples} examples"
    return f"{where}; {len(problem_layers)} of {num_groups} groups flagged by {criterion}"
