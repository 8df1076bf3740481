"""Step 5, Verify: what the treatment fixed and broke, and whether the difference is real.

``fixed``: wrong before, right after; ``new``: right before, wrong after. The exact two-sided
McNemar test asks whether ``fixed`` and ``new`` differ by more than chance: under the null each
discordant example is a fair coin, so ``p = min(1, 2 * P(Binomial(fixed + new, 1/2) <=
min(fixed, new)))``. For 62 fixed vs 40 new, p = 0.037.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .._validation import check_int, check_non_negative
from ._report import Report, markdown_table


def mcnemar_exact(fixed: int, new: int) -> float:
    """Exact two-sided McNemar p-value on the discordant counts (1.0 when there are none)."""
    for name, value in (("fixed", fixed), ("new", new)):
        check_int(name, value, 0)
    n = fixed + new
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(min(fixed, new) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def _as_labels(name: str, values, ignore_index=None, signs=True) -> torch.Tensor:
    tensor = torch.as_tensor(values).detach().cpu()
    if tensor.numel() == 0:
        return tensor.reshape(0).long()  # [] becomes float32 in torch: no dtype to judge
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.dim() == 0:
        raise ValueError(
            f"{name} must be a sequence of integer class indices ([examples] or [examples, "
            "positions])"
        )
    kept = tensor if ignore_index is None else tensor[tensor != ignore_index]
    if signs and kept.numel() and int(kept.min()) < 0:
        raise ValueError(f"{name} must hold class indices >= 0, got {int(kept.min())}")
    return tensor.long()


def check_predictions(labels, named_predictions: dict, num_classes: int | None = None,
                      ignore_index: int | None = None):  # fmt: skip
    """Labels and predictions as equal-length 1-D int64 tensors, after range checks.

    Labels and predictions may be ``[examples]`` or ``[examples, positions]`` (flattened
    row-major); entries whose label is ``ignore_index`` are dropped.
    """
    labels = _as_labels("labels", labels, ignore_index)
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    checked = {}
    for name, preds in named_predictions.items():
        preds = _as_labels(name, preds, signs=False)  # checked where the label is kept
        if preds.shape != labels.shape:
            raise ValueError(
                f"{name} has {preds.numel()} entries but labels has {labels.numel()}"
                + (f" (shapes {tuple(preds.shape)} and {tuple(labels.shape)})"
                   if preds.numel() == labels.numel() else "")
            )  # fmt: skip
        checked[name] = preds.flatten()
    labels = labels.flatten()
    if ignore_index is not None:
        kept = labels != ignore_index
        if not kept.any():
            raise ValueError(f"ignore_index={ignore_index} removes every label: nothing to verify")
        labels = labels[kept]
        checked = {name: preds[kept] for name, preds in checked.items()}
    for name, preds in checked.items():
        if preds.numel() and int(preds.min()) < 0:
            raise ValueError(f"{name} must hold class indices >= 0, got {int(preds.min())}")
    if num_classes is not None:
        for name, tensor in {"labels": labels, **checked}.items():
            if int(tensor.max()) >= num_classes:
                raise ValueError(f"{name} must be in [0, {num_classes}), got {int(tensor.max())}")
    return labels, checked


@dataclass
class Verification(Report):
    num_examples: int
    errors_before: int
    errors_after: int
    accuracy_before: float  # fraction in [0, 1]
    accuracy_after: float
    fixed: int  # wrong before, right after
    new: int  # right before, wrong after
    net: int  # fixed - new
    p_value: float  # exact two-sided McNemar on (fixed, new)
    fixed_indices: list  # positions in the given sequences
    new_indices: list

    def to_markdown(self) -> str:
        return markdown_table(
            ["Metric", "Before", "After"],
            [
                ("Accuracy", self.accuracy_before, self.accuracy_after),
                ("Total errors", self.errors_before, self.errors_after),
                ("Errors fixed", None, self.fixed),
                ("New errors", None, self.new),
                ("Net improvement", None, f"{self.net:+d}"),
                ("McNemar p (exact, two-sided)", None, self.p_value),
            ],
        )


def verify(
    labels, preds_before, preds_after, num_classes: int | None = None, *,
    ignore_index: int | None = -100,
) -> Verification:  # fmt: skip
    """Before/after comparison of two prediction vectors on the same examples.

    Args:
        labels, preds_before, preds_after: equal-shape sequences/tensors of class indices,
            ``[examples]`` or ``[examples, positions]`` (for example :func:`predict`'s outputs
            on a test set, before and after treatment).
        num_classes: if given, every value must be below it.
        ignore_index: entries whose label equals it are dropped before counting (HF's -100);
            ``fixed_indices`` / ``new_indices`` are positions among the kept entries, in
            row-major order.
    """
    labels, preds = check_predictions(
        labels, {"preds_before": preds_before, "preds_after": preds_after}, num_classes,
        ignore_index,
    )  # fmt: skip
    right_before = preds["preds_before"] == labels
    right_after = preds["preds_after"] == labels
    fixed = (~right_before & right_after).nonzero().flatten().tolist()
    new = (right_before & ~right_after).nonzero().flatten().tolist()
    n = labels.numel()
    return Verification(
        num_examples=n,
        errors_before=int((~right_before).sum()),
        errors_after=int((~right_after).sum()),
        accuracy_before=float(right_before.sum()) / n,
        accuracy_after=float(right_after.sum()) / n,
        fixed=len(fixed),
        new=len(new),
        net=len(fixed) - len(new),
        p_value=mcnemar_exact(len(fixed), len(new)),
        fixed_indices=fixed,
        new_indices=new,
    )


@dataclass
class TreatmentComparison(Report):
    """Two corrected models on the same examples: where they disagree, and the exact test."""

    name_a: str
    name_b: str
    num_examples: int
    accuracy_a: float
    accuracy_b: float
    a_only: int  # examples a gets right and b wrong
    b_only: int  # examples b gets right and a wrong
    difference: int  # a_only - b_only (= correct answers of a minus those of b)
    p_value: float  # exact two-sided McNemar on (a_only, b_only)

    def to_markdown(self) -> str:
        return markdown_table(
            ["Metric", self.name_a, self.name_b],
            [
                ("Accuracy", self.accuracy_a, self.accuracy_b),
                ("Right only here", self.a_only, self.b_only),
                (f"{self.name_a} - {self.name_b}", f"{self.difference:+d}", None),
                ("McNemar p (exact, two-sided)", self.p_value, None),
            ],
        )


def compare_treatments(labels, preds_a, preds_b, names=("a", "b")) -> TreatmentComparison:
    """Exact McNemar test of two models' predictions on the same examples (paired).

    Only the examples where exactly one of the two is right count: ``a_only`` and ``b_only``;
    under the null that both are equally accurate each such example is a fair coin. Use it to
    ask whether a treatment beat its control, not just whether each beat the untreated model.
    """
    if not isinstance(names, (tuple, list)) or len(names) != 2:
        raise ValueError(f"names must be two strings, got {names!r}")
    labels, preds = check_predictions(labels, {"preds_a": preds_a, "preds_b": preds_b})
    right_a, right_b = preds["preds_a"] == labels, preds["preds_b"] == labels
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    n = labels.numel()
    return TreatmentComparison(
        name_a=str(names[0]),
        name_b=str(names[1]),
        num_examples=n,
        accuracy_a=float(right_a.sum()) / n,
        accuracy_b=float(right_b.sum()) / n,
        a_only=a_only,
        b_only=b_only,
        difference=a_only - b_only,
        p_value=mcnemar_exact(a_only, b_only),
    )


@dataclass
class ComputeSaving(Report):
    """Two different measures of what a treatment saved versus full training; not to be mixed.

    ``measured_*``: from wall-clock seconds that were actually measured. ``paper_*``: the
    paper's accounting, (correction epochs x groups trained) / (training epochs x all groups),
    a count, not a measurement.
    """

    correction_seconds: float | None
    training_seconds: float | None
    measured_fraction: float | None  # correction / training wall time
    measured_saving: float | None  # 1 - measured_fraction
    paper_fraction: float | None  # (epochs x groups) of correction over those of training
    paper_saving: float | None

    def to_markdown(self) -> str:
        return markdown_table(
            ["Measure", "Fraction of full training", "Saving"],
            [
                ("measured wall time", self.measured_fraction, self.measured_saving),
                (
                    "paper's epochs x groups figure (not measured)",
                    self.paper_fraction,
                    self.paper_saving,
                ),
            ],
        )


def compute_saving(
    correction_seconds: float | None = None,
    training_seconds: float | None = None,
    *,
    correction_epochs: int | None = None,
    training_epochs: int | None = None,
    groups_trained: int | None = None,
    total_groups: int | None = None,
) -> ComputeSaving:
    """Measured wall-time ratio and, separately, the paper's epochs x groups figure.

    Either part is None when its inputs are not given. Example: the paper's 30 epochs x 3 of 7
    groups over 200 epochs x 7 groups is 90 / 1400 = 6.4% (a 93.6% "saving" by that count).
    """
    measured = saving = None
    if correction_seconds is not None or training_seconds is not None:
        correction_seconds = check_non_negative("correction_seconds", correction_seconds)
        training_seconds = check_non_negative("training_seconds", training_seconds)
        if training_seconds == 0:
            raise ValueError("training_seconds must be > 0")
        measured = correction_seconds / training_seconds
        saving = 1 - measured
    paper = paper_saving = None
    counts = (correction_epochs, training_epochs, groups_trained, total_groups)
    if any(c is not None for c in counts):
        names = ("correction_epochs", "training_epochs", "groups_trained", "total_groups")
        for name, value in zip(names, counts):
            check_int(name, value, 1, hint=" (give all four counts)")
        if groups_trained > total_groups:
            raise ValueError(
                f"groups_trained ({groups_trained}) exceeds total_groups ({total_groups})"
            )
        paper = (correction_epochs * groups_trained) / (training_epochs * total_groups)
        paper_saving = 1 - paper
    return ComputeSaving(
        correction_seconds, training_seconds, measured, saving, paper, paper_saving
    )


@torch.no_grad()
def predict(
    model, loader, device=None, *, ignore_index: int | None = -100, shift_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(labels, predictions)`` over ``loader`` as CPU int64 tensors.

    Order: by dataset index when the loader's order is reproducible (a DataLoader with a
    SequentialSampler, where that is the iteration order, or a DistributedSampler: all ranks'
    rows, each example once, as one process would see them); otherwise the iteration order
    (ranks concatenated in rank order). For :func:`verify`, predict before and after treatment
    on the same loader so positions line up. The model runs in eval mode (modes restored after).

    Per-position tasks (logits ``[batch, positions, classes]``, e.g. a language model; with
    ``shift_labels`` as for :func:`localize`): one entry per position whose label is not
    ``ignore_index``, example by example and position by position within each; the same kept
    positions before and after, since they depend on the labels only.
    """
    from . import _data
    from ._task import Task, batch_units

    task = Task.of(ignore_index, shift_labels)
    model = _data.unwrap(model)
    device = _data.model_device(model, device)
    order = _data.loader_order(loader)
    positions, labels_out, preds_out = [], [], []
    offset = 0
    with _data.evaluation(model, []):
        for batch in loader:
            _, _, units = batch_units(model, task, batch, device)
            count = units.shape[0]
            valid = order.valid(offset, count, device)
            keep = units.valid if valid is None else units.valid & valid[:, None]
            rows = range(count) if valid is None else valid.nonzero().flatten().tolist()
            keep, truth, preds = keep.cpu(), units.labels.cpu(), units.predictions.cpu()
            for row in rows:
                positions.append(offset + row)
                labels_out.append(truth[row][keep[row]].tolist())
                preds_out.append(preds[row][keep[row]].tolist())
            offset += count
    _, _, labels, preds = _data.gather_in_dataset_order(order, positions, labels_out, preds_out)
    labels = [value for row in labels for value in row]
    preds = [value for row in preds for value in row]
    return torch.tensor(labels, dtype=torch.long), torch.tensor(preds, dtype=torch.long)
