"""Step 3, Diagnose: which confusions the errors are, and which group each one loads, if any.

The paper's Table 9: the most frequent (true, predicted) pairs among the misclassified examples,
each attributed to the flagged layer group whose gradient of the mean loss on *that pair's*
errors has the largest L2 norm. That norm follows group size, so here a pair is attributed with
the size-free statistic of :func:`localize` (``criterion="specificity"``): per cell, a few of
the pair's errors and as many correctly classified examples of the same batch, the ratio of
each group's gradient norm on the errors to its norm on the correct examples, over the
geometric mean of that ratio across groups; the geometric mean over cells, with a 95%
bootstrap interval. The pair is attributed to the leading candidate only when the leader's
minus the runner-up's per-cell value (paired: both come from the same cells) is positive by
the sign-flip test at one-sided p < 0.025; otherwise it is "not distinguishable" and no group
is named. The feature interpretation ("texture", "shape") is the reader's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .._distributed import all_gather_objects, all_reduce_sum_, is_distributed
from .._validation import check_int
from . import _data, _stats
from ._report import Report, format_interval, markdown_table
from ._surgery import progress_bar
from ._task import Task, batch_units, flat_mask, unit_gradients
from .groups import resolve_groups
from .localize import Localization


@dataclass(frozen=True)
class ConfusionPair(Report):
    true: int
    predicted: int
    count: int  # errors of this pair found in the diagnose pass
    true_name: str
    predicted_name: str
    attributed_layer: str | None  # None: no error in the pass, or not distinguishable
    grad_norms: dict  # {candidate: ||gradient of the mean loss on this pair's errors||_2}
    specificity: dict  # {candidate: size-free ratio (geometric mean over cells) or None}
    intervals: dict  # {candidate: 95% bootstrap interval or None}
    distinguishable: bool  # leader minus runner-up, paired over cells: one-sided p < 0.025
    leading: list  # the (up to) two candidates with the largest specificity
    cells: int


@dataclass
class Diagnosis(Report):
    pairs: list  # ConfusionPair, most frequent first
    candidate_groups: list  # the groups pairs are attributed among
    num_errors: int
    message: str

    def to_markdown(self) -> str:
        rows = []
        for p in self.pairs:
            layer = p.attributed_layer
            if layer is None and p.count:
                layer = "not distinguishable"
            evidence = "; ".join(
                f"{name} {format_interval(p.specificity.get(name), p.intervals.get(name))}"
                for name in p.leading
            )
            rows.append((p.true_name, p.predicted_name, p.count, layer, evidence or None, p.cells))
        table = markdown_table(
            ["True", "Predicted", "Count", "Attributed layer",
             "specificity [95% interval], leading two", "cells"],
            rows,
        )  # fmt: skip
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
    *,
    blocks: int = 32,
    seed: int = 0,
    progress: bool | None = None,
) -> Diagnosis:
    """Most frequent confusion pairs of ``localization``'s errors, each with its layer if clear.

    The pairs are chosen from the errors ``localization`` found; one pass over ``loader`` then
    cuts, per pair, cells of the pair's errors and as many correctly classified examples of the
    same batch (``ceil(blocks / len(loader))`` cells per batch at most) and computes every
    group's specificity (see the module docstring). The candidates are the flagged groups (all
    groups when none was flagged); the centring is over all of ``localization``'s groups. Pass
    the loader that was localized. Sums and counts are all-reduced under torch.distributed;
    the cells depend on batching.

    The units and their scoring are ``localization``'s (its ``ignore_index``, ``shift_labels``
    and ``loss_fn``): for a language model the pairs are (label token, predicted token) over
    positions.

    Args:
        class_names: optional names by class (or token) id: a sequence, a mapping or a callable
            such as ``tokenizer.convert_ids_to_tokens``; defaults to the ids.
        blocks, seed: as for :func:`localize`.
    """
    model = _data.unwrap(model)
    if not isinstance(localization, Localization):
        raise TypeError(f"localization must be a Localization, got {type(localization).__name__}")
    check_int("top", top, 1)
    check_int("blocks", blocks, 1)
    if any(label is None for label in localization.error_labels):
        raise ValueError(
            "diagnose needs class labels and predictions: this localization's task "
            "(loss_fn with labels that are not class indices) has none"
        )
    names = _check_class_names(class_names, localization)
    candidates = list(localization.problem_layers) or list(localization.ranking)
    everything = list(localization.ranking)
    groups = _candidate_groups(model, localization, everything)
    chosen = confusion_pairs(localization.error_labels, localization.error_predictions, top)
    if not chosen:
        return Diagnosis(
            [],
            candidates,
            localization.num_errors,
            "no misclassified examples: no confusion to diagnose",
        )

    params, group_rows, seen = [], [], {}
    for name in everything:
        rows = []
        for p in groups[name]:
            if id(p) not in seen:
                seen[id(p)] = len(params)
                params.append(p)
            rows.append(seen[id(p)])
        group_rows.append(rows)
    candidate_rows = [group_rows[everything.index(name)] for name in candidates]
    pairs_only = [pair for pair, _ in chosen]
    cells = _pair_cells(model, loader, pairs_only, params, group_rows, blocks, seed, device,
                        progress, localization.task)  # fmt: skip
    pairs = []
    for (t, p), (sums, count, d) in zip(pairs_only, cells):
        norms = {}
        for name, rows in zip(candidates, candidate_rows):
            norms[name] = math.sqrt(sum(float(torch.linalg.vector_norm(sums[i])) ** 2
                                        for i in rows))  # fmt: skip
            norms[name] /= max(count, 1)
        columns = [everything.index(name) for name in candidates]
        values, intervals, _ = _stats.effect_summary(d[:, columns] if len(d) else d,
                                                     candidates, seed, ratio=True,
                                                     with_p=False)  # fmt: skip
        ranked = sorted((name for name in candidates if values[name] is not None),
                        key=lambda name: values[name], reverse=True)  # fmt: skip
        leading = ranked[:2]
        clear = _distinguishable(leading, d, everything, len(candidates), seed)
        layer = leading[0] if count and clear else None
        pairs.append(ConfusionPair(t, p, count, names(t), names(p), layer, norms, values,
                                   intervals, clear, leading, len(d)))  # fmt: skip
    unclear = sum(1 for pair in pairs if pair.count and not pair.distinguishable)
    message = (
        f"top {len(pairs)} confusion pairs of {localization.num_errors} errors, attributed among "
        f"{', '.join(candidates)} by specificity; {unclear} not distinguishable (the two leading "
        "groups' paired difference not positive at one-sided p < 0.025)"
    )
    return Diagnosis(pairs, candidates, localization.num_errors, message)


def _distinguishable(leading, d, groups, num_candidates, seed) -> bool:
    """The leader's specificity is above the runner-up's: the sign-flip test of their paired
    per-cell difference (both come from the same cells) gives one-sided p < 0.025, the level of
    a 95% two-sided interval. Exact for few cells, where a bootstrap interval is too narrow
    (two cells of the same sign would exclude 0); with n cells p >= 2**-n, so it needs >= 6."""
    if num_candidates == 1:
        return len(leading) == 1
    if len(leading) < 2:
        return False
    first, second = (groups.index(name) for name in leading)
    p = _stats.sign_flip_p(d[:, first] - d[:, second], seed)
    return p is not None and p < 0.025


def _pair_cells(model, loader, pairs, params, group_rows, blocks, seed, device, progress,
                task):  # fmt: skip
    """Per pair: (summed loss gradients on its errors, error count, d[cells, groups])."""
    device = _data.model_device(model, device)
    order = _data.loader_order(loader)
    try:
        cells_per_batch = max(1, math.ceil(blocks / len(loader)))
    except TypeError:
        cells_per_batch = 1
    generator = torch.Generator().manual_seed(seed)
    pair_index = {pair: i for i, pair in enumerate(pairs)}
    sums = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in pairs]
    counts = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    cell_f = [[] for _ in pairs]
    cell_r = [[] for _ in pairs]
    offset = 0
    with _data.evaluation(model, params):
        for batch in progress_bar(loader, progress, "diagnose"):
            inputs, labels, units = batch_units(model, task, batch, device)
            _check_classes(units)
            valid = order.valid(offset, units.shape[0], device)
            offset += units.shape[0]
            real = units.valid if valid is None else units.valid & valid[:, None]
            truth, preds = units.labels.flatten(), units.predictions.flatten()
            real = real.flatten()
            right = ((preds == truth) & real).nonzero().flatten()
            for (t, p), index in pair_index.items():
                rows = ((truth == t) & (preds == p) & real).nonzero().flatten()
                if len(rows) == 0:
                    continue
                rows = rows[torch.randperm(len(rows), generator=generator).to(device)]
                counts[index] += len(rows)
                paired = min(len(rows), len(right))
                # this pair's references: disjoint slices of one fresh shuffle of the batch's
                # correct units, so that no reference is in two of the pair's cells
                refs = right[torch.randperm(len(right), generator=generator)[:paired].to(device)]
                start = 0
                for size in _stats.split_evenly(paired, cells_per_batch) if paired else []:
                    cell = slice(start, start + size)
                    for chosen, store, add in ((rows[cell], cell_f, True),
                                               (refs[cell], cell_r, False)):  # fmt: skip
                        mask = flat_mask(units.shape, chosen)
                        grads = unit_gradients(model, task, inputs, labels, mask, params)
                        if add:
                            for total, grad in zip(sums[index], grads):
                                total.add_(grad)
                        store[index].append(_stats.group_norms(grads, group_rows, size))
                    start += size
                if len(rows) > paired:
                    mask = flat_mask(units.shape, rows[paired:])
                    grads = unit_gradients(model, task, inputs, labels, mask, params)
                    for total, grad in zip(sums[index], grads):
                        total.add_(grad)
    for tensor in [t for pair_sums in sums for t in pair_sums]:
        all_reduce_sum_(tensor)
    all_reduce_sum_(counts)
    out = []
    for index in range(len(pairs)):
        f = torch.stack(cell_f[index]).cpu() if cell_f[index] else torch.zeros(0, len(group_rows))
        r = torch.stack(cell_r[index]).cpu() if cell_r[index] else torch.zeros(0, len(group_rows))
        if is_distributed():
            parts = all_gather_objects((f, r))
            f, r = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
        out.append((sums[index], int(counts[index]), _stats.share_log_ratio(f, r)))
    return out


def _check_classes(units) -> None:
    if units.labels is None:
        raise ValueError(
            "diagnose needs class labels and predictions (argmax of the logits); this task's "
            "labels are not class indices laid out like its losses"
        )


def pair_gradients(model, loader, pairs, params, device=None, *, ignore_index=-100,
                   shift_labels=False, loss_fn=None):  # fmt: skip
    """Per (true, predicted) pair: summed loss gradients on its errors, and its error count.

    One pass over ``loader``; sums and counts are all-reduced under torch.distributed.
    Returns ``(sums, counts)``: ``sums[i][j]`` is the gradient w.r.t. ``params[j]`` of the sum
    of losses over the units (examples or positions) of ``pairs[i]``. ``ignore_index``,
    ``shift_labels`` and ``loss_fn`` as for :func:`localize`.
    """
    task = Task.of(ignore_index, shift_labels, loss_fn)
    device = _data.model_device(model, device)
    order = _data.loader_order(loader)  # to skip DistributedSampler's repeated examples
    offset = 0
    pair_index = {pair: i for i, pair in enumerate(pairs)}
    sums = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in pairs]
    counts = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    with _data.evaluation(model, params):
        for batch in loader:
            inputs, labels, units = batch_units(model, task, batch, device)
            _check_classes(units)
            valid = order.valid(offset, units.shape[0], device)
            offset += units.shape[0]
            real = units.valid if valid is None else units.valid & valid[:, None]
            members = {}
            truth, preds = units.labels.flatten().tolist(), units.predictions.flatten().tolist()
            for unit, (pair, ok) in enumerate(zip(zip(truth, preds), real.flatten().tolist())):
                if pair in pair_index and ok:
                    members.setdefault(pair_index[pair], []).append(unit)
            if not members:
                continue
            for index, chosen in members.items():
                mask = flat_mask(units.shape, torch.tensor(chosen, device=device))
                grads = unit_gradients(model, task, inputs, labels, mask, params)
                for total, grad in zip(sums[index], grads):
                    total.add_(grad)
                counts[index] += len(chosen)
    for tensor in [t for pair_sums in sums for t in pair_sums]:
        all_reduce_sum_(tensor)
    all_reduce_sum_(counts)
    return sums, [int(c) for c in counts.tolist()]


def _check_class_names(class_names, localization):
    """``class_names`` as ``index -> str``: a sequence, a mapping (e.g. a tokenizer's id-to-token
    dict) or a callable (e.g. ``tokenizer.convert_ids_to_tokens``)."""
    if class_names is None:
        return str
    used = localization.error_labels + localization.error_predictions
    if callable(class_names):
        return lambda index: str(class_names(index))
    if isinstance(class_names, Mapping):
        missing = sorted({u for u in used if u not in class_names})
        if missing:
            raise ValueError(f"class_names has no name for class {missing[0]} (of the errors)")
        return lambda index: str(class_names[index])
    class_names = list(class_names)
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
