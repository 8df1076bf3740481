"""The one training loop every experiment uses (the paper, Sec. 4.1 and 6.1).

An experiment's trainings differ only in a :class:`Recipe`: which optimizer, its learning-rate
range, and - for plain SGD - how the momentum follows the learning rate. The learning rate is
the paper's per-epoch cosine schedule, ``lr[e] = lr_min + (lr_max - lr_min)(1 + cos(pi e/E))/2``
for ``e = 0..E-1`` (:func:`dampopt.diagnostics.cosine_schedule`), written into the optimizer at
the start of each epoch; the momentum the epoch ran with is read back from the optimizer at its
end, so what is logged is what was used (PhysicsSGD keeps the momentum in effect in
``param_groups[i]["momentum"]``).

After every epoch the model, the optimizer and the log are checkpointed (atomically); a
restarted run loads the checkpoint and continues with the same batches (data.py), so it ends
with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dampopt._distributed import all_reduce_sum_, is_distributed, rank_and_world_size
from dampopt.diagnostics import cosine_schedule
from dampopt.momentum import momentum_in_effect

from . import files
from .data import DeviceData, TensorLoader

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional: no bars without it
    tqdm = None


@dataclass
class Recipe:
    """How one model is trained; everything else (data, epochs, batch) is the preset's.

    Attributes:
        name: the method's name in tables and file names.
        optimizer: ``optimizer(params, lr)`` builds the optimizer at the first epoch's lr.
        lr_max, lr_min: ends of the cosine schedule.
        momentum: ``momentum(lr, lr_max, lr_min)`` -> mu for plain SGD schedules (1cycle);
            None leaves the optimizer's own (constant, PhysicsSGD's lr-driven one, Adam's beta1).
        observe_accuracy: pass each epoch's test accuracy to ``optimizer.observe`` (Hybrid-90).
    """

    name: str
    optimizer: Callable
    lr_max: float
    lr_min: float
    momentum: Callable | None = None
    observe_accuracy: bool = False
    description: str = ""


@dataclass
class EpochLog:
    """One epoch; ``epoch`` counts from 1. Accuracies are fractions in [0, 1]."""

    epoch: int
    lr: float
    mu: float | None  # momentum (SGD) or beta1 (Adam) in effect; None for friction optimizers
    train_loss: float
    train_accuracy: float
    test_accuracy: float
    switched: bool  # hybrid schedules: True once the switch to constant momentum has fired
    seconds: float  # wall time of the epoch's training and evaluation


@dataclass
class TrainingRun:
    """A trained model, its optimizer (with state) and its per-epoch log."""

    recipe: Recipe
    model: nn.Module
    optimizer: torch.optim.Optimizer
    log: list = field(default_factory=list)
    predictions: torch.Tensor | None = None  # test-set predictions of the final model

    @property
    def best_accuracy(self) -> float:
        return max(row.test_accuracy for row in self.log)

    @property
    def final_accuracy(self) -> float:
        return self.log[-1].test_accuracy

    @property
    def seconds(self) -> float:
        return sum(row.seconds for row in self.log)

    def epoch_reaching(self, threshold: float) -> int | None:
        """First epoch (from 1) whose test accuracy is >= ``threshold``, or None."""
        return next((row.epoch for row in self.log if row.test_accuracy >= threshold), None)

    def accuracy_at(self, epoch: int) -> float | None:
        return self.log[epoch - 1].test_accuracy if epoch <= len(self.log) else None

    @property
    def switch_epoch(self) -> int | None:
        """First epoch that ran with the hybrid's constant momentum, or None."""
        return next((row.epoch for row in self.log if row.switched), None)


@dataclass
class Settings:
    """What all trainings of a run share."""

    epochs: int
    batch_size: int
    crop_padding: int
    seed: int
    device: torch.device
    channels_last: bool
    bf16: bool  # autocast the forward pass to bfloat16 (CUDA)
    checkpoint_dir: Path
    log_dir: Path | None  # per-epoch CSV logs; None on non-zero ranks
    resume: bool
    progress: bool
    epoch_budget: list | None = None  # testing: [epochs left before a simulated interruption]
    compile: bool = False  # torch.compile the training forward/backward (GPU throughput)


class Interrupted(RuntimeError):
    """Raised when the testing option --stop-after-epochs has used up its epochs."""


# -- distributed helpers: no-ops in one process ------------------------------------------------


def _sum_over_ranks(values: list[float], device) -> list[float]:
    if not is_distributed():
        return values
    return all_reduce_sum_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


