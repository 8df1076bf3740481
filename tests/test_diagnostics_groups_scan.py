"""layer_groups on real architectures, and the Scan step's regime counts."""

import math

import pytest
import torch
from torch import nn

from dampopt import PhysicsSGD, iKFAD, physics_momentum
from dampopt.diagnostics import (
    RegimeMonitor,
    cosine_schedule,
    layer_groups,
    resolve_groups,
    scan_schedule,
)

torchvision = pytest.importorskip("torchvision")


class TinyTransformer(nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.encoder = nn.TransformerEncoder(
            layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False
        )
        self.head = nn.Linear(8, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight


def _ids(params):
    return [id(p) for p in params]


def test_resnet18_depth1_is_the_papers_seven_groups():
    model = torchvision.models.resnet18(weights=None)
    groups = layer_groups(model)
    assert list(groups) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    for name, params in groups.items():
        assert _ids(params) == _ids(model.get_submodule(name).parameters())
    assert sum(len(ps) for ps in groups.values()) == len(list(model.parameters()))


def test_resnet18_depth2_is_residual_blocks():
    groups = layer_groups(torchvision.models.resnet18(weights=None), depth=2)
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert list(groups) == ["conv1", "bn1", *blocks, "fc"]
    # a BasicBlock: conv1, bn1 (2), conv2, bn2 (2); blocks 2.0/3.0/4.0 add downsample conv + bn
    assert len(groups["layer1.0"]) == 6
    assert len(groups["layer2.0"]) == 9


def test_transformer_depth_and_pattern():
    model = TinyTransformer()
    assert list(layer_groups(model, depth=1)) == ["embed", "encoder", "head"]
    # the ModuleList encoder.layers is a container, not a level: depth 2 names the blocks
    depth2 = layer_groups(model, depth=2)
    assert list(depth2) == ["embed", "encoder.layers.0", "encoder.layers.1", "encoder.norm", "head"]
    assert _ids(depth2["encoder.layers.1"]) == _ids(model.encoder.layers[1].parameters())
    by_block = layer_groups(model, depth=1, pattern=r"encoder\.layers\.\d+")
    assert list(by_block) == ["embed", "encoder.layers.0", "encoder.layers.1", "encoder", "head"]
    assert _ids(by_block["encoder"]) == _ids(model.encoder.norm.parameters())
    by_kind = layer_groups(model, depth=1, pattern=r".*\.(self_attn|linear\d)\.")
    assert list(by_kind) == ["embed", "self_attn", "linear1", "linear2", "encoder", "head"]
    assert len(by_kind["self_attn"]) == 8  # in_proj w/b + out_proj w/b, two blocks


def test_shared_parameters_are_counted_once():
    model = TinyTransformer(tied=True)
    groups = layer_groups(model, depth=1)
    assert list(groups) == ["embed", "encoder"]  # head.weight is embed.weight
    flat = [id(p) for ps in groups.values() for p in ps]
    assert len(flat) == len(set(flat)) == len(list(model.parameters()))


def test_parameter_on_the_model_itself_is_its_own_group():
    model = nn.Sequential(nn.Linear(2, 2))
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))
    assert list(layer_groups(model)) == ["scale", "0"]  # named_parameters lists own ones first


def test_bad_group_input_raises():
    with pytest.raises(ValueError, match="no parameters"):
        layer_groups(nn.ReLU())
    with pytest.raises(ValueError, match="depth"):
        layer_groups(nn.Linear(2, 2), depth=0)
    with pytest.raises(ValueError, match="regular expression"):
        layer_groups(nn.Linear(2, 2), pattern="(")
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="layer5"):
        resolve_groups(model, ["layer3", "layer5"])
    with pytest.raises(ValueError, match="not a parameter of model"):
        resolve_groups(model, {"x": [nn.Parameter(torch.ones(1))]})
    assert _ids(resolve_groups(model, ["layer1.0"])["layer1.0"]) == _ids(
        model.layer1[0].parameters()
    )


# -- Scan ----------------------------------------------------------------------------------------

PAPER_LRS = cosine_schedule(0.1, 1e-4, 200)


def test_cosine_schedule_matches_update_rules_formula():
    assert PAPER_LRS[0] == 0.1
    e = 137
    assert PAPER_LRS[e] == pytest.approx(
        1e-4 + (0.1 - 1e-4) * (1 + math.cos(math.pi * e / 200)) / 2
    )
    # the paper's correction schedule, Table 16: epochs 1, 10, 30 at 0.01, 0.00796, 0.00013
    correction = cosine_schedule(0.01, 1e-4, 30)
    assert [round(correction[i], 5) for i in (0, 9, 29)] == [0.01, 0.00796, 0.00013]


