"""Worker side of the distributed diagnostics tests: localize, diagnose, predict and verify
on a loader sharded by DistributedSampler, to compare with one process on the whole data.

Runs inside the ranks spawned by tests/test_distributed.py (one spawn serves all tests) and in
the parent for the single-process side.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from dampopt import diagnostics

NUM_CLASSES = 3
FEATURES = 5
BATCH = 5  # does not divide a rank's share, so the last batch is short
# 24 divides by the 2 ranks; 25 does not, and DistributedSampler then repeats index 0 on rank 1.
EVEN_SIZE = 24
ODD_SIZE = 25


def make_classifier() -> nn.Module:
    """An untrained 3-class MLP: on random labels about two thirds of its answers are wrong,
    so there are errors in several confusion pairs to localize and diagnose."""
    torch.manual_seed(4321)
    return nn.Sequential(
        nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, NUM_CLASSES)
    )


def make_dataset(size: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(size, FEATURES, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
    return TensorDataset(inputs, labels)


def treated(model: nn.Module) -> nn.Module:
    """A fixed perturbation of the head, standing in for a treatment: some answers change."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        head = model[-1]
        head.weight.add_(torch.randn(head.weight.shape, generator=generator))
    return model


def sharded_loader(size: int, rank: int, world_size: int, shuffle: bool) -> DataLoader:
    dataset = make_dataset(size)
    sampler = DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=3)
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler)


def whole_loader(size: int) -> DataLoader:
    return DataLoader(make_dataset(size), batch_size=BATCH)


def run_pipeline(loader) -> dict:
    """Localize, diagnose and verify the classifier on ``loader``; plain, comparable values."""
    model = make_classifier()
    localization = diagnostics.localize(model, loader)
    diagnosis = diagnostics.diagnose(model, loader, localization)
    labels, before = diagnostics.predict(model, loader)
    _, after = diagnostics.predict(treated(model), loader)
    verification = diagnostics.verify(labels, before, after)
    return {
        "localization": localization.to_dict(),
        "diagnosis": diagnosis.to_dict(),
        "verification": verification.to_dict(),
    }


#: (name, dataset size, DistributedSampler shuffle) of the sharded runs
SHARDED_RUNS = (
    ("even", EVEN_SIZE, False),
    ("even-shuffled", EVEN_SIZE, True),
    ("odd", ODD_SIZE, False),
)


def run_sharded(rank: int, world_size: int) -> dict:
    """Spawn side: every sharded run on this rank, {name: run_pipeline result}."""
    return {
        name: run_pipeline(sharded_loader(size, rank, world_size, shuffle))
        for name, size, shuffle in SHARDED_RUNS
    }
