"""The paper's four experiments (Sections 4-7) as configurations of one training loop.

Methods (Table 2 and Sec. 6.1, 7.1); all share the preset's per-epoch cosine lr schedule:

- ``baseline``: torch SGD, constant momentum 0.9.
- ``1cycle``: torch SGD whose momentum follows the lr inversely, linearly between 0.85 (at
  ``lr_max``) and 0.95 (at ``lr_min``): ``mu = 0.95 - 0.10 (lr - lr_min) / (lr_max - lr_min)``.
- ``physics``: :class:`dampopt.PhysicsSGD`, ``mu = clamp(1 - 2 sqrt(lr), 0.5, 0.99)``.
- ``ikfad``, ``cd``: :class:`dampopt.iKFAD` and :class:`dampopt.CubicDampedSGD` with ``lr = h**2``
  at the authors' CIFAR-10 step (h = 0.0973 and 0.0448; cosine to 1/1000 of it) and their
  hyperparameters, except ``c = 0.1`` for CD as in the diagnostic paper.
- ``adam``: torch Adam, lr from ``adam_lr_max`` to ``adam_lr_min``.
- ``hybrid-mid``: PhysicsSGD until the test accuracy first reaches the mid threshold (the paper's
  90%), then 0.9 ("Hybrid-90").
- ``hybrid-epoch``: PhysicsSGD until a fixed epoch, then 0.9 ("Hybrid-ep52"). As in the paper,
  the epoch is the one at which ``physics`` first reached the mid threshold in Experiment 1.

Every method is trained at most once per seed (:class:`Lab`); the experiments read the trained
models and hand them to :mod:`dampopt.diagnostics`.

Held-out verification (not in the paper): the test set is split once into two fixed halves.
Every localization sees the first half only; every correction is verified on the second, so
the layers are checked on images they were not chosen from. Correction A (and the specific
criterion's choice, when it flags anything) is also run against control arms at the same
budget: unflagged, random, all and largest groups, over ``preset.control_seeds`` treatment
seeds, each flagged/control pair compared by the exact paired McNemar test.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import dampopt
from dampopt import diagnostics
from dampopt._distributed import rank_and_world_size

from . import files
from .data import DeviceData, TensorLoader
from .models import LAYER_GROUPS, build_model
from .presets import Preset
from .training import Recipe, Settings, TrainingRun, predict, train

ONE_CYCLE_MOMENTUM = (0.85, 0.95)  # mu at lr_max, mu at lr_min
BASELINE_MOMENTUM = 0.9
IKFAD_STEP = 0.0973  # the authors' h on CIFAR-10; lr = h**2
CD_STEP = 0.0448
CD_CUBIC = 0.1  # the diagnostic paper's c
FRICTION_LR_RANGE = 1e-3  # cosine from h**2 down to h**2 / 1000, the paper's 0.1 -> 1e-4 ratio
HALVES_SEED = 0  # the test set's split into a localize half and a verify half (every run seed)


def one_cycle_momentum(lr: float, lr_max: float, lr_min: float) -> float:
    """1cycle momentum, inversely coupled to the lr: 0.85 at lr_max, 0.95 at lr_min."""
    low, high = ONE_CYCLE_MOMENTUM
    return high - (high - low) * (lr - lr_min) / (lr_max - lr_min)


def recipes(preset: Preset, steps_per_epoch: int, hybrid_switch_epoch: int | None) -> dict:
    """Every method's :class:`Recipe`; ``hybrid-epoch`` only once its switch epoch is known."""
    wd = preset.weight_decay

    def sgd(momentum):
        return lambda params, lr: torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=wd
        )

    methods = {
        "baseline": Recipe("baseline", sgd(BASELINE_MOMENTUM), preset.lr_max, preset.lr_min,
                           description="SGD, mu = 0.9"),
        "1cycle": Recipe("1cycle", sgd(ONE_CYCLE_MOMENTUM[0]), preset.lr_max, preset.lr_min,
                         momentum=one_cycle_momentum,
                         description="SGD, mu = 0.95 - 0.10 (lr - lr_min)/(lr_max - lr_min)"),
        "physics": Recipe("physics",
                          lambda params, lr: dampopt.PhysicsSGD(params, lr, weight_decay=wd),
                          preset.lr_max, preset.lr_min,
                          description="PhysicsSGD, mu = clamp(1 - 2 sqrt(lr), 0.5, 0.99)"),
        "ikfad": Recipe("ikfad",
                        lambda params, lr: dampopt.iKFAD(params, lr, weight_decay=wd),
                        IKFAD_STEP**2, IKFAD_STEP**2 * FRICTION_LR_RANGE,
                        description="iKFAD, h = 0.0973, gamma 0.40, alpha 0.402, mu 1.87"),
        "cd": Recipe("cd",
                     lambda params, lr: dampopt.CubicDampedSGD(params, lr, c=CD_CUBIC,
                                                               weight_decay=wd),
                     CD_STEP**2, CD_STEP**2 * FRICTION_LR_RANGE,
                     description="cubic damping, h = 0.0448, gamma 0.17, c 0.1"),
        "adam": Recipe("adam",
                       lambda params, lr: torch.optim.Adam(params, lr=lr, weight_decay=wd),
                       preset.adam_lr_max, preset.adam_lr_min, description="Adam"),
        "hybrid-mid": Recipe("hybrid-mid",
                             lambda params, lr: dampopt.PhysicsSGD(
                                 params, lr, momentum=BASELINE_MOMENTUM, weight_decay=wd,
                                 switch_metric=preset.mid_threshold),
                             preset.lr_max, preset.lr_min, observe_accuracy=True,
                             description=f"physics until {preset.mid_threshold:.0%}, then 0.9"),
    }  # fmt: skip
    if hybrid_switch_epoch is not None:
        switch_step = hybrid_switch_epoch * steps_per_epoch
        methods["hybrid-epoch"] = Recipe(
            "hybrid-epoch",
            lambda params, lr: dampopt.PhysicsSGD(
                params, lr, momentum=BASELINE_MOMENTUM, weight_decay=wd, switch_step=switch_step
            ),
            preset.lr_max, preset.lr_min,
            description=f"physics for epochs 1-{hybrid_switch_epoch}, then 0.9",
        )  # fmt: skip
    return methods


