"""Treat: what trains, what stays bit-identical, and the paper's correction protocol."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dampopt import iKFAD, physics_momentum
from dampopt.diagnostics import friction_mask, localize, treat


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _loader(n=64, batch_size=16):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, 1, 6, 6, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _identical(state, model, prefixes):
    return {
        k: torch.equal(state[k], v)
        for k, v in model.state_dict().items()
        if k.split(".")[0] in prefixes
    }


def test_treat_trains_only_the_chosen_layers_and_leaves_the_input_alone():
    model = SmallCNN().train()
    model.conv1.bias.requires_grad_(False)
    original = _snapshot(model)
    corrected, report = treat(model, _loader(), layers=["conv2", "bn2"], epochs=2, lr=0.05)

    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert model.training and not model.conv1.bias.requires_grad and model.fc.weight.grad is None
    # frozen groups: parameters and BatchNorm running statistics bit-identical
    assert all(_identical(original, corrected, {"conv1", "bn1", "fc"}).values())
    trained = _identical(original, corrected, {"conv2", "bn2"})
    for key in ("conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias", "bn2.running_mean"):
        assert not trained[key], key
    assert [p.requires_grad for p in corrected.parameters()] == [
        p.requires_grad for p in model.parameters()
    ]
    assert corrected.training

    assert report.layers == ["conv2", "bn2"]
    assert (report.trainable_tensors, report.total_tensors) == (4, 10)
    assert report.trainable_elements == 4 * 4 * 9 + 4 + 4 + 4
    assert report.element_fraction == report.trainable_elements / report.total_elements
    # cosine over the 8 steps, from lr at the first step to lr_min = lr/100 exactly at the last
    steps = [0.0005 + 0.0495 * (1 + math.cos(math.pi * t / 7)) / 2 for t in range(8)]
    assert report.lr_schedule == pytest.approx([steps[0], steps[4]], rel=1e-12)
    assert report.final_lr == pytest.approx(0.0005, rel=1e-12)
    assert report.momentum_schedule == [physics_momentum(lr) for lr in report.lr_schedule]
    assert report.steps == 8 and len(report.epoch_losses) == 2 and report.wall_time_s > 0
    json.dumps(report.to_dict(), allow_nan=False)
    assert "| trainable tensors | 4/10 |" in report.to_markdown()


def test_treat_defaults_follow_the_papers_table_16_protocol():
    # 16 steps an epoch: each epoch starts where the paper's per-epoch cosine puts it
    corrected, report = treat(SmallCNN(), _loader(n=16, batch_size=1), layers=["fc"])
    assert (report.epochs, report.optimizer, report.steps) == (30, "physics", 480)
    at = (0, 9, 29)  # epochs 1, 10, 30
    assert [report.lr_schedule[e] for e in at] == pytest.approx([0.01, 0.00796, 0.00013],
                                                                abs=1e-5)  # fmt: skip
    assert [report.momentum_schedule[e] for e in at] == pytest.approx([0.8, 0.8216, 0.9775],
                                                                      abs=2e-3)  # fmt: skip
    assert report.final_lr == pytest.approx(1e-4, rel=1e-12)


@pytest.mark.parametrize("epochs", [1, 2])
def test_short_treatments_anneal_to_lr_min(epochs):
    seen = []

    def record(params, lr):
        optimizer = torch.optim.SGD(params, lr=lr)
        original = optimizer.step

        def step(*args, **kwargs):
            seen.append(optimizer.param_groups[0]["lr"])
            return original(*args, **kwargs)

        optimizer.step = step
        return optimizer

    _, report = treat(SmallCNN(), _loader(), layers=["fc"], epochs=epochs, lr=0.01,
                      optimizer=record)  # fmt: skip
    total = 4 * epochs
    expected = [1e-4 + (0.01 - 1e-4) * (1 + math.cos(math.pi * t / (total - 1))) / 2
                for t in range(total)]  # fmt: skip
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[0] == pytest.approx(0.01) and seen[-1] == pytest.approx(1e-4)
    assert report.final_lr == pytest.approx(1e-4) and report.steps == total


@pytest.mark.parametrize("key_by_name", [False, True])
def test_mask_changes_only_the_masked_elements(key_by_name):
    model = SmallCNN()
    original = _snapshot(model)
    mask = torch.rand(model.conv2.weight.shape) < 0.5
    key = "conv2.weight" if key_by_name else model.conv2.weight
    # Adam + weight decay + EWC would all move an element whose gradient is merely zeroed
    corrected, report = treat(
        model, _loader(), mask={key: mask}, epochs=2, lr=0.05, optimizer="adam",
        weight_decay=0.1, ewc=0.5,
    )  # fmt: skip
    after = corrected.conv2.weight.detach()
    before = original["conv2.weight"]
    assert torch.equal(after[~mask], before[~mask])
    assert bool((after[mask] != before[mask]).all())
    others = {k for k in original if k != "conv2.weight"}  # incl. BN statistics: eval mode
    assert all(torch.equal(original[k], corrected.state_dict()[k]) for k in others)
    assert report.masked and report.trainable_tensors == 1
    assert report.trainable_elements == int(mask.sum())
    assert report.momentum_schedule == [0.9, 0.9]  # Adam's beta1


def test_friction_mask_from_an_ikfad_run_feeds_treat():
    model = SmallCNN()
    optimizer = iKFAD(model.parameters(), lr=0.01)
    for x, y in _loader():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    masks = friction_mask(optimizer, fraction=0.15)
    params = list(model.parameters())
    assert list(masks) == params
    total = sum(p.numel() for p in params)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.15 * total)
    chosen = torch.cat([optimizer.friction(p)[masks[p]] for p in params])
    rest = torch.cat([optimizer.friction(p)[~masks[p]] for p in params])
    assert float(chosen.min()) >= float(rest.max())

    original = _snapshot(model)
    corrected, report = treat(model, _loader(), mask=masks, epochs=1, lr=0.05)
    for name, param in corrected.named_parameters():
        keep = ~masks[dict(model.named_parameters())[name]]
        assert torch.equal(param.detach()[keep], original[name][keep]), name
    assert report.trainable_elements == round(0.15 * total)


def test_ewc_keeps_the_trained_layer_closer_to_the_original():
    model = SmallCNN()
    original = model.fc.weight.detach().clone()
    free, _ = treat(model, _loader(), layers=["fc"], epochs=3, lr=0.05, optimizer="sgd")
    held, report = treat(
        model, _loader(), layers=["fc"], epochs=3, lr=0.05, optimizer="sgd", ewc=10
    )
    drift_free = float((free.fc.weight.detach() - original).norm())
    drift_held = float((held.fc.weight.detach() - original).norm())
    assert 0 < drift_held < 0.5 * drift_free
    assert report.ewc == 10 and report.optimizer == "sgd"


def test_treat_takes_a_localization_and_int32_labels():
    model = SmallCNN()
    localization = localize(model, _loader(), rule="topk", k=2)
    x, y = _loader().dataset.tensors
    int32 = DataLoader(TensorDataset(x, y.int()), batch_size=16)
    _, report = treat(model, int32, layers=localization, epochs=1)
    assert report.layers == localization.problem_layers and len(report.layers) == 2


def test_treat_rejects_bad_input_before_training():
    model = SmallCNN()
    loader = _loader()
    with pytest.raises(ValueError, match="layers .* or mask"):
        treat(model, loader)
    with pytest.raises(ValueError, match="unknown group 'conv3'"):
        treat(model, loader, layers=["conv3"])
    with pytest.raises(ValueError, match="epochs"):
        treat(model, loader, layers=["fc"], epochs=0)
    with pytest.raises(ValueError, match="optimizer"):
        treat(model, loader, layers=["fc"], optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr"):
        treat(model, loader, layers=["fc"], lr=-1.0)
    with pytest.raises(ValueError, match="shape"):
        treat(model, loader, mask={"fc.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not a parameter"):
        treat(model, loader, mask={nn.Parameter(torch.ones(1)): torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="nothing to train"):
        treat(model, loader, mask={"fc.bias": torch.zeros(3, dtype=torch.bool)})
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="no batch"):
        treat(model, empty, layers=["fc"])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        treat(model, DataLoader(TensorDataset(torch.zeros(2, 1, 6, 6), torch.tensor([0, 3]))),
              layers=["fc"])  # fmt: skip
    with pytest.raises(TypeError, match="iKFAD"):
        friction_mask(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="not taken a step"):
        friction_mask(iKFAD(model.parameters()))
