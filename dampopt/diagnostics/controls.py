"""Treat with controls: does retraining the flagged groups beat retraining other groups?

A repair that beats the untreated model proves little: retraining *any* groups for a few epochs
often fixes about as many errors. :func:`treat_controls` retrains, at the same budget (epochs,
lr, optimizer and, per seed, the same batch order), the flagged groups and control choices:

- ``"unflagged"``: every group not flagged;
- ``"random"``: ``random_draws`` sets of as many groups as flagged, drawn at random by a fixed
  generator, never the flagged set itself and all different while enough sets exist; arms
  ``random-1``, ``random-2``...;
- ``"all"``: every group;
- ``"largest"``: as many groups as flagged, the ones with the most parameters.

An arm whose groups are the flagged ones (e.g. "largest" when the flagged groups are the
largest) would repeat the flagged treatment; it is not run and is listed in ``skipped``.

Each arm is verified on ``eval_loader`` (use examples the localization did not see:
:func:`split_halves`) against the untreated model, and the flagged model is compared with each
control of the same seed by the exact paired McNemar test (:func:`compare_treatments`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import Subset

from .._validation import check_int, check_level, check_seed
from . import _data
from ._report import Report, format_value, markdown_table
from .groups import resolve_groups
from .localize import Localization
from .treat import treat
from .verify import compare_treatments, predict, verify

ARMS = ("flagged", "unflagged", "random", "all", "largest")


def split_halves(dataset, seed: int = 0, fraction: float = 0.5) -> tuple:
    """Two disjoint random parts of ``dataset`` (``torch.utils.data.Subset``), fixed by ``seed``.

    Localize on the first, verify on the second: the layers are then checked on examples they
    were not chosen from. Choosing and checking on the same examples overstates a repair, since
    the choice adapts to that sample's errors. The first part holds ``round(fraction * n)``.
    """
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError("dataset must have a len() (a map-style dataset)") from None
    fraction = check_level(fraction, "fraction")
    check_seed(seed)
    first = round(fraction * n)
    if first < 1 or first > n - 1:
        raise ValueError(f"cannot split {n} examples into two non-empty parts at {fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[:first])), Subset(dataset, sorted(order[first:]))


@dataclass
class ArmResult(Report):
    """One arm, one seed: what it trained and what it did on the evaluation examples."""

    arm: str
    seed: int
    layers: list
    trainable_elements: int
    steps: int
    accuracy: float
    fixed: int
    new: int
    net: int
    p_value: float  # exact McNemar against the untreated model
    wall_time_s: float


@dataclass
class ControlledTreatment(Report):
    """Result of :func:`treat_controls`. ``comparisons[arm][i]``: flagged vs ``arm``, seed i."""

    flagged: list
    arms: dict  # {arm: its groups}
    skipped: dict  # {arm: why it was not run} (e.g. "largest" are the flagged groups)
    seeds: list
    num_examples: int
    accuracy_before: float
    budget: dict  # what every arm got: epochs, steps, lr, optimizer
    results: list  # ArmResult, by seed then arm
    comparisons: dict  # {control arm: [TreatmentComparison per seed]}
    summary: dict  # {arm: {net_mean, net_std, accuracy_mean, accuracy_std, ...}}
    alpha: float
    message: str

    def beats(self, arm: str) -> bool:
        """Flagged more accurate than ``arm`` with paired p < alpha in every seed."""
        return all(c.difference > 0 and c.p_value < self.alpha for c in self.comparisons[arm])

    def to_markdown(self) -> str:
        rows = []
        for arm, layers in self.arms.items():
            info = self.summary[arm]
            if arm == "flagged":
                versus = "—"
            else:
                versus = "; ".join(
                    f"{c.difference:+d} (p={format_value(c.p_value)})"
                    for c in self.comparisons[arm]
                )
            rows.append((
                arm, ", ".join(layers), info["trainable_elements"],
                _mean_std(info["net_mean"], info["net_std"], signed=True),
                " ".join(f"{n:+d}" for n in info["net"]),
                _mean_std(info["accuracy_mean"], info["accuracy_std"]), versus,
            ))  # fmt: skip
        table = markdown_table(
            ["Arm", "Groups", "Trained elements", "Net (mean ± std)", "Net per seed",
             "Accuracy (mean ± std)", "Flagged - arm, per seed (paired McNemar p)"],
            rows,
        )  # fmt: skip
        return f"{self.message}\n\n{table}"


def _mean_std(mean, std, signed=False) -> str:
    text = f"{mean:+.4g}" if signed else format_value(mean)
    return text if std is None else f"{text} ± {format_value(std)}"


def treat_controls(
    model,
    train_loader,
    localization: Localization,
    eval_loader,
    arms=ARMS,
    random_draws: int = 3,
    seeds=(0, 1, 2),
    *,
    alpha: float = 0.05,
    device=None,
    **treat_kwargs,
) -> ControlledTreatment:
    """Treat the flagged groups and each control arm at the same budget; verify all held out.

    Args:
        model: the trained model (left untouched; every arm trains its own copy).
        train_loader: what every arm trains on (see :func:`treat`); a shuffling DataLoader
            gets the same batch order in every arm of a seed. Or a callable ``seed -> loader``
            called for every treatment, for loaders that draw their order themselves (one
            that moves to a new epoch's order on each pass would give every arm another).
        localization: its ``problem_layers`` are the flagged arm; its groups define the rest.
        eval_loader: the examples to verify on, in a fixed order (ideally ones the
            localization did not see).
        arms: which of :data:`ARMS` to run; "flagged" is always run.
        random_draws: how many random sets for the "random" arm.
        seeds: one treatment of every arm per seed (the seed fixes the batch order).
        alpha: the level for :meth:`ControlledTreatment.beats` and the message.
        **treat_kwargs: passed to every :func:`treat` call (``epochs``, ``lr``, ``optimizer``,
            ``weight_decay``, ``ewc``...); not ``layers``, ``mask`` or ``seed``. With
            ``adapter="lora", rank=, alpha=`` every arm trains LoRA adapters of that rank on
            its own groups' modules (surgical LoRA against LoRA on all, random and unflagged
            blocks at the same rank and budget); an arm whose groups hold no adaptable module
            raises. How units are scored (``shift_labels``, ``ignore_index``, ``loss_fn``)
            defaults to the localization's, for training and for the predictions compared.

    Cost: ``len(seeds) x (number of arms)`` treatments, plus one prediction pass each.
    """
    if not isinstance(localization, Localization):
        raise TypeError(f"localization must be a Localization, got {type(localization).__name__}")
    if not localization.problem_layers:
        raise ValueError("the localization flagged no group: there is no flagged arm to control")
    for key in ("layers", "mask", "seed"):
        if key in treat_kwargs:
            raise ValueError(f"treat_controls sets {key!r} itself; do not pass it")
    arms = (arms,) if isinstance(arms, str) else tuple(arms)
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {ARMS}")
    check_int("random_draws", random_draws, 0)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    check_level(alpha)
    model = _data.unwrap(model)
    make_loader = callable(train_loader) and not isinstance(train_loader, Iterable)
    chosen, skipped = _arm_layers(localization, arms, random_draws)

    task = localization.task
    for key, value in (("ignore_index", task.ignore_index), ("shift_labels", task.shift_labels),
                       ("loss_fn", task.loss_fn)):  # fmt: skip
        treat_kwargs.setdefault(key, value)
    scoring = {"ignore_index": treat_kwargs["ignore_index"],
               "shift_labels": treat_kwargs["shift_labels"]}  # fmt: skip
    labels, before = predict(model, eval_loader, device, **scoring)
    accuracy_before = float((before == labels).double().mean())
    groups = _groups_of(model, localization)
    results, predictions, budget = [], {}, None
    for seed in seeds:
        for arm, layers in chosen.items():
            loader = train_loader(seed) if make_loader else train_loader
            corrected, report = treat(model, loader, layers={g: groups[g] for g in layers},
                                      seed=seed, device=device, **treat_kwargs)  # fmt: skip
            seen, after = predict(corrected, eval_loader, device, **scoring)
            del corrected
            if not torch.equal(seen, labels):
                raise ValueError(
                    "eval_loader must yield the same examples in the same order on every pass "
                    "(a fixed-order loader, e.g. shuffle=False): the comparisons are paired"
                )
            check = verify(labels, before, after)
            predictions[arm, seed] = after
            results.append(ArmResult(
                arm=arm, seed=seed, layers=list(layers),
                trainable_elements=report.trainable_elements, steps=report.steps,
                accuracy=check.accuracy_after, fixed=check.fixed, new=check.new, net=check.net,
                p_value=check.p_value, wall_time_s=report.wall_time_s,
            ))  # fmt: skip
            budget = budget or {"epochs": report.epochs, "steps": report.steps,
                                "lr": report.lr_schedule[0], "final_lr": report.final_lr,
                                "optimizer": report.optimizer}  # fmt: skip
    comparisons = {
        arm: [
            compare_treatments(labels, predictions["flagged", s], predictions[arm, s],
                               names=("flagged", arm))  # fmt: skip
            for s in seeds
        ]
        for arm in chosen
        if arm != "flagged"
    }
    summary = {}
    for arm in chosen:
        mine = [r for r in results if r.arm == arm]
        nets = [r.net for r in mine]
        accuracies = [r.accuracy for r in mine]
        summary[arm] = {
            "net": nets,
            "net_mean": statistics.fmean(nets),
            "net_std": statistics.stdev(nets) if len(nets) > 1 else None,
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "trainable_elements": mine[0].trainable_elements,
        }
    outcome = ControlledTreatment(
        flagged=list(localization.problem_layers), arms=chosen, skipped=skipped, seeds=seeds,
        num_examples=labels.numel(), accuracy_before=accuracy_before, budget=budget,
        results=results, comparisons=comparisons, summary=summary, alpha=float(alpha),
        message="",
    )  # fmt: skip
    outcome.message = _verdict(outcome)
    return outcome


def _arm_layers(localization: Localization, arms, random_draws: int) -> dict:
    """``{arm name: [group names]}``; "flagged" first."""
    every = list(localization.group_sizes)
    flagged = list(localization.problem_layers)
    k = len(flagged)
    chosen = {"flagged": flagged}
    if "unflagged" in arms:
        rest = [g for g in every if g not in flagged]
        if rest:
            chosen["unflagged"] = rest
    if "random" in arms:
        generator = torch.Generator().manual_seed(0)
        others = math.comb(len(every), k) - 1  # sets of k groups other than the flagged one
        drawn = [set(flagged)]
        for draw in range(random_draws):
            while True:  # a new set while one is left, else any set other than the flagged
                picked = torch.randperm(len(every), generator=generator)[:k].sort().values
                layers = [every[i] for i in picked.tolist()]
                if set(layers) not in (drawn if draw < others else drawn[:1]) or others == 0:
                    break
            drawn.append(set(layers))
            chosen[f"random-{draw + 1}"] = layers
    if "all" in arms:
        chosen["all"] = every
    if "largest" in arms:
        by_size = sorted(every, key=lambda g: localization.group_sizes[g], reverse=True)[:k]
        chosen["largest"] = [g for g in every if g in by_size]
    # an arm with the flagged groups themselves would be the flagged treatment again
    skipped = {arm: "the flagged groups themselves" for arm, layers in chosen.items()
               if arm != "flagged" and set(layers) == set(flagged)}  # fmt: skip
    return {arm: layers for arm, layers in chosen.items() if arm not in skipped}, skipped


def _groups_of(model, localization: Localization) -> dict:
    """``{group: [parameters of model]}`` for the localization's groups (names or a dict)."""
    stored = localization.groups or {}
    owned = {id(p) for p in model.parameters()}
    if stored and all(id(p) in owned for ps in stored.values() for p in ps):
        return stored
    return resolve_groups(model, list(localization.group_sizes), argument="localization groups")


def _verdict(outcome: ControlledTreatment) -> str:
    controls = [arm for arm in outcome.arms if arm != "flagged"]
    flagged = outcome.summary["flagged"]
    head = (
        f"flagged groups {', '.join(outcome.flagged)}: net {flagged['net_mean']:+.1f} over "
        f"{len(outcome.seeds)} seed(s) on {outcome.num_examples} examples"
    )
    if outcome.skipped:
        head += "; not run: " + ", ".join(f"{a} ({why})" for a, why in outcome.skipped.items())
    if not controls:
        return head + "; no control arm was run"
    beaten = [arm for arm in controls if outcome.beats(arm)]
    worse = [arm for arm in controls
             if all(c.difference < 0 and c.p_value < outcome.alpha
                    for c in outcome.comparisons[arm])]  # fmt: skip
    text = (
        f"{head}; beat {len(beaten)} of {len(controls)} controls in every seed (paired "
        f"McNemar p < {outcome.alpha:g})"
    )
    if beaten:
        text += f": {', '.join(beaten)}"
    if worse:
        text += f"; significantly worse than {', '.join(worse)}"
    if not beaten:
        text += ". The flagged layers did not beat their controls"
    return text
