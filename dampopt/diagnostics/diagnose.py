"""Step 3, Diagnose: which confusions the errors are, and which flagged group each one loads.

The paper's Table 9: the most frequent (true, predicted) pairs among the misclassified examples,
each attributed to the flagged layer group whose gradient of the mean loss on *that pair's*
errors has the largest L2 norm. The feature interpretation ("texture", "shape") is the reader's.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._distributed import all_reduce_sum_
from . import _data
from ._report import Report, markdown_table
from .groups import resolve_groups
from .localize import Localization


@dataclass(frozen=True)
class ConfusionPair(Report):
    true: int
    predicted: int
    count: int  # errors of this pair found in the diagnose pass
    true_name: str
    predicted_name: str
    attributed_layer: str | None  # None when the pair had no error in the pass
    grad_norms: dict  # {group: ||gradient of the mean loss on this pair's errors||_2}


@dataclass
class Diagnosis(Report):
    pairs: list  # ConfusionPair, most frequent first
    candidate_groups: list  # the groups pairs are attributed among
    num_errors: int
    message: str

    def to_markdown(self) -> str:
        table = markdown_table(
            ["True", "Predicted", "Count", "Attributed layer"],
            [(p.true_name, p.predicted_name, p.count, p.attributed_layer) for p in self.pairs],
        )
        return f"{self.message}\n\n{table}"


def confusion_pairs(labels, predictions, top: int = 7) -> list:
    """The ``top`` most frequent (true, predicted) pairs among errors, ties by (true, predicted)."""
    counts = Counter((int(t), int(p)) for t, p in zip(labels, predictions) if int(t) != int(p))
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ordered[:top]


def diagnose(
    model: nn.Module,
    loader,
    localization: Localization,
    top: int = 7,
    class_names=None,
    device=None,
) -> Diagnosis:
    """Most frequent confusion pairs of ``localization``'s errors, each with its layer.

    The pairs are chosen from the errors ``localization`` found; one pass over ``loader`` then
    sums, per pair, the loss gradients on that pair's errors w.r.t. the flagged groups (all
    groups when none was flagged). Pass the loader that was localized. Sums and counts are
    all-reduced under torch.distributed.

    Args:
        class_names: optional names indexed by class; defaults to the class numbers.
    """
    model = _data.unwrap(model)
    if not isinstance(localization, Localization):
        raise TypeError(f"localization must be a Localization, got {type(localization).__name__}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1, got {top!r}")
    names = _check_class_names(class_names, localization)
    candidates = list(localization.problem_layers) or list(localization.ranking)
    groups = _candidate_groups(model, localization, candidates)
    chosen = confusion_pairs(localization.error_labels, localization.error_predictions, top)
    if not chosen:
        return Diagnosis(
            [],
            candidates,
            localization.num_errors,
            "no misclassified examples: no confusion to diagnose",
        )

    params = [p for name in candidates for p in groups[name]]
    pairs_only = [pair for pair, _ in chosen]
    sums, counts = pair_gradients(model, loader, pairs_only, params, device)
    pairs = []
    for (t, p), pair_sums, count in zip(pairs_only, sums, counts):
        norms, offset = {}, 0
        for name in candidates:
            block = pair_sums[offset : offset + len(groups[name])]
            offset += len(groups[name])
            norms[name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in block))
            norms[name] /= max(count, 1)
        layer = max(candidates, key=lambda name: norms[name]) if count else None
        pairs.append(ConfusionPair(t, p, count, names(t), names(p), layer, norms))
    message = (
        f"top {len(pairs)} confusion pairs of {localization.num_errors} errors, attributed among "
        f"{', '.join(candidates)}"
    )
    return Diagnosis(pairs, candidates, localization.num_errors, message)


def pair_gradients(model, loader, pairs, params, device=None):
    """Per (true, predicted) pair: summed loss gradients on its errors, and its error count.

    One pass over ``loader``; sums and counts are all-reduced under torch.distributed.
    Returns ``(sums, counts)``: ``sums[i][j]`` is the gradient w.r.t. ``params[j]`` of the sum
    of cross-entropies over the examples of ``pairs[i]``.
    """
    device = _data.model_device(model, device)
    order = _data.loader_order(loader)  # to skip DistributedSampler's repeated examples
    offset = 0
    pair_index = {pair: i for i, pair in enumerate(pairs)}
    sums = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in pairs]
    counts = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    with _data.evaluation(model, params):
        for batch in loader:
            inputs, labels, preds = _data.classify_batch(model, batch, device)
            valid = order.valid(offset, len(labels), device)
            offset += len(labels)
            real = [True] * len(labels) if valid is None else valid.tolist()
            members = {}
            for row, pair in enumerate(zip(labels.tolist(), preds.tolist())):
                if pair in pair_index and real[row]:
                    members.setdefault(pair_index[pair], []).append(row)
            if not members:
                continue
            rows = torch.tensor([r for rs in members.values() for r in rs], device=device)
            losses = F.cross_entropy(
                _data.logits_of(model, _data.select(inputs, rows)).float(),
                labels[rows],
                reduction="none",
            )
            start = 0
            for n, (index, rs) in enumerate(members.items()):
                part = losses[start : start + len(rs)].sum()
                start += len(rs)
                grads = _data.gradients(part, params, retain_graph=n < len(members) - 1)
                for total, grad in zip(sums[index], grads):
                    total.add_(grad)
                counts[index] += len(rs)
    for tensor in [t for pair_sums in sums for t in pair_sums]:
        all_reduce_sum_(tensor)
    all_reduce_sum_(counts)
    return sums, [int(c) for c in counts.tolist()]


def _check_class_names(class_names, localization):
    if class_names is None:
        return str
    class_names = list(class_names)
    used = localization.error_labels + localization.error_predictions
    if used and max(used) >= len(class_names):
        raise ValueError(
            f"class_names has {len(class_names)} names but the errors use class {max(used)}"
        )
    return lambda index: str(class_names[index])


def _candidate_groups(model, localization, candidates) -> dict:
    """The localized groups' parameters, looked up again by name when ``model`` is another one."""
    owned = {id(p) for p in model.parameters()}
    stored = localization.groups or {}
    if stored and all(id(p) in owned for name in candidates for p in stored.get(name, [None])):
        return {name: stored[name] for name in candidates}
    return resolve_groups(model, candidates, argument="localization groups")
