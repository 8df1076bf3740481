"""``torch.compile(optimizer.step)`` with a tensor lr: an LR scheduler's changes never recompile.

torch's convention for compiled steps is ``lr=torch.tensor(...)``: the scheduler writes into the
tensor, the graph reads it as data. dampopt used to turn that tensor into a float (PhysicsSGD's
momentum and the friction rules' ``h = sqrt(lr)`` are floats of it), and every new lr was a new
guard: 8 steps of CosineAnnealingLR compiled 8 frames for PhysicsSGD and 4-5 for the friction
optimizers, against torch.optim.SGD's 2. The bound here is torch.optim.SGD's own count, measured
in the same test, and the compiled steps must land where eager float-lr steps do.

Frames are counted with dynamo's CompileCounter (the graphs run as traced, no inductor), so
these tests are quick; one test runs inductor to check the fused code too.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._dynamo.utils import counters

from dampopt import CADAM, CubicDampedSGD, PhysicsSGD, iKFAD, physics_momentum

STEPS = 8
LR = 0.01

BUILDERS = {
    "torch SGD": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "PhysicsSGD": lambda params, lr: PhysicsSGD(params, lr=lr, weight_decay=0.01),
    "PhysicsSGD nesterov maximize": lambda params, lr: PhysicsSGD(
        params, lr=lr, nesterov=True, maximize=True, weight_decay=0.01
    ),
    "iKFAD torch": lambda params, lr: iKFAD(params, lr=lr, backend="torch", weight_decay=0.01),
    "iKFAD auto": lambda params, lr: iKFAD(params, lr=lr),
    "CubicDampedSGD": lambda params, lr: CubicDampedSGD(params, lr=lr, c=0.1, backend="torch"),
    "CADAM": lambda params, lr: CADAM(params, lr=lr, c=0.1, backend="torch"),
}
OURS = [name for name in BUILDERS if name != "torch SGD"]


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(
        dtype
    )


def _train(build, lr, compile_backend=None, steps=STEPS, dtype=torch.float32):
    """``steps`` steps under CosineAnnealingLR of the optimizer ``build(params, lr)`` (or
    ``BUILDERS[build]``); returns (flat params, frames compiled, optimizer)."""
    model = _model(dtype)
    build = BUILDERS[build] if isinstance(build, str) else build
    optimizer = build(model.parameters(), lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    step = optimizer.step
    if compile_backend is not None:
        torch._dynamo.reset()
        step = torch.compile(optimizer.step, backend=compile_backend)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=generator).to(dtype)
        model(x).square().sum().backward()
        step()
        scheduler.step()
        optimizer.zero_grad()
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    frames = compile_backend.frame_count if compile_backend is not None else None
    return flat, frames, optimizer


@pytest.fixture(scope="module")
def torch_sgd_frames():
    counters.clear()
    _, frames, _ = _train("torch SGD", torch.tensor(LR), CompileCounter())
    return frames, sum(counters["graph_break"].values())


@pytest.mark.parametrize("name", OURS)
def test_a_scheduled_tensor_lr_compiles_no_more_frames_than_torch_sgd(name, torch_sgd_frames):
    sgd_frames, sgd_breaks = torch_sgd_frames
    counters.clear()
    compiled, frames, optimizer = _train(name, torch.tensor(LR), CompileCounter())
    breaks = sum(counters["graph_break"].values())
    assert frames <= sgd_frames, f"{name}: {frames} frames, torch SGD {sgd_frames}"
    assert breaks <= sgd_breaks, dict(counters["graph_break"])
    # the tensor is still the group's lr (the scheduler wrote into it), and the steps land
    # where eager steps with a float lr do
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    eager, _, _ = _train(name, LR)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_more_steps_compile_no_more_frames():
    # the lr takes STEPS and then 3*STEPS distinct values: the count must not follow them
    _, few, _ = _train("iKFAD torch", torch.tensor(LR), CompileCounter(), steps=STEPS)
    _, many, _ = _train("iKFAD torch", torch.tensor(LR), CompileCounter(), steps=3 * STEPS)
    assert many == few
    _, few, _ = _train("PhysicsSGD", torch.tensor(LR), CompileCounter(), steps=STEPS)
    _, many, _ = _train("PhysicsSGD", torch.tensor(LR), CompileCounter(), steps=3 * STEPS)
    assert many == few


def test_physics_sgd_traced_update_is_torch_sgds_at_pinned_momentum():
    # mu_min == mu_max pins the physics momentum: then the traced update (tensor momentum)
    # must be torch.optim.SGD's with that momentum, also with dampening
    def physics(params, lr):
        return PhysicsSGD(params, lr=lr, mu_min=0.8, mu_max=0.8, dampening=0.3,
                          weight_decay=0.02)  # fmt: skip

    def sgd(params, lr):
        return torch.optim.SGD(params, lr=lr, momentum=0.8, dampening=0.3, weight_decay=0.02)

    compiled, _, _ = _train(physics, torch.tensor(LR), CompileCounter())
    reference, _, _ = _train(sgd, LR)
    torch.testing.assert_close(compiled, reference, rtol=1e-6, atol=1e-7)


def test_bf16_parameters_with_a_tensor_lr_under_compile():
    # low-precision parameters take the fp32 working copies inside the trace as well
    for name in ("PhysicsSGD", "iKFAD torch"):
        compiled, _, _ = _train(name, torch.tensor(LR), CompileCounter(), dtype=torch.bfloat16)
        eager, _, _ = _train(name, LR, dtype=torch.bfloat16)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_hybrid_switch_under_compile_with_a_tensor_lr():
    def build(params, lr):
        return PhysicsSGD(params, lr=lr, switch_step=3)

    compiled, _, optimizer = _train(build, torch.tensor(LR), CompileCounter())
    eager, _, _ = _train(build, LR)
    assert optimizer.switched_at == 3
    assert float(optimizer.param_groups[0]["momentum"]) == 0.9
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_inductor_fuses_the_traced_steps():
    # the real compiler, once per optimizer family: same results as eager float-lr steps
    for name in ("PhysicsSGD", "iKFAD torch"):
        counter = CompileCounterWithBackend("inductor")
        compiled, frames, _ = _train(name, torch.tensor(LR), counter)
        eager, _, _ = _train(name, LR)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        assert frames <= 2


def test_eager_steps_with_a_tensor_lr_equal_float_lr_steps_bit_for_bit():
    # float64, so that the scheduler's values are the float run's (an fp32 tensor rounds them)
    for name in OURS:
        with_tensor, _, optimizer = _train(name, torch.tensor(LR, dtype=torch.float64))
        with_float, _, _ = _train(name, LR)
        assert torch.equal(with_tensor, with_float), name
        assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)


@pytest.mark.parametrize("cls", [PhysicsSGD, iKFAD])
def test_a_bad_tensor_lr_is_refused_at_construction(cls):
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="1-element"):
        cls(params, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="lr must be"):
        cls(params, lr=torch.tensor(-0.1))


def test_momentum_that_can_reach_zero_stays_torchs_under_compile():
    # mu_min=0 and curvature 100 clamp mu to 0 at these lrs, where torch's SGD keeps no buffer
    # and ignores dampening: the compiled step must land where eager does (the traced twin
    # would have damped the gradient by 1 - dampening; it reads the lr as a float instead)
    def build(params, lr):
        return PhysicsSGD(params, lr=lr, mu_min=0.0, curvature=100.0, dampening=0.5)

    compiled, _, optimizer = _train(build, torch.tensor(LR), CompileCounter())
    eager, _, _ = _train(build, LR)
    assert physics_momentum(LR, 0.0, 0.99, 100.0) == 0.0  # the first steps run at mu = 0
    assert float(optimizer.param_groups[0]["momentum"]) > 0  # the last ones do not
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_no_momentum_at_all_compiles_without_graph_breaks(torch_sgd_frames):
    def build(params, lr):
        return PhysicsSGD(params, lr=lr, mu_min=0.0, mu_max=0.0)

    counters.clear()
    compiled, frames, _ = _train(build, torch.tensor(LR), CompileCounter())
    breaks = sum(counters["graph_break"].values())
    eager, _, _ = _train(build, LR)
    assert frames <= torch_sgd_frames[0] and breaks <= torch_sgd_frames[1]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)



def _scaled_fused_steps(groups, lr, compiled: bool, steps: int = 3):
    """``steps`` GradScaler steps of ``PhysicsSGD(groups, fused=True)`` (GradScaler hands a
    fused optimizer its scale) on ``_model()``: ``groups`` maps each of its parameters' index
    to its group's settings. Returns (model, optimizer)."""
    model = _model()
    params = list(model.parameters())
    optimizer = PhysicsSGD([dict(params=[params[i] for i in group], **settings)
                            for group, settings in groups], lr=lr, fused=True)  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    if compiled:
        torch._dynamo.reset()
        optimizer.step = torch.compile(optimizer.step, backend="eager")
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(4, 6, generator=generator)).square().sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    return model, optimizer


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_grad_scaler_is_refused_only_where_the_traced_update_would_run():
    all_params = (0, 1, 2, 3)
    # groups on torch's update take GradScaler's scale as usual, compiled as eager: switched
    # by the hybrid schedule at the first step, no momentum, or mu_min = 0 (lr read as a float)
    for settings in (dict(switch_step=0), dict(mu_min=0.0, mu_max=0.0), dict(mu_min=0.0)):
        model, optimizer = _scaled_fused_steps([(all_params, settings)], torch.tensor(LR), True)
        eager, _ = _scaled_fused_steps([(all_params, settings)], LR, False)
        assert optimizer.steps == 3 and not torch.equal(_flat(model), _flat(_model())), settings
        torch.testing.assert_close(_flat(model), _flat(eager), rtol=1e-6, atol=1e-7)
    # the traced update (a tensor momentum) takes no scale: refused before any group moves,
    # also a first group that would have taken it
    groups = [((0, 1), dict(mu_min=0.0)), ((2, 3), dict())]
    model = _model()
    params = list(model.parameters())
    optimizer = PhysicsSGD([dict(params=[params[i] for i in g], **s) for g, s in groups],
                           lr=torch.tensor(LR), fused=True)  # fmt: skip
    before = _flat(model)
    model(torch.randn(4, 6)).square().sum().backward()
    optimizer.grad_scale = torch.tensor(4.0)  # as GradScaler.step sets them
    optimizer.found_inf = torch.tensor(0.0)
    step = torch.compile(optimizer.step, backend="eager")
    with pytest.raises(RuntimeError, match="GradScaler"):
        step()
    assert torch.equal(_flat(model), before) and optimizer.steps == 0
    assert all(not optimizer.state[p] for p in params)