# -- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, data: DeviceData, settings: Settings) -> torch.Tensor:
    """Predicted class of every test image (every rank evaluates the whole test set)."""
    model.eval()
    loader = TensorLoader(
        data.test_images, data.test_labels, 1024, train=False, channels_last=settings.channels_last
    )
    predictions = []
    for images, _ in loader:
        with _autocast(settings):
            predictions.append(model(images).argmax(1))
    return torch.cat(predictions)


def _autocast(settings: Settings):
    if settings.bf16 and settings.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- the loop ----------------------------------------------------------------------------------


def train(recipe: Recipe, model: nn.Module, data: DeviceData, settings: Settings) -> TrainingRun:
    """Train ``model`` (freshly initialized by the caller) by ``recipe`` for ``settings.epochs``."""
    rank, world_size = rank_and_world_size()
    model = model.to(settings.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    if settings.compile:
        trained = torch.compile(trained)  # shares the parameters; diagnostics use ``model``
    optimizer = recipe.optimizer(model.parameters(), recipe.lr_max)
    run = TrainingRun(recipe, model, optimizer)
    checkpoint = settings.checkpoint_dir / f"{recipe.name}.pt"
    if settings.resume and checkpoint.exists():
        state = files.load(checkpoint, map_location=settings.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run.log = [EpochLog(**row) for row in state["log"]]
    loader = TensorLoader(
        data.train_images, data.train_labels, settings.batch_size, train=True,
        seed=settings.seed, crop_padding=settings.crop_padding,
        channels_last=settings.channels_last, rank=rank, world_size=world_size,
    )  # fmt: skip

    schedule = cosine_schedule(recipe.lr_max, recipe.lr_min, settings.epochs)
    epochs = range(len(run.log), settings.epochs)
    bar = _progress(recipe.name, settings, initial=len(run.log))
    for epoch in epochs:
        if settings.epoch_budget is not None:
            if settings.epoch_budget[0] <= 0:
                raise Interrupted
            settings.epoch_budget[0] -= 1
        row = _train_epoch(run, trained, loader, data, settings, epoch, schedule[epoch])
        run.log.append(row)
        _save_checkpoint(run, checkpoint, rank)
        if settings.log_dir is not None:
            write_csv(settings.log_dir / f"{recipe.name}.csv", run.log)
        if bar is not None:
            bar.set_postfix(loss=f"{row.train_loss:.3f}", acc=f"{row.test_accuracy:.2%}")
            bar.update(1)
    if bar is not None:
        bar.close()
    run.predictions = predict(model, data, settings)
    return run


def _train_epoch(run, trained, loader, data, settings, epoch, lr) -> EpochLog:
    recipe, optimizer = run.recipe, run.optimizer
    start = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = lr
        if recipe.momentum is not None:
            group["momentum"] = recipe.momentum(lr, recipe.lr_max, recipe.lr_min)

    trained.train()
    loader.epoch = epoch
    loss_sum = correct = seen = 0.0
    for images, labels in loader:
        with _autocast(settings):
            logits = trained(images)
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    totals = [float(loss_sum), float(correct), seen]
    loss_sum, correct, seen = _sum_over_ranks(totals, settings.device)

    # Read before observe(): a switch it triggers applies from the next epoch on.
    mu = momentum_in_effect(optimizer.param_groups[0])
    switched = getattr(optimizer, "switched_at", None) is not None
    predictions = predict(run.model, data, settings)
    accuracy = (predictions == data.test_labels).float().mean().item()
    if recipe.observe_accuracy:
        optimizer.observe(accuracy)
    return EpochLog(
        epoch=epoch + 1,
        lr=lr,
        mu=mu,
        train_loss=loss_sum / seen,
        train_accuracy=correct / seen,
        test_accuracy=accuracy,
        switched=switched,
        seconds=time.perf_counter() - start,
    )


def _progress(name: str, settings: Settings, initial: int):
    if tqdm is None or not settings.progress or rank_and_world_size()[0] != 0:
        return None
    return tqdm(
        total=settings.epochs, initial=initial, desc=f"{name:>12}", unit="ep", leave=False,
        file=sys.stderr, disable=not sys.stderr.isatty(),
    )  # fmt: skip


# -- files -------------------------------------------------------------------------------------


def _save_checkpoint(run: TrainingRun, path: Path, rank: int) -> None:
    if rank == 0:
        state = {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "log": [asdict(row) for row in run.log],
        }
        files.save(state, path)
    _barrier()


def write_csv(path: Path, log: list) -> None:
    """The per-epoch log as CSV (written whole each epoch, via a temporary file)."""
    with files.atomic_path(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(log[0])))
        writer.writeheader()
        for row in log:
            writer.writerow(asdict(row))