class Lab:
    """One seed's trainings: each method trained once, on demand, and kept."""

    def __init__(self, preset: Preset, data: DeviceData, settings: Settings):
        self.preset, self.data, self.settings = preset, data, settings
        self.runs: dict[str, TrainingRun] = {}
        self.hybrid_switch_epoch: int | None = None
        rank, world_size = rank_and_world_size()
        shard = math.ceil(len(data.train_labels) / world_size)
        self.steps_per_epoch = math.ceil(shard / (settings.batch_size // world_size))
        self.rank, self.world_size = rank, world_size
        first, second = diagnostics.split_halves(range(len(data.test_labels)), seed=HALVES_SEED)
        device = data.test_labels.device
        self.localize_rows = torch.tensor(first.indices, device=device)
        self.verify_rows = torch.tensor(second.indices, device=device)

    def trained(self, name: str) -> TrainingRun:
        if name not in self.runs:
            recipe = recipes(self.preset, self.steps_per_epoch, self.hybrid_switch_epoch)[name]
            torch.manual_seed(self.settings.seed)  # every method starts from the same weights
            model = build_model(self.data.in_channels, len(self.data.classes), self.preset.width,
                                self.settings.channels_last)  # fmt: skip
            self.runs[name] = train(recipe, model, self.data, self.settings)
        return self.runs[name]

    # loaders the diagnostics iterate: this rank's shard (diagnostics all-reduce over ranks)
    def _test_half(self, rows: torch.Tensor) -> TensorLoader:
        return TensorLoader(self.data.test_images[rows], self.data.test_labels[rows], 512,
                            train=False, channels_last=self.settings.channels_last,
                            rank=self.rank, world_size=self.world_size)  # fmt: skip

    def localize_loader(self) -> TensorLoader:
        """The half of the test set every localization sees."""
        return self._test_half(self.localize_rows)

    def verify_loader(self) -> TensorLoader:
        """The other half: every correction is verified here."""
        return self._test_half(self.verify_rows)

    def train_loader(self, seed: int | None = None) -> TensorLoader:
        """Training batches; ``seed`` (default: the run's) fixes their order and augmentation."""
        return TensorLoader(self.data.train_images, self.data.train_labels,
                            self.settings.batch_size, train=True,
                            seed=self.settings.seed if seed is None else seed,
                            crop_padding=self.settings.crop_padding,
                            channels_last=self.settings.channels_last,
                            rank=self.rank, world_size=self.world_size)  # fmt: skip


def _percent_key(threshold: float) -> str:
    return f"{threshold:.0%}"


def training_summary(run: TrainingRun, preset: Preset, labels: torch.Tensor) -> dict:
    """A trained method's numbers for Tables 3-6, 11, 14 and Figures 1-3."""
    errors = int((run.predictions != labels).sum())
    lrs = [row.lr for row in run.log]
    mus = [row.mu for row in run.log]
    summary = {
        "description": run.recipe.description,
        "best_accuracy": run.best_accuracy,
        "final_accuracy": run.final_accuracy,
        "errors": errors,
        "correct": len(labels) - errors,
        "training_seconds": run.seconds,
        "epochs_to": {_percent_key(t): run.epoch_reaching(t) for t in preset.thresholds},
        "accuracy_at": {str(e): run.accuracy_at(e) for e in preset.early_epochs},
        "switch_epoch": run.switch_epoch,
        "lr": lrs,
        "mu": mus,
        "test_accuracy": [row.test_accuracy for row in run.log],
        "train_loss": [row.train_loss for row in run.log],
    }
    if all(mu is not None for mu in mus):
        scan = diagnostics.scan_schedule(lrs, mus)
        summary["regimes"] = dict(scan.counts)
        summary["regime_per_epoch"] = [row.regime for row in scan.rows]
        summary["mu_c"] = [row.mu_c for row in scan.rows]
    return summary


# -- Experiment 1: damping regimes and convergence (Sec. 4, Tables 3-6) ------------------------


def experiment_1(lab: Lab) -> dict:
    labels = lab.data.test_labels
    methods = {name: training_summary(lab.trained(name), lab.preset, labels)
               for name in ("baseline", "1cycle", "physics")}  # fmt: skip
    physics_mid = methods["physics"]["epochs_to"][_percent_key(lab.preset.mid_threshold)]
    # The paper's Hybrid-ep52 switches where physics first reached 90% in this experiment.
    lab.hybrid_switch_epoch = physics_mid or max(1, round(lab.preset.epochs * 52 / 200))
    return {"methods": methods, "hybrid_switch_epoch": lab.hybrid_switch_epoch}


# -- corrections shared by Experiments 2 and 3 -------------------------------------------------


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list:
    """Accuracy on each class's examples, in class order; None for a class with none."""
    hits = (predictions == labels).float()
    return [float(hits[labels == c].mean()) if bool((labels == c).any()) else None
            for c in range(num_classes)]  # fmt: skip


def correct(lab: Lab, name: str, model, before: torch.Tensor, training_seconds: float,
            layers=None, mask=None) -> dict:  # fmt: skip
    """Treat (retrain ``layers`` / ``mask`` with physics momentum); verify on the verify half.

    ``before``: the model's predictions on the whole test set (sliced to the verify half here).

    Cached under the checkpoint directory so a resumed run does not redo finished corrections.
    """
    cache = lab.settings.checkpoint_dir / f"correction-{name}.pt"
    if lab.settings.resume and cache.exists():
        return files.load(cache)["result"]
    loader = lab.train_loader()
    corrected, treatment = diagnostics.treat(
        model, loader, layers=layers, mask=mask, epochs=lab.preset.correction_epochs,
        lr=lab.preset.correction_lr, optimizer="physics", weight_decay=lab.preset.weight_decay,
    )  # fmt: skip
    rows = lab.verify_rows
    labels, before, after = (lab.data.test_labels[rows], before[rows],
                             predict(corrected, lab.data, lab.settings)[rows])  # fmt: skip
    check = diagnostics.verify(labels, before, after)
    groups_trained = len(treatment.layers) if treatment.layers else len(LAYER_GROUPS)
    saving = diagnostics.compute_saving(
        treatment.wall_time_s, training_seconds,
        correction_epochs=lab.preset.correction_epochs, training_epochs=lab.preset.epochs,
        groups_trained=groups_trained, total_groups=len(LAYER_GROUPS),
    )  # fmt: skip
    verification = check.to_dict()
    for key in ("fixed_indices", "new_indices"):
        verification.pop(key, None)
    result = {
        "layers": list(treatment.layers),
        "masked": treatment.masked,
        "tensor_fraction": treatment.tensor_fraction,
        "element_fraction": treatment.element_fraction,
        "epoch_losses": list(treatment.epoch_losses),
        "correction_seconds": treatment.wall_time_s,
        **verification,
        # on the examples verified (the verify half), from the predictions before and after
        "per_class_before": per_class_accuracy(before, labels, len(lab.data.classes)),
        "per_class_after": per_class_accuracy(after, labels, len(lab.data.classes)),
        "saving": saving.to_dict(),
    }
    if lab.rank == 0:
        files.save({"result": result}, cache)
    return result


# -- Experiment 2: Scan -> Localize -> Diagnose -> Treat -> Verify (Sec. 5, Tables 7-10) -------


def controls(lab: Lab, name: str, model, localization) -> dict:
    """Correction of ``localization``'s flagged groups against control arms, same budget.

    Every arm of treatment seed ``s`` trains on ``lab.train_loader(seed=s)`` (a fresh loader,
    so the same batches for every arm of that seed), and is verified on the verify half.
    Cached like :func:`correct`.
    """
    cache = lab.settings.checkpoint_dir / f"controls-{name}.pt"
    if lab.settings.resume and cache.exists():
        return files.load(cache)["result"]
    outcome = diagnostics.treat_controls(
        model, lambda seed: lab.train_loader(seed=seed), localization, lab.verify_loader(),
        seeds=lab.preset.control_seeds, random_draws=lab.preset.random_draws,
        epochs=lab.preset.correction_epochs, lr=lab.preset.correction_lr, optimizer="physics",
        weight_decay=lab.preset.weight_decay,
    )  # fmt: skip
    result = outcome.to_dict()
    result["beats"] = {arm: outcome.beats(arm) for arm in outcome.comparisons}
    result["markdown"] = outcome.to_markdown()
    if lab.rank == 0:
        files.save({"result": result}, cache)
    return result


# -- Experiment 2: Scan -> Localize -> Diagnose -> Treat -> Verify (Sec. 5, Tables 7-10) -------


def localization_summary(localization) -> dict:
    return {
        "criterion": localization.criterion,
        "rule": localization.rule,
        "alpha": localization.alpha,
        "norms": dict(localization.norms),
        "grad_norms": dict(localization.grad_norms),
        "specificity": dict(localization.specificity),
        "intervals": dict(localization.intervals),
        "p_values": dict(localization.p_values),
        "adjusted_p_values": dict(localization.adjusted_p_values),
        "group_sizes": dict(localization.group_sizes),
        "problem_layers": list(localization.problem_layers),
        "ranking": list(localization.ranking),
        "num_errors": localization.num_errors,
        "num_examples": localization.num_examples,
        "num_cells": localization.num_cells,
        "message": localization.message,
    }


def experiment_2(lab: Lab) -> dict:
    baseline = lab.trained("baseline")
    labels = lab.data.test_labels
    errors = diagnostics.compare_errors(
        {name: lab.trained(name).predictions for name in ("baseline", "physics", "1cycle")}, labels
    )
    # the paper's criterion and rule, and the size-free one with its test, on the same half
    where = diagnostics.localize(baseline.model, lab.localize_loader())
    specific = diagnostics.localize(baseline.model, lab.localize_loader(),
                                    criterion="specificity", rule="significant")  # fmt: skip
    why = diagnostics.diagnose(baseline.model, lab.localize_loader(), where, top=7,
                               class_names=list(lab.data.classes))  # fmt: skip
    correction = correct(lab, "A", baseline.model, baseline.predictions, baseline.seconds,
                         layers=where.problem_layers)  # fmt: skip
    return {
        "errors": errors.to_dict(),
        "localization": localization_summary(where),
        "specific_localization": localization_summary(specific),
        "diagnosis": why.to_dict(),
        "correction": correction,
        "controls": controls(lab, "A", baseline.model, where),
        "specific_controls": (controls(lab, "specific", baseline.model, specific)
                              if specific.problem_layers else None),  # fmt: skip
        "localize_size": len(lab.localize_rows),
        "verify_size": len(lab.verify_rows),
    }


# -- Experiment 3: five optimizers, cross-optimizer invariance, corrections A-E (Sec. 6) --------


def experiment_3(lab: Lab, experiment2: dict) -> dict:
    labels = lab.data.test_labels
    names = ("cd", "baseline", "ikfad", "physics", "adam")
    trainings = {name: training_summary(lab.trained(name), lab.preset, labels) for name in names}
    baseline, ikfad, adam = lab.trained("baseline"), lab.trained("ikfad"), lab.trained("adam")

    sgd_layers = experiment2["localization"]["problem_layers"]
    friction = diagnostics.localize(ikfad.model, None, criterion="friction",
                                    optimizer=ikfad.optimizer)  # fmt: skip
    adam_where = diagnostics.localize(adam.model, lab.localize_loader())

    # Methods C/D select iKFAD's highest-friction elements and retrain those elements of the
    # baseline model (same architecture): the mask is carried over by parameter name.
    ikfad_names = {id(p): n for n, p in ikfad.model.named_parameters()}

    def mask(fraction):
        chosen = diagnostics.friction_mask(ikfad.optimizer, fraction=fraction)
        return {ikfad_names[id(p)]: m for p, m in chosen.items()}

    corrections = {
        "A": experiment2["correction"],
        "B": correct(lab, "B", baseline.model, baseline.predictions, baseline.seconds,
                     layers=friction.problem_layers),
        "C": correct(lab, "C", baseline.model, baseline.predictions, baseline.seconds,
                     mask=mask(0.30)),
        "D": correct(lab, "D", baseline.model, baseline.predictions, baseline.seconds,
                     mask=mask(0.15)),
        "E": correct(lab, "E", adam.model, adam.predictions, adam.seconds,
                     layers=adam_where.problem_layers),
    }  # fmt: skip
    return {
        "trainings": trainings,
        "layers": {
            "sgd": sgd_layers,
            "ikfad": list(friction.problem_layers),
            "adam": list(adam_where.problem_layers),
        },
        "friction": localization_summary(friction),
        "adam_localization": localization_summary(adam_where),
        "overlap": {
            "sgd_ikfad": diagnostics.compare_layers(sgd_layers, friction.problem_layers).to_dict(),
            "sgd_adam": diagnostics.compare_layers(sgd_layers, adam_where.problem_layers).to_dict(),
        },
        "corrections": corrections,
    }


# -- Experiment 4: hybrid schedules (Sec. 7, Table 14) -----------------------------------------


def experiment_4(lab: Lab) -> dict:
    labels = lab.data.test_labels
    names = ("baseline", "physics", "1cycle", "hybrid-mid", "hybrid-epoch")
    return {
        "methods": {name: training_summary(lab.trained(name), lab.preset, labels)
                    for name in names},
        "hybrid_switch_epoch": lab.hybrid_switch_epoch,
    }  # fmt: skip


def run_seed(preset: Preset, data: DeviceData, settings: Settings) -> dict:
    """All four experiments for one seed; models shared between experiments are trained once."""
    lab = Lab(preset, data, settings)
    results = {"experiment_1": experiment_1(lab)}
    results["experiment_2"] = experiment_2(lab)
    results["experiment_3"] = experiment_3(lab, results["experiment_2"])
    results["experiment_4"] = experiment_4(lab)
    results["test_size"] = len(data.test_labels)
    results["train_size"] = len(data.train_labels)
    return results


def checkpoint_dir(root: Path, seed: int) -> Path:
    path = root / "checkpoints" / f"seed{seed}"
    path.mkdir(parents=True, exist_ok=True)
    return path
