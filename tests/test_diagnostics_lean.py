"""localize's lean pass: gradients only for the requested groups, flags restored, fp32 norms."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dampopt.diagnostics import error_gradients, localize
from dampopt.diagnostics._stats import group_norms


def _model_and_loader():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 3))  # fmt: skip
    x = torch.randn(60, 5)
    y = torch.randint(0, 3, (60,))
    return model, DataLoader(TensorDataset(x, y), batch_size=20)


def test_only_the_requested_groups_require_grad_during_the_pass_and_flags_come_back():
    model, loader = _model_and_loader()
    model[2].bias.requires_grad_(False)  # frozen, but requested: differentiated anyway
    model[4].weight.requires_grad_(False)  # frozen and not requested
    before = [p.requires_grad for p in model.parameters()]
    seen = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append([p.requires_grad for p in module.parameters()])
    )
    found = localize(model, loader, groups=["2"])
    # 0.weight, 0.bias, 2.weight, 2.bias, 4.weight, 4.bias: only layer 2 during every forward
    assert seen and all(flags == [False, False, True, True, False, False] for flags in seen)
    assert [p.requires_grad for p in model.parameters()] == before
    assert list(found.grad_norms) == ["2"] and found.grad_norms["2"] > 0
    # the same norm as with every parameter differentiated
    everything = localize(model, loader, groups={"2": list(model[2].parameters()),
                                                 "rest": list(model[0].parameters())})  # fmt: skip
    assert found.grad_norms["2"] == pytest.approx(everything.grad_norms["2"], rel=1e-6)


def test_existing_grad_fields_are_set_aside_and_put_back_unchanged():
    model, loader = _model_and_loader()
    x, y = loader.dataset.tensors
    F.cross_entropy(model(x), y).backward()  # a training step's gradients, not yet applied
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]
    found = localize(model, loader)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(g, v) for g, v in zip(grads, values))
    # and the result is the one of a model without .grad
    for p in model.parameters():
        p.grad = None
    assert localize(model, loader).grad_norms == found.grad_norms


def test_flags_and_modes_come_back_when_the_pass_fails():
    model, loader = _model_and_loader()
    model.train()
    model[0].weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # a user's accumulated gradients, which must survive
        p.grad = torch.full_like(p, 0.5)
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    calls = []

    def fail_on_the_second_batch(module, args):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")

    model[4].register_forward_pre_hook(fail_on_the_second_batch)
    with pytest.raises(RuntimeError, match="boom"):
        localize(model, loader, groups=["2"])
    assert [p.requires_grad for p in model.parameters()] == before
    for p, (grad, value) in zip(model.parameters(), grads):
        assert p.grad is grad and torch.equal(grad, value)
    assert all(m.training for m in model.modules())


def test_fp32_group_norms_match_float64_and_references_are_summed_only_on_request():
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, 200, generator=generator) * 1e-3, torch.randn(7, generator=generator)]
    exact = [math.sqrt(float(grads[0].double().pow(2).sum())),
             math.sqrt(float(sum(g.double().pow(2).sum() for g in grads)))]  # fmt: skip
    norms = group_norms(grads, [[0], [0, 1]], count=4)
    assert norms.dtype == torch.float64
    assert norms.tolist() == pytest.approx([e / 4 for e in exact], rel=1e-6)

    model, loader = _model_and_loader()
    params = list(model.parameters())
    lean = error_gradients(model, loader, params)
    assert lean.correct_sums is None  # one accumulator per parameter by default
    full = error_gradients(model, loader, params, reference_sums=True)
    for a, b in zip(lean.error_sums, full.error_sums):
        assert torch.equal(a, b)
    x, y = loader.dataset.tensors
    refs = [i for cell in full.cell_reference_indices for i in cell]
    expected = torch.autograd.grad(F.cross_entropy(model(x[refs]), y[refs], reduction="sum"),
                                   params)  # fmt: skip
    for a, b in zip(full.correct_sums, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_hooks_of_an_optimizer_in_backward_do_not_run_and_weights_stay():
    # the optimizer-in-backward pattern: a post-accumulate-grad hook steps each parameter
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(),
                             nn.Linear(3, 3))  # fmt: skip

    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    model, steps = make(), []
    optimizers = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}

    def hook(param):
        steps.append(1)
        optimizers[param].step()
        optimizers[param].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    before = [p.detach().clone() for p in model.parameters()]
    hooked = localize(model, DataLoader(TensorDataset(x, y), batch_size=16), seed=0)
    assert not steps and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    reference = localize(make(), DataLoader(TensorDataset(x, y), batch_size=16), seed=0)
    assert hooked.num_errors == reference.num_errors > 0
    for name in reference.grad_norms:
        assert hooked.grad_norms[name] == pytest.approx(reference.grad_norms[name], rel=1e-5)
