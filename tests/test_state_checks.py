"""State dicts and hand-changed state are checked before anything changes (issue 12, part 1)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_torch_conventions import _equal_dicts as _same  # noqa: E402 - one comparison helper
from torch import nn

import dampopt
from dampopt.diagnostics import compare_layers


def _model(shape=(6, 4)):
    torch.manual_seed(0)
    return nn.Linear(*shape)


def _stepped(optimizer_cls, model, steps=2, **kwargs):
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    x, y = torch.randn(16, model.in_features), torch.randint(0, model.out_features, (16,))
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer


def _snapshot(optimizer):
    return copy.deepcopy(optimizer.state_dict())


OTHERS = [
    (dampopt.PhysicsSGD, dict(lr=0.1), torch.optim.SGD, dict(lr=0.1, momentum=0.9), "mu_min"),
    (dampopt.iKFAD, {}, torch.optim.Adam, dict(lr=1e-3), "backend"),
    (dampopt.CADAM, {}, dampopt.iKFAD, {}, "'c'"),
    (dampopt.CubicDampedSGD, {}, dampopt.PhysicsSGD, dict(lr=0.1), "backend"),
]


@pytest.mark.parametrize(("target", "kwargs", "source", "source_kwargs", "missing"), OTHERS,
                         ids=lambda v: getattr(v, "__name__", None))  # fmt: skip
def test_a_state_dict_of_another_optimizer_is_refused_before_anything_is_stored(
    target, kwargs, source, source_kwargs, missing
):
    optimizer = _stepped(target, _model(), **kwargs)
    before = _snapshot(optimizer)
    other = _stepped(source, _model(), **source_kwargs).state_dict()
    with pytest.raises(ValueError, match=f"lacks.*{missing}.*not a {target.__name__} state dict"):
        optimizer.load_state_dict(other)
    assert _same(optimizer.state_dict(), before)


@pytest.mark.parametrize("fused", [False, True])
def test_state_of_other_shapes_is_refused_not_loaded(fused):
    # Linear(6, 4) and Linear(4, 6) have the same parameter count per tensor list
    optimizer = _stepped(dampopt.PhysicsSGD, _model((6, 4)), lr=0.1, fused=fused)
    before = _snapshot(optimizer)
    other = _stepped(dampopt.PhysicsSGD, _model((4, 6)), lr=0.1).state_dict()
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter 0 has shape \(6, 4\)"):
        optimizer.load_state_dict(other)
    assert _same(optimizer.state_dict(), before)
    friction = _stepped(dampopt.iKFAD, _model((6, 4)))
    with pytest.raises(ValueError, match="has shape"):
        friction.load_state_dict(_stepped(dampopt.iKFAD, _model((4, 6))).state_dict())


def test_unknown_state_entries_and_group_counts_are_refused():
    optimizer = _stepped(dampopt.PhysicsSGD, _model(), lr=0.1)
    state = optimizer.state_dict()
    bad = copy.deepcopy(state)
    bad["state"][0]["exp_avg"] = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"entries \['exp_avg'\]"):
        optimizer.load_state_dict(bad)
    bad = copy.deepcopy(state)
    bad["param_groups"].append(copy.deepcopy(bad["param_groups"][0]))
    with pytest.raises(ValueError, match="2 param groups"):
        optimizer.load_state_dict(bad)
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        optimizer.load_state_dict({"state": {}})
    bad = copy.deepcopy(state)
    bad["hybrid"] = {"switch_step": None}
    with pytest.raises(ValueError, match="hybrid"):
        optimizer.load_state_dict(bad)


def test_an_older_physics_sgd_state_dict_gets_torchs_defaults():
    full = _stepped(dampopt.PhysicsSGD, _model(), lr=0.1)
    partial = copy.deepcopy(full.state_dict())
    for group in partial["param_groups"]:
        for key in ("foreach", "fused", "maximize", "nesterov", "nonfinite"):
            del group[key]
    model = _model()
    resumed = dampopt.PhysicsSGD(model.parameters(), lr=0.1)
    resumed.load_state_dict(partial)
    group = resumed.param_groups[0]
    assert (group["foreach"], group["fused"], group["maximize"], group["nesterov"]) == (
        None, None, False, False)  # fmt: skip
    reference_model = _model()
    reference = dampopt.PhysicsSGD(reference_model.parameters(), lr=0.1)
    reference.load_state_dict(full.state_dict())
    for m, opt in ((model, resumed), (reference_model, reference)):
        m.weight.grad = torch.ones_like(m.weight)
        m.bias.grad = torch.ones_like(m.bias)
        opt.step()
    assert torch.equal(model.weight, reference_model.weight)


@pytest.mark.parametrize(("cls", "kwargs", "name"), [
    (dampopt.PhysicsSGD, dict(lr=0.1), "momentum_buffer"),
    (dampopt.CubicDampedSGD, dict(backend="loop"), "momentum"),
    (dampopt.CubicDampedSGD, dict(backend="torch"), "momentum"),
    (dampopt.iKFAD, dict(backend="torch"), "friction"),
], ids=["physics", "cd-loop", "cd-torch", "ikfad-torch"])  # fmt: skip
def test_step_refuses_state_changed_by_hand_before_any_update(cls, kwargs, name):
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    optimizer = cls(model.parameters(), **kwargs)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    last = list(model.parameters())[-1]
    optimizer.state[last][name] = torch.zeros(7)  # the last tensor's state, by hand
    params = [p.detach().clone() for p in model.parameters()]
    states = _snapshot(optimizer)
    with pytest.raises(ValueError, match=f"state '{name}' has shape \\(7,\\)"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert _same(optimizer.state_dict(), states)


def test_switch_metric_and_observe_validate_their_values():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="switch_metric must be a real number"):
        dampopt.PhysicsSGD(params, lr=0.1, switch_metric="0.9")
    with pytest.raises(ValueError, match="switch_metric must be finite"):
        dampopt.PhysicsSGD(params, lr=0.1, switch_metric=math.nan)
    optimizer = dampopt.PhysicsSGD(params, lr=0.1, switch_metric=0.9)
    with pytest.raises(TypeError, match=r"observe\(value\) must be a real number"):
        optimizer.observe("0.95")
    with pytest.raises(ValueError, match=r"observe\(value\) must be a number or a 1-element"):
        optimizer.observe(torch.tensor([0.9, 0.95]))
    with pytest.raises(ValueError, match=r"observe\(value\) must be finite"):
        optimizer.observe(math.nan)
    assert optimizer.switched_at is None
    assert optimizer.observe(torch.tensor(0.95)) and optimizer.switched_at == 0


def test_a_tensor_lr_of_several_elements_is_a_value_error_as_in_torch():
    params = [nn.Parameter(torch.zeros(2))]
    for cls in (dampopt.PhysicsSGD, dampopt.iKFAD):
        with pytest.raises(ValueError, match="lr must be a number or a 1-element tensor"):
            cls(params, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="1-element"):
        torch.optim.SGD(params, lr=torch.tensor([0.1, 0.2]))  # torch's own behaviour


def test_compare_layers_names_a_bad_argument():
    with pytest.raises(TypeError, match="b must be a collection of layer names"):
        compare_layers(["layer1"], None)
    with pytest.raises(TypeError, match="a must hold layer names"):
        compare_layers([1, 2], ["layer1"])


def test_ikfad_state_holds_tensors_only_and_reads_older_int_step_counters():
    optimizer = _stepped(dampopt.iKFAD, _model(), steps=3)
    for state in optimizer.state.values():
        assert all(torch.is_tensor(v) for v in state.values())
        assert state["friction_steps"].dtype == torch.int64 and int(state["friction_steps"]) == 3
    older = copy.deepcopy(optimizer.state_dict())
    for state in older["state"].values():
        state["friction_steps"] = int(state["friction_steps"])  # as saved before it was a tensor
    resumed = dampopt.iKFAD(_model().parameters())
    resumed.load_state_dict(older)
    assert all(torch.equal(s["friction_steps"], torch.tensor(3)) for s in resumed.state.values())
    assert {s.steps for s in resumed.friction_summary().values()} == {3}


def test_fused_physics_sgd_refuses_tensors_the_fused_kernel_cannot_take_before_any_update():
    ok = nn.Parameter(torch.ones(3))
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    optimizer = dampopt.PhysicsSGD([ok, meta], lr=0.1, fused=True)
    ok.grad, meta.grad = torch.ones(3), torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match="fused=True. requires all the params"):
        optimizer.step()
    assert torch.equal(ok, torch.ones(3)) and not optimizer.state


NONFINITE = [
    (dampopt.PhysicsSGD, dict(lr=0.1)),
    (dampopt.PhysicsSGD, dict(lr=0.1, fused=True)),
    (dampopt.iKFAD, dict(backend="torch")),
    (dampopt.CubicDampedSGD, dict(backend="loop")),
    (dampopt.CADAM, dict(backend="torch")),
]


def _nan_step(cls, kwargs, mode):
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    optimizer = cls(model.parameters(), nonfinite=mode, **kwargs)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()  # one finite step, so there is state to protect
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[1].bias.grad[0] = math.nan  # one NaN in one gradient
    return model, optimizer


@pytest.mark.parametrize(("cls", "kwargs"), NONFINITE,
                         ids=["physics", "physics-fused", "ikfad", "cd", "cadam"])  # fmt: skip
def test_nonfinite_raise_and_skip_leave_everything_as_it_was(cls, kwargs):
    model, optimizer = _nan_step(cls, kwargs, "raise")
    params = [p.detach().clone() for p in model.parameters()]
    states = _snapshot(optimizer)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[3\] \(shape \(3,\)\)"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert _same(optimizer.state_dict(), states)

    model, optimizer = _nan_step(cls, kwargs, "skip")
    params = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert optimizer.param_groups[0]["nonfinite_skips"] == 1
    model[1].bias.grad.zero_()  # finite again: the next step updates
    optimizer.step()
    assert not torch.equal(params[0], model[0].weight)
    resumed = cls(model.parameters(), **kwargs)
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed.param_groups[0]["nonfinite"] == "skip"  # the mode travels in the state dict

    model, optimizer = _nan_step(cls, kwargs, None)  # default: torch's behaviour, NaN spreads
    optimizer.step()
    assert torch.isnan(model[1].bias).any()
    with pytest.raises(ValueError, match="nonfinite must be"):
        cls(model.parameters(), nonfinite="ignore", **kwargs)


def test_load_pre_hooks_run_before_the_checks():
    optimizer = _stepped(dampopt.PhysicsSGD, _model(), lr=0.1)
    older = copy.deepcopy(optimizer.state_dict())
    older["state"][0]["legacy"] = torch.zeros(4, 6)  # an entry a converter hook removes
    calls = []

    def convert(opt, state_dict):
        calls.append("hook")
        state_dict["state"][0].pop("legacy")
        return state_dict

    optimizer.register_load_state_dict_pre_hook(convert)
    optimizer.load_state_dict(older)
    assert calls == ["hook"]  # run once, before the check that would refuse "legacy"


def test_observe_checks_its_value_only_while_it_can_switch():
    optimizer = dampopt.PhysicsSGD([nn.Parameter(torch.zeros(2))], lr=0.1, switch_metric=0.5)
    optimizer.observe(0.9)
    assert optimizer.switched_at == 0
    assert optimizer.observe(math.nan)  # a diverged run after the switch: a no-op, as before
    plain = dampopt.PhysicsSGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    assert not plain.observe(math.nan)


def test_fused_amp_overflows_are_gradscalers_not_nonfinite_errors():
    model = nn.Linear(6, 4)
    optimizer = dampopt.PhysicsSGD(model.parameters(), lr=0.1, fused=True, nonfinite="raise")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(8, 6)).sum()
    scaler.scale(loss).backward()
    model.bias.grad[0] = math.inf  # an fp16-style overflow: GradScaler skips the step
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0**16