def test_scan_baseline_is_170_21_9():
    report = scan_schedule(PAPER_LRS, 0.9)
    assert report.counts == {"underdamped": 170, "critical": 21, "overdamped": 9}
    first, last = report.rows[0], report.rows[-1]
    # Table 15: epoch 1 dmu = +0.532, epoch 200 dmu = -0.079
    assert (first.epoch, round(first.dmu, 3), first.regime) == (1, 0.532, "underdamped")
    assert (last.epoch, round(last.dmu, 3), last.regime) == (200, -0.079, "overdamped")
    assert "| underdamped | 170 | 0.85 |" in report.to_markdown()


def test_scan_clamped_physics_schedule_counts_what_the_rule_gives():
    # the README's rule: 66 underdamped epochs (clamp at 0.5 > mu_c + 0.05), not the paper's 0
    mus = [physics_momentum(lr) for lr in PAPER_LRS]
    report = scan_schedule(PAPER_LRS, mus)
    assert report.counts == {"underdamped": 66, "critical": 134, "overdamped": 0}
    underdamped = [row.epoch for row in report.rows if row.regime == "underdamped"]
    assert underdamped == list(range(1, 67))  # all in the clamped, high-lr phase
    assert all(row.mu == 0.5 for row in report.rows[:66])


def test_scan_rejects_bad_input():
    with pytest.raises(ValueError, match="mus"):
        scan_schedule([0.1, 0.01], [0.9])
    with pytest.raises(ValueError, match="empty"):
        scan_schedule([], 0.9)
    with pytest.raises(ValueError, match="mu"):
        scan_schedule([0.1], 1.0)


def _step(optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()


def test_regime_monitor_sgd_with_scheduler_matches_scan_schedule():
    params = [nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8, eta_min=1e-4)
    monitor = RegimeMonitor(optimizer)
    lrs = []
    for _ in range(8):
        _step(optimizer)
        lrs.append(optimizer.param_groups[0]["lr"])
        monitor.record()
        scheduler.step()
    assert monitor.report().to_dict() == scan_schedule(lrs, 0.9).to_dict()
    assert lrs[0] == 0.1 and lrs[-1] < 0.01


def test_regime_monitor_reads_adam_beta1():
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=0.01, betas=(0.8, 0.999))
    row = RegimeMonitor(optimizer).record()
    assert (row.mu, row.regime) == (0.8, "critical")  # mu_c(0.01) = 0.8
    assert row.mu_c == pytest.approx(0.8)


def test_regime_monitor_reads_physics_sgd_momentum_in_effect():
    optimizer = PhysicsSGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    monitor = RegimeMonitor(optimizer)
    _step(optimizer)
    row = monitor.record()  # clamped at mu_min: mu = 0.5 > mu_c + 0.05
    assert (row.mu, row.regime) == (0.5, "underdamped")
    optimizer.param_groups[0]["lr"] = 0.01
    _step(optimizer)
    assert monitor.record().regime == "critical"  # 1 - 2 sqrt(0.01) = 0.8
    optimizer.switch()
    row = monitor.record()  # after the hybrid switch the constant 0.9 is in effect
    assert (row.mu, row.regime) == (0.9, "underdamped")


def test_regime_monitor_uses_physics_sgd_curvature():
    optimizer = PhysicsSGD([nn.Parameter(torch.zeros(2))], lr=0.01, curvature=4.0)
    row = RegimeMonitor(optimizer).record()
    # mu = mu_c = 1 - 2 sqrt(4 * 0.01) = 0.6: critical for curvature 4 (overdamped for 1)
    assert row.mu == pytest.approx(0.6) and row.regime == "critical"


def test_regime_monitor_rejects_optimizer_without_momentum():
    with pytest.raises(ValueError, match="momentum"):
        RegimeMonitor(iKFAD([nn.Parameter(torch.zeros(2))]))
    with pytest.raises(ValueError, match="record"):
        RegimeMonitor(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)).report()


def test_wrapped_models_are_grouped_by_their_own_names():
    model = torchvision.models.resnet18(weights=None)
    plain = layer_groups(model)
    for wrapped in (torch.compile(model), nn.DataParallel(model)):  # compile is lazy: no cost
        groups = layer_groups(wrapped)
        assert list(groups) == list(plain)
        assert all(_ids(groups[k]) == _ids(plain[k]) for k in plain)
