"""Step 2, Localize: which layer groups the failures pull on (the paper, Sec. 5.3), and how sure.

The paper's signal: the gradient of the mean cross-entropy over the misclassified examples
*only*, model in eval mode, its L2 norm per layer group; groups above the median are the
"problem layers". That norm grows with a group's size and with the failures' loss, so on its
own it says "big layers, large loss" as much as "layers specific to the errors". Hence:

- ``criterion="specificity"`` cancels both: per *cell* (a few failures and as many other
  examples from the same batch), the ratio of each group's gradient norm on the failures to
  its norm on the other examples, over the geometric mean of that ratio across groups; the
  geometric mean over cells.
- ``criterion="probe"`` measures what a user wants to know: how much a short, fixed training
  budget on that group alone lowers the loss on the failures (and, beside it, on the others).
- For every criterion, an interval and a one-sided p-value per group against the null "the
  failures pull on this group no more than other examples do", from the same pass (exact
  sign-flip test over cells, see :mod:`._stats`), and ``rule="significant"`` (Holm-corrected).

Distributed: each rank sums losses over its own failures, and the summed gradients and the
counts are all-reduced before any norm is taken, so with a DistributedSampler every rank gets
the single-process norms (up to the examples DistributedSampler repeats to even out the
shards). Cells are cut within each rank's batches, so specificity, intervals and p-values
depend on batching (as they would on a different batch size in one process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from statistics import median

import torch
from torch import nn

from .._distributed import all_gather_objects, all_reduce_sum_, is_distributed
from .._validation import check_int, check_level, check_seed
from . import _data, _stats
from ._report import PRIVATE, Report, format_interval, markdown_table
from ._surgery import progress_bar
from ._task import Task, batch_units, flat_mask, streamed_gradients
from .groups import parameter_names, resolve_groups

CRITERIA = ("grad_norm", "relative", "rms", "friction", "specificity", "probe")
RULES = ("median", "topk", "gap", "significant")
GRADIENT_CRITERIA = ("grad_norm", "relative", "rms", "specificity")


def select_problem_layers(
    values: dict, rule: str = "median", k: int = 3, p_values: dict | None = None,
    alpha: float = 0.05,
) -> list:  # fmt: skip
    """Names of the flagged groups, largest value first.

    Rules: "median" flags values strictly above the median of all values (the paper's rule:
    3 of 7 ResNet-18 groups); "topk" the ``k`` largest; "gap" everything before the largest
    drop between consecutive values sorted in decreasing order; "significant" the groups whose
    (already multiplicity-adjusted) ``p_values`` are below ``alpha``. Nothing is flagged when
    every value is 0 (e.g. no misclassified example).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    check_int("k", k, 1)
    check_level(alpha)
    ranking = sorted(values, key=lambda name: values[name], reverse=True)
    if not ranking or all(values[name] == 0 for name in ranking):
        return []
    if rule == "significant":
        if p_values is None:
            raise ValueError("rule='significant' needs p_values")
        return [name for name in ranking if p_values.get(name) is not None
                and p_values[name] < alpha]  # fmt: skip
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
    """What one pass over a loader collects: summed gradients on failures and on references.

    ``error_sums[i]`` is the gradient of the *sum* of losses (cross-entropy unless a
    ``loss_fn`` is given) over all failures (by default the misclassified examples or
    positions) w.r.t. ``params[i]`` (all-reduced over ranks); ``correct_sums`` the same over the
    reference sample (units that are not failures, as many per batch as the batch has failures,
    at most all of them), or None unless ``reference_sums=True`` was asked for. Divide by the
    counts for gradients of means.

    The cells: ``cell_failure_norms[c, j]`` (``cell_reference_norms``) is the L2 norm over
    group ``j``'s parameters of the gradient of the mean loss on cell ``c``'s failures (its
    references); ``cell_failure_indices[c]`` / ``cell_reference_indices[c]`` say which
    examples (dataset indices or positions, as ``index_kind``). ``examples``: with
    ``keep_examples``, ``(kind, cell, inputs, labels)`` chunks of the failures ("failure", cell
    -1 for failures not paired in a cell) and references, for the probe.
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
    cell_failure_norms: torch.Tensor = field(default=None, metadata=PRIVATE)
    cell_reference_norms: torch.Tensor = field(default=None, metadata=PRIVATE)
    cell_failure_indices: list = field(default_factory=list)
    cell_reference_indices: list = field(default_factory=list)
    examples: list = field(default_factory=list, metadata=PRIVATE)
    task: Task = field(default_factory=Task, metadata=PRIVATE)
    unit: str = "examples"  # what can fail: "examples", or "positions" for sequence tasks


def error_gradients(
    model: nn.Module, loader, params, device=None, *, group_rows=None, failures=None,
    blocks: int = 32, seed: int = 0, keep_examples: bool = False, progress=None,
    ignore_index: int | None = -100, shift_labels: bool = False, loss_fn=None,
    reference_sums: bool = False,
) -> ErrorGradients:  # fmt: skip
    """One pass over ``loader``: find the failures and sum their loss gradients w.r.t. ``params``.

    Args:
        group_rows: per group, the positions in ``params`` of its parameters (default: one
            group of all); the cell norms are per group.
        failures, ignore_index, shift_labels, loss_fn: see :func:`localize`.
        blocks: about how many cells to cut (at least one per batch with a failure and a
            reference; a cell holds at least one failure).
        seed: draws which failures and references form each cell.
        reference_sums: also sum the references' gradients (``correct_sums``; else None). It
            costs a second fp32 accumulator the size of ``params``; no criterion needs it.

    Memory: one fp32 accumulator per parameter of ``params`` (two with ``reference_sums``),
    each gradient added in and freed as autograd produces it (one parameter's gradient at a
    time), and one forward pass over a cell's examples; only ``params`` require grad during
    the pass, and ``.grad`` fields are set aside and put back (both restored after).

    Indices: dataset indices, sorted, when the loader's order is reproducible (a DataLoader with
    a SequentialSampler or DistributedSampler, ``index_kind="dataset"``); otherwise positions in
    this pass's iteration order (``index_kind="position"``; under torch.distributed each rank's
    positions, concatenated in rank order). For per-position tasks each unit is
    ``(index, position)``, the position in the labels as given (after ``shift_labels``, the
    label the logits predict). Examples DistributedSampler repeats to even out the shards are
    skipped, so a sharded pass counts each example once.
    """
    task = Task.of(ignore_index, shift_labels, loss_fn)
    device = _data.model_device(model, device)
    order = _data.loader_order(loader)
    group_rows = [list(range(len(params)))] if group_rows is None else group_rows
    select_failures = _FailureSelector(failures, loader, order)
    try:
        batches = len(loader)
    except TypeError:
        batches = None
    check_int("blocks", blocks, 1)
    cells_per_batch = max(1, math.ceil(blocks / batches)) if batches else 1
    generator = torch.Generator().manual_seed(seed)

    error_sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    correct_sums = [torch.zeros_like(p, dtype=torch.float32) for p in params] if (
        reference_sums) else None  # fmt: skip
    positions, labels_wrong, preds_wrong = [], [], []
    cell_f, cell_r, cell_f_pos, cell_r_pos, examples = [], [], [], [], []
    offset = seen = errors = correct = 0
    any_units = per_position = False
    with _data.evaluation(model, params):
        for batch in progress_bar(loader, progress, "localize", total=batches):
            inputs, labels, units = batch_units(model, task, batch, device)
            count = units.shape[0]
            is_fail = select_failures(units, offset)
            valid = order.valid(offset, count, device)
            real = units.valid if valid is None else units.valid & valid[:, None]
            any_units = any_units or bool(units.valid.any())
            per_position = per_position or units.per_position
            is_fail = is_fail & real
            is_ref = ~is_fail & real
            fail = is_fail.flatten().nonzero().flatten()
            ref = is_ref.flatten().nonzero().flatten()
            width = units.shape[1]

            def where(flat, batch_offset=offset, width=width, units=units):
                rows, cols = (flat // width).tolist(), (flat % width).tolist()
                if not units.per_position:
                    return [batch_offset + r for r in rows]
                return [(batch_offset + r, c + units.label_offset) for r, c in zip(rows, cols)]

            positions += where(fail)
            if units.labels is not None:
                labels_wrong += units.labels.flatten()[fail].tolist()
                preds_wrong += units.predictions.flatten()[fail].tolist()
            else:
                labels_wrong += [None] * len(fail)
                preds_wrong += [None] * len(fail)
            offset += count
            seen += int(real.sum())
            if len(fail) == 0:
                continue
            if keep_examples and units.per_position:
                raise ValueError("criterion='probe' needs a per-example task (one unit per "
                                 "example), got per-position units")  # fmt: skip
            fail = fail[torch.randperm(len(fail), generator=generator).to(device)]
            ref = ref[torch.randperm(len(ref), generator=generator).to(device)]
            paired = min(len(fail), len(ref))
            start = 0
            for size in _stats.split_evenly(paired, cells_per_batch) if paired else []:
                cell = len(cell_f)
                for chosen, sums, norms, stored, kind in (
                    (fail[start : start + size], error_sums, cell_f, cell_f_pos, "failure"),
                    (ref[start : start + size], correct_sums, cell_r, cell_r_pos, "reference"),
                ):
                    mask = flat_mask(units.shape, chosen)
                    squares = streamed_gradients(model, task, inputs, labels, mask, params, sums)
                    norms.append(_stats.norms_from_squares(squares, group_rows, size))
                    stored.append(where(chosen))
                    if keep_examples:
                        rows = chosen // width
                        examples.append((kind, cell, _detach(inputs, rows),
                                         _data.select(labels, rows)))  # fmt: skip
                start += size
            rest = fail[paired:]
            if len(rest):  # failures beyond the references of their batch: sums only
                mask = flat_mask(units.shape, rest)
                streamed_gradients(model, task, inputs, labels, mask, params, error_sums)
                if keep_examples:
                    rows = rest // width
                    examples.append(("failure", -1, _detach(inputs, rows),
                                     _data.select(labels, rows)))  # fmt: skip
            errors += len(fail)
            correct += paired
    select_failures.finish(offset)
    for tensor in error_sums + (correct_sums or []):
        all_reduce_sum_(tensor)
    counts = all_reduce_sum_(
        torch.tensor([seen, errors, correct, any_units], dtype=torch.float64, device=device)
    )
    if offset and not counts[3]:
        raise ValueError(
            f"ignore_index={task.ignore_index} removes every label: no example or position "
            "is left to score"
        )
    index_kind, indices, labels_wrong, preds_wrong = _data.gather_in_dataset_order(
        order, positions, labels_wrong, preds_wrong
    )
    to_index = _data.index_of(order)
    cell_f_pos = [[to_index(p) for p in rows] for rows in cell_f_pos]
    cell_r_pos = [[to_index(p) for p in rows] for rows in cell_r_pos]
    groups = len(group_rows)
    failure_norms = torch.stack(cell_f).cpu() if cell_f else torch.zeros(0, groups)
    reference_norms = torch.stack(cell_r).cpu() if cell_r else torch.zeros(0, groups)
    if is_distributed():  # every rank's cells, in rank order
        parts = all_gather_objects((failure_norms, reference_norms, cell_f_pos, cell_r_pos))
        failure_norms = torch.cat([part[0] for part in parts])
        reference_norms = torch.cat([part[1] for part in parts])
        cell_f_pos = [rows for part in parts for rows in part[2]]
        cell_r_pos = [rows for part in parts for rows in part[3]]
    seen, errors, correct = (int(c) for c in counts[:3].tolist())
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
        cell_failure_norms=failure_norms.double(),
        cell_reference_norms=reference_norms.double(),
        cell_failure_indices=cell_f_pos,
        cell_reference_indices=cell_r_pos,
        examples=examples,
        task=task,
        unit="positions" if per_position else "examples",
    )


class _FailureSelector:
    """``failures`` (None, a callable or a bool mask) as ``(units, offset) -> [batch, positions]``.

    A mask is ``[examples]`` (per-example tasks) or ``[examples, positions]`` (per-position
    tasks, positions of the labels as given), indexed by dataset index or by position.
    """

    def __init__(self, failures, loader, order):
        self.failures, self.order, self.mask = failures, order, None
        if failures is None or callable(failures):
            return
        mask = failures if isinstance(failures, torch.Tensor) else torch.as_tensor(failures)
        if mask.dtype != torch.bool or mask.dim() not in (1, 2):
            raise ValueError(
                "failures must be None, a callable (logits, labels) -> bool mask, or a bool "
                "mask over the loader's examples ([examples], or [examples, positions] for "
                f"per-position tasks); got a {mask.dtype} tensor of shape {tuple(mask.shape)}"
            )
        dataset = getattr(loader, "dataset", None)
        if order.indices is not None and dataset is not None and len(mask) != len(dataset):
            raise ValueError(
                f"failures mask has {len(mask)} entries but the loader's dataset has "
                f"{len(dataset)} examples (the mask is indexed by dataset index)"
            )
        self.mask = mask.cpu()

    def __call__(self, units, offset):
        if self.failures is None:
            if units.predictions is None:
                raise ValueError(
                    "no default failures: the labels are not class indices laid out like "
                    "loss_fn's losses, so predictions cannot be compared with them; pass "
                    "failures="
                )
            return units.predictions != units.labels
        if self.mask is None:
            chosen = self.failures(units.logits, units.targets)
            chosen = torch.as_tensor(chosen, device=units.valid.device)
            expected = units.shape if units.per_position else units.shape[:1]
            if chosen.dtype != torch.bool or tuple(chosen.shape) != tuple(expected):
                raise ValueError(
                    "failures(logits, labels) must return a bool tensor of shape "
                    f"{tuple(expected)}, got {chosen.dtype} {tuple(chosen.shape)}"
                )
            return chosen.view(units.shape)
        count = units.shape[0]
        if self.order.indices is not None:
            rows = torch.tensor(self.order.indices[offset : offset + count], dtype=torch.long)
        else:
            if offset + count > len(self.mask):
                raise ValueError(
                    f"failures mask has {len(self.mask)} entries but the loader yields more "
                    "examples (the mask is indexed by position in the loader's order)"
                )
            rows = torch.arange(offset, offset + count)
        chosen = self.mask[rows]
        if chosen.dim() == 1:
            if units.per_position:
                raise ValueError(
                    "failures mask is [examples] but the task is per position: give "
                    "[examples, positions]"
                )
            return chosen.to(units.valid.device)[:, None]
        chosen = chosen[:, units.label_offset :]
        if not units.per_position or chosen.shape != units.valid.shape:
            raise ValueError(
                f"failures mask gives {tuple(chosen.shape[1:])} positions per example, the "
                f"batch's units are {units.shape[1]} per example"
            )
        return chosen.to(units.valid.device)

    def finish(self, seen_positions: int) -> None:
        if self.mask is not None and self.order.indices is None and seen_positions != len(
            self.mask
        ):
            raise ValueError(
                f"failures mask has {len(self.mask)} entries but the loader yielded "
                f"{seen_positions} examples"
            )


def _detach(inputs, rows):
    chosen = _data.select(inputs, rows)
    if isinstance(chosen, torch.Tensor):
        return chosen.detach()
    return chosen


def _norm(tensors) -> float:
    # per tensor an fp32 norm; their squares are added in Python's double
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.float())) ** 2 for t in tensors))


@dataclass
class Localization(Report):
    """Result of :func:`localize`.

    ``norms``: the criterion's value per group. ``specificity``: the size-free statistic of
    every gradient pass (None without failures, references or a loader). ``effects``,
    ``intervals``, ``p_values``: the statistic the test is about (``effect`` names it; for
    the gradient criteria the specificity, for the probe the excess loss drop), its 95%
    bootstrap interval over cells and the one-sided sign-flip p-value; ``adjusted_p_values``
    are Holm-corrected over the groups (what ``rule="significant"`` compares with ``alpha``).
    """

    criterion: str
    rule: str
    alpha: float
    norms: dict  # {group: value of the criterion}, in group order
    problem_layers: list  # flagged groups, largest value first
    ranking: list  # all groups, largest value first
    grad_norms: dict  # {group: ||gradient of the mean loss on the failures||_2}, any criterion
    specificity: dict  # {group: size-free ratio, see localize}; None where undefined
    effect: str  # what effects / intervals / p_values are about
    effects: dict
    intervals: dict  # {group: (low, high) or None}
    p_values: dict  # {group: one-sided p or None}
    adjusted_p_values: dict  # Holm over groups
    num_examples: int  # examples scored, or positions (not ignore_index) for sequence tasks
    num_errors: int  # failures (by default the misclassified examples)
    correct_sample_size: int  # references: examples that are not failures, paired in cells
    num_cells: int
    error_indices: list
    index_kind: str  # "dataset" (dataset indices) or "position" (iteration order)
    error_labels: list
    error_predictions: list
    group_sizes: dict  # {group: number of parameter elements}
    probe: dict | None  # {group: {failure_loss_drop, reference_loss_rise, fixed, broken}}
    probe_cost: dict | None  # {steps per group, groups, lr, seconds (measured)}
    message: str
    groups: dict = field(default=None, repr=False, metadata=PRIVATE)  # {group: [parameters]}
    evidence: ErrorGradients = field(default=None, repr=False, metadata=PRIVATE)
    task: Task = field(default_factory=Task, repr=False, metadata=PRIVATE)  # how units scored

    def to_markdown(self) -> str:
        problems = set(self.problem_layers)
        headers = ["Group", "params", self.criterion]
        if self.criterion != "grad_norm":
            headers.append("grad norm on failures")
        if self.criterion not in ("specificity",):
            headers.append("specificity")
        if self.probe is not None:
            headers += ["loss rise on references", "fixed", "broken"]
        headers += [f"{self.effect} (95% interval)", "p (one-sided)", "p (Holm)", "Status"]
        rows = []
        for name in self.ranking:
            row = [name, self.group_sizes[name], self.norms[name]]
            if self.criterion != "grad_norm":
                row.append(self.grad_norms.get(name))
            if self.criterion not in ("specificity",):
                row.append(self.specificity.get(name))
            if self.probe is not None:
                probe = self.probe[name]
                row += [probe["reference_loss_rise"], probe["fixed"], probe["broken"]]
            row += [
                format_interval(self.effects.get(name), self.intervals.get(name)),
                self.p_values.get(name),
                self.adjusted_p_values.get(name),
                "Problem" if name in problems else "Normal",
            ]
            rows.append(row)
        return f"{self.message}\n\n{markdown_table(headers, rows)}"


def localize(
    model: nn.Module,
    loader,
    groups=None,
    criterion: str = "grad_norm",
    rule: str = "median",
    device=None,
    *,
    k: int = 3,
    alpha: float = 0.05,
    optimizer=None,
    failures=None,
    blocks: int = 32,
    seed: int = 0,
    probe_loader=None,
    probe_steps: int = 20,
    probe_lr: float = 0.01,
    progress: bool | None = None,
    ignore_index: int | None = -100,
    shift_labels: bool = False,
    loss_fn=None,
) -> Localization:
    """Rank layer groups by how much the failures pull on them, with an interval and a p-value.

    Args:
        model: a classifier returning logits; put in eval mode for the pass and restored after.
            Its parameters, ``.grad`` fields and ``requires_grad`` flags are left as they were.
        loader: yields ``(inputs, labels)``; may be None only for ``criterion="friction"``.
            Use data the model was not trained on, and verify on other data (see
            :func:`split_halves`): choosing layers and checking them on the same images
            overstates the repair.
        groups: None (``layer_groups(model)``), group names, or ``{name: [parameters]}``.
        criterion:
            "grad_norm": ||g||_2 of the mean loss on the failures, the paper's. Grows with the
            group's size and the failures' loss.
            "relative": ||g|| / ||theta|| (Auto-RGN of Lee et al. 2023); "rms": ||g|| /
            sqrt(elements).
            "specificity": in each cell (``c``: a few failures and as many references, i.e.
            examples that are not failures, from one batch), with ``e_cj`` / ``r_cj`` group
            ``j``'s gradient norm of the mean loss on the cell's failures / references,
            ``s_cj = (e_cj / r_cj) / geomean_i(e_ci / r_ci)``: its share of the failures' pull
            over its share of the references', shares taken against the geometric mean over
            groups. The value is the geometric mean of ``s_cj`` over cells. A factor per group
            (its size: ``e`` and ``r`` both grow with it) and a factor per cell (the failures'
            larger loss) cancel exactly, so 1 means "the failures pull on this group, relative
            to the other groups, as other examples do", and > 1 more.
            "probe": for each group alone, on a copy, ``probe_steps`` steps of PhysicsSGD at
            ``probe_lr`` on ``probe_loader`` (the training data; same batches for every group),
            then the drop of the mean loss on the failures (the value), beside the rise on the
            references (side effects) and the failures fixed / references broken. It answers
            "which group is worth retraining" directly, at a cost of groups x ``probe_steps``
            training steps plus one forward pass over the failures and references per group
            (``probe_cost`` holds the measured seconds).
            "friction": accumulated iKFAD friction per element of the group, averaged over the
            group's elements (the paper's Method B; needs ``optimizer=`` the
            :class:`dampopt.iKFAD` the model was trained with; with ``loader=None`` there are no
            failures and no test).
        rule: "median", "topk" (with ``k``), "gap" (see :func:`select_problem_layers`) or
            "significant": the groups whose Holm-adjusted p-value is below ``alpha``.
        failures: which units (examples, or positions of a sequence task) to explain. None:
            the misclassified ones (argmax differs from the label); a bool mask over the
            loader's examples, ``[examples]`` or ``[examples, positions]`` (by dataset index
            when the loader's order is reproducible, else by position); or a callable
            ``(logits, labels) -> bool mask`` applied to each batch (``[batch]`` or ``[batch,
            positions]``, what the loss sees: after ``shift_labels``; with ``loss_fn`` the
            model's output, or its ``.logits``, and the batch's labels). The references are
            drawn from the other units of the same batch. Ignored labels are neither.
        ignore_index: labels equal to it are skipped everywhere: no loss, never a failure or
            reference, not counted (default -100, HF's). None: every label counts.
        shift_labels: for HF causal LMs, whose labels equal ``input_ids``: logits at position
            ``t`` are scored against the label at ``t + 1`` (as the model's own loss does).
        loss_fn: custom tasks: ``loss_fn(outputs, labels)`` returns per-example ``[batch]`` or
            per-position ``[batch, positions]`` losses (``outputs``: what the model returned);
            the gradients are of their sums. Give ``failures=`` unless the labels are class
            indices laid out like the losses (then argmax of ``.logits`` decides).
        blocks: about how many cells to cut in total (``ceil(blocks / len(loader))`` per batch,
            each with at least one failure). With ``n`` cells the smallest attainable p-value is
            ``2**-n`` (exact test up to 16 cells, Monte Carlo above).
        seed: which failures and references form the cells, the bootstrap and Monte Carlo draws,
            and the probe's batch order.
        device: where batches go (default: the device of the model's parameters).
        progress: tqdm bars; None: when stderr is a terminal.

    The test, for every criterion: in each cell ``d_cj = log s_cj`` (gradient criteria: the
    same test for grad_norm, relative, rms and specificity), or the failures' minus the
    references' loss
    drop after the probe, each example's drop centred on its mean over groups (probe).
    Exchanging a cell's failures and references negates ``d``, so under the null "the failures
    pull on this group no more than other examples do", taken as "a cell's failures and
    references are exchangeable", it is symmetric around 0 and the sign-flip test of its mean
    is exact (as for failures drawn at random); for the weaker null of a zero mean it is
    approximate, and good with many cells. Extra memory: cells x groups numbers (plus, for the
    probe, the failure and reference inputs and one model copy at a time).

    Indices (``error_indices``): dataset indices when the loader's order is reproducible
    (``index_kind="dataset"``), else positions in the pass's iteration order; see
    :func:`error_gradients`; for per-position tasks each is ``(index, position)``. Pass the
    bare module, not one wrapped for FSDP (DDP and DataParallel wrappers are unwrapped).

    Cost: one forward pass without grad over the loader, then per cell a forward and backward
    over the examples holding its units; only the requested groups' parameters require grad
    meanwhile (so nothing below the first of them is differentiated), and the extra memory is
    one fp32 accumulator per requested parameter (each gradient is added in and freed as
    autograd produces it) plus a forward pass over a cell's examples.
    """
    model = _data.unwrap(model)
    task = Task.of(ignore_index, shift_labels, loss_fn)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    select_problem_layers({}, rule, k, alpha=alpha)  # validates rule, k, alpha before any work
    if criterion == "friction" and not hasattr(optimizer, "friction_summary"):
        raise ValueError(
            "criterion='friction' needs optimizer= an iKFAD optimizer (friction_summary)"
        )
    if loader is None and criterion != "friction":
        raise ValueError(f"loader is required for criterion={criterion!r}")
    check_seed(seed)
    if criterion == "probe":
        from .probe import check_probe_arguments

        check_probe_arguments(probe_loader, probe_steps, probe_lr)
        if shift_labels or loss_fn is not None:
            raise ValueError(
                "criterion='probe' scores examples by cross-entropy: it takes neither "
                "shift_labels nor loss_fn"
            )
    groups = resolve_groups(model, groups)
    names = list(groups)
    params = _unique(p for ps in groups.values() for p in ps)
    sizes = {name: sum(p.numel() for p in ps) for name, ps in groups.items()}
    position = {id(p): i for i, p in enumerate(params)}
    group_rows = [[position[id(p)] for p in _unique(ps)] for ps in groups.values()]

    if loader is not None:
        found = error_gradients(
            model, loader, params, device, group_rows=group_rows, failures=failures,
            blocks=blocks, seed=seed, keep_examples=criterion == "probe", progress=progress,
            ignore_index=ignore_index, shift_labels=shift_labels, loss_fn=loss_fn,
        )  # fmt: skip
    else:
        found = _no_pass(params, len(names), task)
    grad_norms = {}
    for name, rows in zip(names, group_rows):
        grad_norms[name] = _norm(found.error_sums[i] for i in rows) / max(found.num_errors, 1)

    d = _stats.share_log_ratio(found.cell_failure_norms, found.cell_reference_norms)
    specificity, spec_intervals, spec_p = _stats.effect_summary(d, names, seed, ratio=True)
    effect = "specificity"
    effects, intervals, p_values = specificity, spec_intervals, spec_p
    probe = probe_cost = None

    if criterion == "friction":
        norms = _friction_values(model, groups, optimizer)
    elif criterion == "grad_norm":
        norms = dict(grad_norms)
    elif criterion == "relative":
        norms = {}
        for name, ps in groups.items():
            weight = _norm(p.detach() for p in ps)
            norms[name] = grad_norms[name] / weight if weight > 0 else 0.0
    elif criterion == "rms":
        norms = {name: grad_norms[name] / math.sqrt(max(sizes[name], 1)) for name in groups}
    elif criterion == "specificity":
        norms = {name: specificity[name] or 0.0 for name in names}
    else:
        from .probe import probe_groups

        outcome = probe_groups(
            model, groups, found, probe_loader, steps=probe_steps, lr=probe_lr, seed=seed,
            device=device, progress=progress,
        )  # fmt: skip
        probe, probe_cost = outcome.per_group, outcome.cost
        norms = {name: probe[name]["failure_loss_drop"] for name in names}
        effect = "excess loss drop"
        effects, intervals, p_values = _stats.effect_summary(
            outcome.cell_differences, names, seed, ratio=False
        )
    adjusted = _stats.holm(p_values)
    problem_layers = select_problem_layers(norms, rule, k, adjusted, alpha)
    ranking = sorted(norms, key=lambda name: norms[name], reverse=True)
    what = "misclassified" if failures is None else "failures:"
    message = _message(found, loader, criterion, rule, alpha, problem_layers, len(groups), what)
    return Localization(
        criterion=criterion,
        rule=rule,
        alpha=float(alpha),
        norms=norms,
        problem_layers=problem_layers,
        ranking=ranking,
        grad_norms=grad_norms,
        specificity=specificity,
        effect=effect,
        effects=effects,
        intervals=intervals,
        p_values=p_values,
        adjusted_p_values=adjusted,
        num_examples=found.num_examples,
        num_errors=found.num_errors,
        correct_sample_size=found.num_correct_sample,
        num_cells=len(found.cell_failure_norms),
        error_indices=found.error_indices,
        index_kind=found.index_kind,
        error_labels=found.error_labels,
        error_predictions=found.error_predictions,
        group_sizes=sizes,
        probe=probe,
        probe_cost=probe_cost,
        message=message,
        groups=groups,
        evidence=found,
        task=task,
    )


def _unique(params) -> list:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _no_pass(params, groups: int, task: Task) -> ErrorGradients:
    zeros = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    empty = torch.zeros(0, groups, dtype=torch.float64)
    return ErrorGradients(params, zeros, None, 0, 0, 0, [], [], [], "position", empty, empty,
                          task=task)  # fmt: skip


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


def _message(found, loader, criterion, rule, alpha, problem_layers, num_groups, what) -> str:
    if loader is None:
        where = "no loader given: failures not examined, no test"
    elif found.num_errors == 0:
        where = f"no {what} {found.unit} among {found.num_examples}: nothing to localize"
        if criterion != "friction":
            return where
    else:
        cells = len(found.cell_failure_norms)
        where = (
            f"{found.num_errors} {what.rstrip(':')} of {found.num_examples} {found.unit}, "
            f"{found.num_correct_sample} references in {cells} cells"
        )
    how = f"{criterion}, rule {rule}" + (f" (Holm-adjusted p < {alpha:g})" if rule ==
                                          "significant" else "")  # fmt: skip
    return f"{where}; {len(problem_layers)} of {num_groups} groups flagged by {how}"
