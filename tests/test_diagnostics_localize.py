"""Localize and Diagnose on small models trained inside the tests."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dampopt import iKFAD
from dampopt.diagnostics import diagnose, layer_groups, localize, select_problem_layers

GROUPS = ["0", "2", "4", "6"]  # the four Linear layers of _mlp()


def _mlp():
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip


def _data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=generator)
    y = (x @ torch.randn(16, 4, generator=generator)).argmax(1)
    return x, y


@pytest.fixture(scope="module")
def trained():
    """An MLP that fits its 512 training examples exactly (0 errors)."""
    torch.manual_seed(0)
    x, y = _data()
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(80):  # full batch: cheap, and enough to fit all 512
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, x, y


def _broken(trained):
    """Shrink layer "2"'s weights 20x: it now causes errors, and since every other layer's gradient
    passes through (or takes its input from) the shrunk layer, its gradient is the one not scaled
    down - a correct localization must rank it first."""
    model = copy.deepcopy(trained[0])
    with torch.no_grad():
        model[2].weight.mul_(0.05)
    return model


def _loader(x, y, batch_size=50, **kwargs):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, **kwargs)


def _group_norms(model, x, y):
    """Oracle: per-group norm of the gradient of the mean loss on (x, y), in one batch."""
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    by_id = {id(p): g for p, g in zip(params, grads)}
    return {
        name: math.sqrt(sum(float(by_id[id(p)].pow(2).sum()) for p in ps))
        for name, ps in layer_groups(model).items()
    }


def test_localize_flags_the_deliberately_broken_layer(trained):
    x, y = trained[1:]
    healthy = localize(trained[0], _loader(x, y))
    assert healthy.num_errors == 0 and healthy.problem_layers == []
    assert "no misclassified examples among 512" in healthy.message
    assert healthy.specificity == dict.fromkeys(GROUPS)  # no sample to compare: None, not NaN
    json.dumps(healthy.to_dict(), allow_nan=False)

    broken = localize(_broken(trained), _loader(x, y))
    assert broken.num_errors > 10
    assert broken.ranking[0] == "2"
    assert "2" in broken.problem_layers and len(broken.problem_layers) == 2  # above the median
    assert "| 2 |" in broken.to_markdown() and "Problem" in broken.to_markdown()


def test_grad_norm_and_specificity_match_a_direct_computation(trained):
    model = _broken(trained)
    x, y = trained[1:]
    result = localize(model, _loader(x, y, batch_size=50))  # errors spread over 11 batches
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).nonzero().flatten()
    assert result.index_kind == "dataset"
    assert result.error_indices == wrong.tolist()
    assert result.error_labels == y[wrong].tolist()
    assert result.num_examples == 512 and result.num_errors == len(wrong)
    expected = _group_norms(model, x[wrong], y[wrong])
    assert result.grad_norms == pytest.approx(expected, rel=1e-5)
    assert result.norms == result.grad_norms

    # the cells: failures and as many references (correct examples) of the same batch
    evidence = result.evidence
    right = sorted(set(range(512)) - set(wrong.tolist()))
    assert result.num_cells == len(evidence.cell_failure_indices) >= 11
    for failures, references in zip(evidence.cell_failure_indices,
                                    evidence.cell_reference_indices):  # fmt: skip
        assert len(failures) == len(references) >= 1
        assert set(failures) <= set(wrong.tolist()) and set(references) <= set(right)
        assert {i // 50 for i in failures + references} == {failures[0] // 50}  # one batch
    every_failure = [i for cell in evidence.cell_failure_indices for i in cell]
    assert len(set(every_failure)) == len(every_failure)
    assert result.correct_sample_size == sum(map(len, evidence.cell_reference_indices))
    # specificity from a direct computation of every cell: the failures' over the references'
    # norm of each group, over the geometric mean of that ratio across groups; the geometric
    # mean over cells
    logs = {g: [] for g in GROUPS}
    for failures, references in zip(evidence.cell_failure_indices,
                                    evidence.cell_reference_indices):  # fmt: skip
        on_f = _group_norms(model, x[failures], y[failures])
        on_r = _group_norms(model, x[references], y[references])
        ratio = {g: math.log(on_f[g] / on_r[g]) for g in GROUPS}
        centre = sum(ratio.values()) / len(GROUPS)
        for g in GROUPS:
            logs[g].append(ratio[g] - centre)
    expected_specificity = {g: math.exp(sum(v) / len(v)) for g, v in logs.items()}
    assert result.specificity == pytest.approx(expected_specificity, rel=1e-5)
    assert result.effects == result.specificity and result.effect == "specificity"
    for g in GROUPS:
        low, high = result.intervals[g]
        assert low <= result.specificity[g] <= high
        assert 0 < result.p_values[g] <= 1


def test_relative_and_rms_criteria(trained):
    model = _broken(trained)
    loader = _loader(*trained[1:])
    base = localize(model, loader)
    relative = localize(model, loader, criterion="relative")
    rms = localize(model, loader, criterion="rms", rule="topk", k=1)
    for name, params in layer_groups(model).items():
        weight = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params))
        elements = sum(p.numel() for p in params)
        assert relative.norms[name] == pytest.approx(base.grad_norms[name] / weight, rel=1e-6)
        assert rms.norms[name] == pytest.approx(base.grad_norms[name] / math.sqrt(elements))
    assert rms.problem_layers == [max(rms.norms, key=rms.norms.get)]
    assert relative.grad_norms == base.grad_norms


def test_rules_on_the_papers_table_8():
    norms = {"conv1": 9.14, "bn1": 4.99, "layer1": 7.43, "layer2": 8.58, "layer3": 10.56,
             "layer4": 7.38, "fc": 0.86}  # fmt: skip
    assert select_problem_layers(norms, "median") == ["layer3", "conv1", "layer2"]
    assert select_problem_layers(norms, "topk", k=2) == ["layer3", "conv1"]
    # largest drop is bn1 -> fc (4.13): everything but fc
    assert select_problem_layers(norms, "gap") == ["layer3", "conv1", "layer2", "layer1",
                                                   "layer4", "bn1"]  # fmt: skip
    assert select_problem_layers({"a": 10, "b": 9, "c": 2, "d": 1}, "gap") == ["a", "b"]
    assert select_problem_layers({"a": 0.0, "b": 0.0}, "median") == []
    with pytest.raises(ValueError, match="rule"):
        select_problem_layers(norms, "mean")
    with pytest.raises(ValueError, match="k must"):
        select_problem_layers(norms, "topk", k=0)


def test_shuffled_loader_reports_positions_and_the_same_norms(trained):
    model = _broken(trained)
    x, y = trained[1:]
    ordered = localize(model, _loader(x, y))
    generator = torch.Generator().manual_seed(3)
    shuffled = localize(model, _loader(x, y, shuffle=True, generator=generator))
    assert shuffled.index_kind == "position"
    assert shuffled.num_errors == ordered.num_errors
    assert shuffled.grad_norms == pytest.approx(ordered.grad_norms, rel=1e-5)
    assert sorted(shuffled.error_indices) != ordered.error_indices  # positions, not indices


def test_localize_leaves_the_model_as_it_was(trained):
    model = _broken(trained)
    model[0].weight.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = localize(model, _loader(*trained[1:]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model[0].weight.requires_grad
    assert result.grad_norms["0"] > 0  # frozen parameters are still measured


def test_localize_rejects_bad_input(trained):
    model = _broken(trained)
    x, y = trained[1:]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        localize(model, _loader(x, y + 4))
    with pytest.raises(ValueError, match="unknown group 'layer9'"):
        localize(model, _loader(x, y), groups=["0", "layer9"])
    with pytest.raises(ValueError, match="criterion"):
        localize(model, _loader(x, y), criterion="hessian")
    with pytest.raises(ValueError, match="optimizer"):
        localize(model, _loader(x, y), criterion="friction")
    with pytest.raises(ValueError, match="no parameters"):
        localize(nn.Flatten(), _loader(x, y))


def test_friction_ranking_from_a_real_ikfad_run():
    x, y = _data()
    model = _mlp()
    optimizer = iKFAD(model.parameters(), lr=0.01)
    groups = layer_groups(model)
    accumulated = dict.fromkeys(groups, 0.0)  # oracle: sum over steps of the group's mean xi
    for xb, yb in _loader(x, y, batch_size=64):
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        for name, params in groups.items():
            total = sum(float(optimizer.friction(p).double().sum()) for p in params)
            accumulated[name] += total / sum(p.numel() for p in params)
    result = localize(model, None, criterion="friction", optimizer=optimizer)
    assert result.norms == pytest.approx(accumulated, rel=1e-5)
    assert result.ranking == sorted(accumulated, key=accumulated.get, reverse=True)
    assert len(set(result.norms.values())) == 4 and min(result.norms.values()) > 0
    assert result.problem_layers == result.ranking[:2]
    assert result.num_errors == 0 and result.error_indices == []
    with_loader = localize(model, _loader(x, y), criterion="friction", optimizer=optimizer)
    assert with_loader.norms == result.norms and with_loader.num_examples == 512


# -- Diagnose ------------------------------------------------------------------------------------


def _confusion_case():
    """A model whose predictions are known: input = 4 * one-hot(predicted class).

    logits = diag(1) @ diag(d) @ input, d = [3, 0.5, 3, 0.5]. For an error predicted as p,
    layer "1" (the second) gets gradient delta x (d_p * 4) and layer "0" gets delta x 4: layer
    "0" wins when d_p = 0.5, layer "1" when d_p = 3.
    """
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([3.0, 0.5, 3.0, 0.5])))
        model[1].weight.copy_(torch.eye(4))
    pairs = [(0, 1)] * 5 + [(2, 1)] * 3 + [(3, 2)] * 2 + [(1, 0)] + [(c, c) for c in range(4)] * 3
    true = torch.tensor([t for t, _ in pairs])
    predicted = torch.tensor([p for _, p in pairs])
    return model, 4.0 * F.one_hot(predicted, 4).float(), true


def test_diagnose_counts_pairs_and_attributes_each_to_its_layer():
    model, x, y = _confusion_case()
    # one batch: the correct examples come last, and cells pair errors with correct examples
    # of their own batch
    loader = _loader(x, y, batch_size=23)
    localization = localize(model, loader, rule="topk", k=2)
    assert localization.num_errors == 11
    names = ["plane", "car", "bird", "cat"]
    result = diagnose(model, loader, localization, top=3, class_names=names)
    rows = [(p.true, p.predicted, p.count, p.true_name, p.predicted_name) for p in result.pairs]
    assert rows == [(0, 1, 5, "plane", "car"), (2, 1, 3, "bird", "car"), (3, 2, 2, "cat", "bird")]
    for pair in result.pairs:
        chosen = (y == pair.true) & (model(x).argmax(1) == pair.predicted)
        expected = _group_norms(model, x[chosen], y[chosen])
        assert pair.grad_norms == pytest.approx(expected, rel=1e-5)
    # a handful of errors per pair (one per cell): too few to tell the two groups apart
    for pair in result.pairs:
        assert pair.cells == pair.count and set(pair.leading) == {"0", "1"}
        assert pair.attributed_layer == (pair.leading[0] if pair.distinguishable else None)
    assert not result.pairs[2].distinguishable  # 2 cells: no p below 1/4
    assert "| cat | bird | 2 | not distinguishable |" in result.to_markdown()
    json.dumps(result.to_dict(), allow_nan=False)

    # ten times the examples: predicted class 1 has d = 0.5, so layer "0" carries the larger
    # share of the (0 -> car) errors' pull (see _confusion_case), now clearly
    many = _loader(x.repeat(10, 1), y.repeat(10), batch_size=230)
    result = diagnose(model, many, localize(model, many, rule="topk", k=2), top=1)
    (pair,) = result.pairs
    assert (pair.count, pair.cells) == (50, 32)  # blocks=32 cells per batch at most
    assert pair.distinguishable and pair.attributed_layer == "0"
    assert pair.specificity["0"] > 1 > pair.specificity["1"]
    assert pair.intervals["0"][0] > pair.intervals["1"][1]


def test_diagnose_without_errors_and_with_bad_names():
    model, x, _ = _confusion_case()
    labels = model(x).argmax(1)
    localization = localize(model, _loader(x, labels))
    result = diagnose(model, _loader(x, labels), localization)
    assert result.pairs == [] and "no misclassified" in result.message
    model, x, y = _confusion_case()
    localization = localize(model, _loader(x, y))
    with pytest.raises(ValueError, match="class_names"):
        diagnose(model, _loader(x, y), localization, class_names=["a", "b"])
    with pytest.raises(ValueError, match="top"):
        diagnose(model, _loader(x, y), localization, top=0)


def test_custom_batch_sampler_gives_positions_and_wrapped_models_are_unwrapped():
    model, x, y = _confusion_case()
    dataset = TensorDataset(x, y)
    order = list(range(len(y)))[::-1]
    reversed_loader = DataLoader(dataset, batch_sampler=[order[i : i + 5] for i in range(0, 23, 5)])
    result = localize(model, reversed_loader)
    wrong = (model(x).argmax(1) != y).nonzero().flatten().tolist()
    assert result.index_kind == "position"
    assert result.error_indices == sorted(len(y) - 1 - i for i in wrong)
    plain = localize(model, _loader(x, y))
    assert localize(nn.DataParallel(model), _loader(x, y)).grad_norms == plain.grad_norms


def test_distributed_sampler_shard_skips_padding_and_reports_dataset_indices():
    from torch.utils.data.distributed import DistributedSampler

    from dampopt.diagnostics import predict

    model, x, y = _confusion_case()  # 23 examples: rank 1 of 2 gets 12, the last a repeat of 0
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=5)
    shard = DataLoader(dataset, batch_size=5, sampler=sampler)
    drawn = list(iter(sampler))
    rank0 = list(DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=5))
    assert len(drawn) == 12 and drawn[-1] == rank0[0]  # the repeat rank 0 also holds
    real = sorted(drawn[:11])  # rank 1's own examples
    result = localize(model, shard)
    wrong = (model(x).argmax(1) != y).nonzero().flatten().tolist()
    assert result.num_examples == 11 and result.index_kind == "dataset"
    assert result.error_indices == [i for i in real if i in wrong]
    labels, preds = predict(model, shard)
    assert labels.tolist() == y[real].tolist()  # dataset order, each example once
    assert preds.tolist() == model(x[real]).argmax(1).tolist()
