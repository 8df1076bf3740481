"""torch.optim's generic conventions, for every optimizer and CPU backend, from one table.

Written for this project after what torch's test/test_optim.py checks (state_dict determinism
and round trips, weights_only loading, hooks, tensor lr, param groups with schedulers,
deepcopy, multi-tensor paths equal to the for-loop one); not a copy of it. The compiled
backend is left out of the matrix: it is the same arithmetic as "torch" (test_compiled_backend.py
compares them) and compiling per case would take minutes.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dampopt

CONFIGS = {
    "physics-single": (dampopt.PhysicsSGD, dict(lr=0.05, foreach=False, weight_decay=1e-3)),
    "physics-foreach": (dampopt.PhysicsSGD, dict(lr=0.05, foreach=True, weight_decay=1e-3)),
    "physics-fused": (dampopt.PhysicsSGD, dict(lr=0.05, fused=True, weight_decay=1e-3)),
    "physics-hybrid": (dampopt.PhysicsSGD, dict(lr=0.05, switch_step=2, nesterov=True)),
    "ikfad-loop": (dampopt.iKFAD, dict(backend="loop", weight_decay=1e-3)),
    "ikfad-torch": (dampopt.iKFAD, dict(backend="torch", weight_decay=1e-3)),
    "cd-loop": (dampopt.CubicDampedSGD, dict(backend="loop", c=0.1)),
    "cd-torch": (dampopt.CubicDampedSGD, dict(backend="torch", c=0.1)),
    "cadam-loop": (dampopt.CADAM, dict(backend="loop")),
    "cadam-torch": (dampopt.CADAM, dict(backend="torch")),
}
# the multi-tensor path of each against its for-loop reference
PAIRS = [("physics-foreach", "physics-single"), ("physics-fused", "physics-single"),
         ("ikfad-torch", "ikfad-loop"), ("cd-torch", "cd-loop"), ("cadam-torch", "cadam-loop")]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(step):
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def _train(model, optimizer, steps, start=0, scheduler=None):
    for step in range(start, start + steps):
        x, y = _batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _build(name, model=None, **overrides):
    cls, kwargs = CONFIGS[name]
    model = model or _model()
    return model, cls(model.parameters(), **{**kwargs, **overrides})


def _equal_dicts(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_dicts(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_dicts(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_is_deterministic_and_a_round_trip_resumes_bit_identically(name):
    model, optimizer = _build(name)
    _train(model, optimizer, 3)
    assert _equal_dicts(optimizer.state_dict(), optimizer.state_dict())
    buffer = io.BytesIO()
    torch.save((model.state_dict(), optimizer.state_dict()), buffer)
    buffer.seek(0)
    model_state, optimizer_state = torch.load(buffer, weights_only=True)  # plain data only
    resumed_model, resumed = _build(name)
    resumed_model.load_state_dict(model_state)
    resumed.load_state_dict(optimizer_state)
    _train(model, optimizer, 3, start=3)
    _train(resumed_model, resumed, 3, start=3)
    assert torch.equal(_flat(model), _flat(resumed_model))
    assert _equal_dicts(optimizer.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("name", CONFIGS)
def test_hooks_run_and_see_the_whole_state_dict(name):
    model, optimizer = _build(name)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("sd-pre"))
    optimizer.register_state_dict_post_hook(
        lambda opt, sd: calls.append(("sd-post", "switch_step" in sd["param_groups"][0])))
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load-pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load-post"))
    _train(model, optimizer, 2)
    optimizer.load_state_dict(optimizer.state_dict())
    physics = isinstance(optimizer, dampopt.PhysicsSGD)
    # PhysicsSGD's state dict carries its hybrid settings in its param groups, as torch makes it
    assert calls == ["pre", "post", "pre", "post", "sd-pre", ("sd-post", physics), "load-pre",
                     "load-post"]  # fmt: skip


@pytest.mark.parametrize("name", CONFIGS)
def test_a_tensor_lr_equals_the_float_lr(name):
    lr = CONFIGS[name][1].get("lr", CONFIGS[name][0].__init__.__defaults__[0])
    model, optimizer = _build(name)
    tensor_model, tensor_optimizer = _build(name, lr=torch.tensor(lr))
    _train(model, optimizer, 3)
    _train(tensor_model, tensor_optimizer, 3)
    assert torch.allclose(_flat(model), _flat(tensor_model), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", CONFIGS)
def test_param_groups_follow_their_own_scheduled_lr(name):
    cls, kwargs = CONFIGS[name]
    model = _model()
    base = kwargs.get("lr", cls.__init__.__defaults__[0])
    optimizer = cls([{"params": model[0].parameters()},
                     {"params": model[2].parameters(), "lr": base / 10}],
                    **kwargs)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    _train(model, optimizer, 4, scheduler=scheduler)
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs == pytest.approx([base / 4, base / 40])
    frozen = _model()
    only_first = cls([{"params": frozen[0].parameters()},
                      {"params": frozen[2].parameters(), "lr": base / 10}], **kwargs)  # fmt: skip
    before = _flat(frozen[2])
    for p in frozen[2].parameters():
        p.requires_grad_(False)  # a group without grads is skipped, as in torch
    _train(frozen, only_first, 1)
    assert torch.equal(_flat(frozen[2]), before)


@pytest.mark.parametrize("name", CONFIGS)
def test_deepcopy_continues_the_same_trajectory(name):
    model, optimizer = _build(name)
    _train(model, optimizer, 2)
    copied_model = copy.deepcopy(model)
    copied = copy.deepcopy(optimizer)
    copied_opt = type(optimizer)(copied_model.parameters(), **CONFIGS[name][1])
    copied_opt.load_state_dict(copied.state_dict())
    _train(model, optimizer, 2, start=2)
    _train(copied_model, copied_opt, 2, start=2)
    assert torch.equal(_flat(model), _flat(copied_model))


@pytest.mark.parametrize(("fast", "loop"), PAIRS, ids=[f"{a}-vs-{b}" for a, b in PAIRS])
def test_multi_tensor_paths_equal_the_for_loop(fast, loop):
    fast_model, fast_opt = _build(fast)
    loop_model, loop_opt = _build(loop)
    _train(fast_model, fast_opt, 5)
    _train(loop_model, loop_opt, 5)
    assert torch.allclose(_flat(fast_model), _flat(loop_model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_an_older_state_dict_without_newer_keys_loads_and_resumes_identically(name):
    model, optimizer = _build(name)
    _train(model, optimizer, 2)
    older = copy.deepcopy(optimizer.state_dict())
    for group in older["param_groups"]:
        group.pop("nonfinite")  # keys added since 0.1.0 get their defaults
        if isinstance(optimizer, dampopt.PhysicsSGD):
            for key in ("foreach", "fused", "maximize"):
                group.pop(key)
    resumed_model = copy.deepcopy(model)
    resumed = type(optimizer)(resumed_model.parameters(), **CONFIGS[name][1])
    resumed.load_state_dict(older)
    assert resumed.param_groups[0]["nonfinite"] is None
    _train(model, optimizer, 2, start=2)
    _train(resumed_model, resumed, 2, start=2)
    assert torch.equal(_flat(model), _flat(resumed_model))
