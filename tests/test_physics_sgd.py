import copy
import pickle

import pytest
import torch

from dampopt import PhysicsSGD, critical_momentum, physics_momentum


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batch(step):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)


def _train(model, optimizer, steps, scheduler=None, start=0):
    for step in range(start, start + steps):
        x, y = _batch(step)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("path", ["single", "foreach", "fused"])
@pytest.mark.parametrize(
    "flags",
    [
        dict(),
        dict(weight_decay=5e-4, nesterov=True),
        dict(dampening=0.1, maximize=True, weight_decay=1e-3),
    ],
)
def test_bit_identical_to_torch_sgd_when_momentum_is_pinned(path, flags):
    paths = dict(single=dict(foreach=False), foreach=dict(foreach=True), fused=dict(fused=True))
    ours, theirs = _model(), _model()
    _train(
        ours,
        PhysicsSGD(ours.parameters(), lr=0.05, mu_min=0.9, mu_max=0.9, **flags, **paths[path]),
        100,
    )
    _train(
        theirs,
        torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, **flags, **paths[path]),
        100,
    )
    assert torch.equal(_flat(ours), _flat(theirs))


def test_momentum_follows_the_scheduled_lr_every_step():
    ours, theirs = _model(), _model()
    optimizer = PhysicsSGD(ours.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=30, eta_min=1e-4)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.5)
    ref_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=30, eta_min=1e-4)
    seen = []
    for step in range(30):
        lr = optimizer.param_groups[0]["lr"]
        # the reference is torch SGD with the momentum set by hand from Eq. 5
        reference.param_groups[0]["momentum"] = physics_momentum(lr)
        _train(ours, optimizer, 1, scheduler, start=step)
        _train(theirs, reference, 1, ref_scheduler, start=step)
        seen.append(optimizer.param_groups[0]["momentum"])
        assert optimizer.param_groups[0]["momentum"] == physics_momentum(lr)
    assert torch.equal(_flat(ours), _flat(theirs))
    assert seen[0] == 0.5 and seen[-1] > 0.9  # clamped at lr=0.1, near 0.98 at the end


def test_param_groups_keep_their_own_settings():
    model = _model()
    optimizer = PhysicsSGD(
        [
            {"params": model[0].parameters(), "lr": 0.01, "mu_max": 0.7},
            {"params": model[2].parameters(), "curvature": 4.0, "momentum": 0.8},
        ],
        lr=0.1,
    )
    _train(model, optimizer, 1)
    first, second = optimizer.param_groups
    assert first["momentum"] == 0.7  # 1 - 2*0.1 = 0.8 clamped to mu_max
    assert second["momentum"] == 0.5  # 1 - 2*sqrt(0.4) < 0.5
    assert second["switch_momentum"] == 0.8 and first["switch_momentum"] == 0.9
    optimizer.switch()
    assert [g["momentum"] for g in optimizer.param_groups] == [0.9, 0.8]


def test_add_param_group_joins_the_clock_and_switch_state():
    model = _model()
    optimizer = PhysicsSGD(model[0].parameters(), lr=0.01)
    _train(model, optimizer, 3)
    optimizer.switch()
    optimizer.add_param_group({"params": model[2].parameters(), "lr": 0.04})
    new = optimizer.param_groups[1]
    assert new["step"] == 3 and new["switched_at"] == 3 and new["momentum"] == 0.9
    with pytest.raises(ValueError, match="lr must be > 0"):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1})
    with pytest.raises(ValueError, match="mu_min must be <= mu_max"):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "mu_min": 0.995})
    assert len(optimizer.param_groups) == 2


def test_switch_step_uses_constant_momentum_from_that_step():
    model = _model()
    optimizer = PhysicsSGD(model.parameters(), lr=0.01, momentum=0.95, switch_step=5)
    momenta = []
    for step in range(8):
        _train(model, optimizer, 1, start=step)
        momenta.append(optimizer.param_groups[0]["momentum"])
    assert momenta == [0.8] * 5 + [0.95] * 3
    assert optimizer.switched_at == 5 and optimizer.steps == 8


def test_observe_switches_once_the_metric_reaches_the_threshold():
    model = _model()
    optimizer = PhysicsSGD(model.parameters(), lr=0.01, switch_metric=0.9)
    _train(model, optimizer, 2)
    assert optimizer.observe(0.85) is False and optimizer.switched_at is None
    assert optimizer.observe(0.90) is True and optimizer.switched_at == 2
    _train(model, optimizer, 2)
    assert optimizer.observe(0.5) is True and optimizer.switched_at == 2  # never switches back
    assert optimizer.param_groups[0]["momentum"] == 0.9


def test_damping_reports_lr_mu_critical_value_and_regime():
    model = _model()
    optimizer = PhysicsSGD(model.parameters(), lr=0.1)
    (state,) = optimizer.damping()
    assert state.lr == 0.1 and state.mu == 0.5
    assert state.mu_c == pytest.approx(critical_momentum(0.1))
    assert state.regime == "underdamped"  # clamped: 0.5 - 0.368 > 0.05
    optimizer.param_groups[0]["lr"] = 0.01
    assert optimizer.damping()[0].regime == "critical" and optimizer.damping()[
        0
    ].mu == pytest.approx(0.8)
    optimizer.switch()
    assert optimizer.damping()[0].to_dict()["mu"] == 0.9 and optimizer.damping()[0].switched


def test_hybrid_state_survives_state_dict_deepcopy_and_pickle():
    model = _model()
    optimizer = PhysicsSGD(model.parameters(), lr=0.01, switch_metric=0.9, switch_step=100)
    _train(model, optimizer, 4)
    optimizer.observe(0.95)
    restored = PhysicsSGD(_model().parameters(), lr=0.5)
    restored.load_state_dict(optimizer.state_dict())
    for other in (restored, copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert other.switched_at == 4 and other.steps == 4
        assert other.switch_metric == 0.9 and other.switch_step == 100
        assert other.param_groups[0]["momentum"] == 0.9


def test_resume_from_state_dict_is_bit_identical():
    straight = _model()
    optimizer = PhysicsSGD(straight.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    _train(straight, optimizer, 20, scheduler)

    first = _model()
    optimizer = PhysicsSGD(first.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    _train(first, optimizer, 8, scheduler)
    saved = copy.deepcopy((first.state_dict(), optimizer.state_dict(), scheduler.state_dict()))

    resumed = _model()
    resumed.load_state_dict(saved[0])
    optimizer = PhysicsSGD(resumed.parameters(), lr=0.1)
    optimizer.load_state_dict(saved[1])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    scheduler.load_state_dict(saved[2])
    _train(resumed, optimizer, 12, scheduler, start=8)
    assert torch.equal(_flat(resumed), _flat(straight))


def test_params_without_grad_are_skipped_and_closure_returns_loss():
    model = _model()
    frozen = model[0].weight.detach().clone()
    model[0].weight.requires_grad_(False)
    optimizer = PhysicsSGD(model.parameters(), lr=0.05)
    x, y = _batch(0)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight not in optimizer.state
    assert "momentum_buffer" in optimizer.state[model[2].weight]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_dtype_with_fp32_state_and_math(dtype):
    param = torch.nn.Parameter(torch.randn(64).to(dtype))
    start = param.detach().float().clone()
    optimizer = PhysicsSGD([param], lr=0.01)
    grads = [torch.randn(64) for _ in range(3)]
    buffer = None
    expected = start.clone()
    for grad in grads:
        param.grad = grad.to(dtype)
        optimizer.step()
        # fp32 reference from the rounded param and rounded grad, one rounding at the end
        g = grad.to(dtype).float()
        buffer = g.clone() if buffer is None else 0.8 * buffer + g
        expected = expected.to(dtype).float() - 0.01 * buffer
    assert param.dtype == dtype
    assert optimizer.state[param]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(param.detach(), expected.to(dtype))


def test_grad_scaler_skips_inf_steps_and_unscales_finite_ones():
    for fused in (False, True):
        model, twin = _model(), _model()
        optimizer = PhysicsSGD(model.parameters(), lr=0.05, fused=fused)
        plain = PhysicsSGD(twin.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        x, y = _batch(0)
        optimizer.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        _train(twin, plain, 1)
        torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-6, atol=1e-7)

        before = _flat(model).clone()
        optimizer.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
        scaler.step(optimizer)
        assert torch.equal(_flat(model), before) and optimizer.steps == 1


def test_torch_compile_of_the_step_matches_eager():
    eager, compiled_model = _model(), _model()
    eager_opt = PhysicsSGD(eager.parameters(), lr=0.05)
    compiled_opt = PhysicsSGD(compiled_model.parameters(), lr=0.05)
    compiled_step = torch.compile(compiled_opt.step, backend="aot_eager")
    for step in range(5):
        x, y = _batch(step)
        for model, opt, stepper in (
            (eager, eager_opt, eager_opt.step),
            (compiled_model, compiled_opt, compiled_step),
        ):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            stepper()
    torch.testing.assert_close(_flat(compiled_model), _flat(eager), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(lr=0.0), ValueError, "lr must be > 0"),
        (dict(lr=-0.1), ValueError, "lr must be > 0"),
        (dict(lr=float("inf")), ValueError, "lr must be finite"),
        (dict(lr="0.1"), TypeError, "lr must be a real number"),
        (dict(lr=0.1, mu_min=0.9, mu_max=0.8), ValueError, "mu_min must be <= mu_max"),
        (dict(lr=0.1, mu_max=1.0), ValueError, r"mu_max must be in \[0, 1\)"),
        (dict(lr=0.1, mu_min=-0.5), ValueError, r"mu_min must be in \[0, 1\)"),
        (dict(lr=0.1, curvature=-1.0), ValueError, "curvature"),
        (dict(lr=0.1, momentum=1.0), ValueError, "momentum"),
        (dict(lr=0.1, weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(lr=0.1, switch_step=-3), ValueError, "switch_step"),
        (dict(lr=0.1, nesterov=True, dampening=0.5), ValueError, "nesterov"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        PhysicsSGD(_model().parameters(), **kwargs)


@pytest.mark.parametrize("kind", ["sparse", "complex"])
def test_unsupported_gradients_raise_before_any_group_changes(kind):
    good = torch.nn.Parameter(torch.ones(4))
    if kind == "sparse":
        bad = torch.nn.Parameter(torch.ones(4))
        bad.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,))
    else:
        bad = torch.nn.Parameter(torch.ones(4, dtype=torch.complex64))
        bad.grad = torch.ones(4, dtype=torch.complex64)
    good.grad = torch.ones(4)
    optimizer = PhysicsSGD([{"params": [good]}, {"params": [bad]}], lr=0.1)
    with pytest.raises((RuntimeError, TypeError), match=kind):
        optimizer.step()
    assert torch.equal(good.detach(), torch.ones(4)) and not optimizer.state
    assert optimizer.steps == 0


def test_fused_path_refuses_dtensor_parameters_before_changing_anything(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = torch.nn.Parameter(distribute_tensor(torch.ones(4), mesh, [Shard(0)]))
        param.grad = distribute_tensor(torch.ones(4), mesh, [Shard(0)])
        optimizer = PhysicsSGD([param], lr=0.1, fused=True)
        with pytest.raises(RuntimeError, match=r"fused=True\) cannot step DTensor"):
            optimizer.step()
        assert torch.equal(param.full_tensor(), torch.ones(4)) and not optimizer.state
        PhysicsSGD([param], lr=0.1).step()  # the default path steps the shard
        assert torch.allclose(param.full_tensor(), torch.full((4,), 0.9))
    finally:
        dist.destroy_process_group()


def test_hybrid_settings_live_in_the_param_groups_and_older_state_dicts_still_load():
    model = _model()
    optimizer = PhysicsSGD(model.parameters(), lr=0.01, switch_metric=0.9, switch_step=7)
    _train(model, optimizer, 2)
    state = optimizer.state_dict()
    assert "hybrid" not in state  # torch's own state_dict carries everything
    assert [(g["switch_step"], g["switch_metric"]) for g in state["param_groups"]] == [(7, 0.9)]
    # a state dict of the previous layout: settings in a top-level "hybrid" entry
    older = copy.deepcopy(state)
    for group in older["param_groups"]:
        del group["switch_step"], group["switch_metric"]
    older["hybrid"] = {"switch_step": 3, "switch_metric": None}
    other = PhysicsSGD(_model().parameters(), lr=0.5)
    other.load_state_dict(older)
    assert (other.switch_step, other.switch_metric) == (3, None)
    assert other.param_groups[0]["switch_step"] == 3 and "hybrid" in older  # input untouched
    # the oldest: no hybrid settings anywhere, so the optimizer keeps its own
    del older["hybrid"]
    keeper = PhysicsSGD(_model().parameters(), lr=0.5, switch_step=11)
    keeper.load_state_dict(older)
    assert keeper.switch_step == 11 and keeper.param_groups[0]["switch_step"] == 11
    # a pickle of the previous layout kept them as attributes
    legacy = dict(copy.deepcopy(optimizer.__getstate__()), switch_step=5, switch_metric=0.8)
    for group in [legacy["defaults"], *legacy["param_groups"]]:
        del group["switch_step"], group["switch_metric"]
    revived = PhysicsSGD.__new__(PhysicsSGD)
    revived.__setstate__(legacy)
    assert (revived.switch_step, revived.switch_metric) == (5, 0.8)
    assert revived.param_groups[0]["switch_metric"] == 0.8


def test_switch_settings_are_optimizer_wide_and_momentum_names_are_unambiguous():
    model = _model()
    weight, *rest = model.parameters()
    optimizer = PhysicsSGD([weight], lr=0.01, switch_step=4)
    with pytest.raises(ValueError, match="switch_step is optimizer-wide"):
        optimizer.add_param_group({"params": rest, "switch_step": 9})
    with pytest.raises(RuntimeError, match="`foreach` and `fused` cannot both be True"):
        optimizer.add_param_group({"params": rest, "fused": True, "foreach": True})
    with pytest.raises(ValueError, match="momentum must be in"):
        optimizer.add_param_group({"params": rest, "switch_momentum": 1.5})
    assert len(optimizer.param_groups) == 1  # nothing half-added
    optimizer.add_param_group({"params": rest, "momentum": 0.8})
    assert optimizer.param_groups[1]["switch_momentum"] == 0.8
    optimizer.switch_step = 2  # the setter reaches every group
    assert [g["switch_step"] for g in optimizer.param_groups] == [2, 2]
    with pytest.raises(ValueError, match="switch_step"):
        optimizer.switch_step = -1


def test_default_lr_is_torch_sgds():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert PhysicsSGD(params).defaults["lr"] == torch.optim.SGD(params).defaults["lr"] == 1e-3


def test_an_optimizer_rebuilt_from_another_ones_groups_keeps_its_settings():
    model = _model()
    first = PhysicsSGD(model.parameters(), lr=0.01, momentum=0.8, switch_step=3)
    _train(model, first, 1)
    again = PhysicsSGD(first.param_groups, lr=0.5)  # the groups' own values win, as in torch
    group = again.param_groups[0]
    assert group["switch_momentum"] == 0.8 and group["lr"] == 0.01
    assert group["momentum"] == physics_momentum(0.01)  # in effect: derived, not copied
    assert again.switch_step == 3  # optimizer-wide, from the groups
    # a group given both a "momentum" and a "switch_momentum": the latter is the setting
    other = PhysicsSGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "momentum": 0.3,
                         "switch_momentum": 0.7}], lr=0.01)  # fmt: skip
    assert other.param_groups[0]["switch_momentum"] == 0.7


def test_fused_takes_a_late_first_gradient_that_torchs_fused_sgd_fails_on():
    # torch's fused kernel decides "first step" for the whole list: a parameter whose first
    # gradient comes after the others have buffers made it raise a TypeError
    def run(cls, **flags):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
        optimizer = cls([a, b], lr=0.1, momentum=0.9, **flags)
        generator = torch.Generator().manual_seed(1)
        a.grad = torch.randn(10, generator=generator)
        optimizer.step()
        for _ in range(3):
            a.grad, b.grad = (torch.randn(10, generator=generator) for _ in range(2))
            optimizer.step()
        return torch.cat([a.detach(), b.detach()])

    with pytest.raises(TypeError):
        run(torch.optim.SGD, fused=True)
    fused = run(PhysicsSGD, fused=True, mu_min=0.9, mu_max=0.9)
    # torch's default path takes it; the fused kernel may round differently (FMA, vector tails)
    torch.testing.assert_close(fused, run(torch.optim.SGD), rtol=1e-6, atol=1e-7)


def test_fused_refuses_a_gradient_with_other_strides_before_any_update():
    weight = torch.nn.Parameter(torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last))
    other = torch.nn.Parameter(torch.randn(6))
    optimizer = PhysicsSGD([other, weight], lr=0.1, fused=True)
    other.grad = torch.randn(6)
    weight.grad = torch.randn(4, 3, 5, 5)  # contiguous: torch's fused kernel would mis-pair
    before = [other.detach().clone(), weight.detach().clone()]
    with pytest.raises(ValueError, match="strides"):
        optimizer.step()
    assert torch.equal(other, before[0]) and torch.equal(weight, before[1])
    weight.grad = weight.grad.contiguous(memory_format=torch.channels_last)
    optimizer.step()  # the same layout as its parameter: fine
    # a momentum buffer of other strides (a loaded state dict, say): refused the same way
    after_one = [other.detach().clone(), weight.detach().clone()]
    optimizer.state[weight]["momentum_buffer"] = optimizer.state[weight][
        "momentum_buffer"].contiguous()  # fmt: skip
    with pytest.raises(ValueError, match="momentum buffer"):
        optimizer.step()
    assert torch.equal(other, after_one[0]) and torch.equal(weight, after_one[1])
    assert optimizer.steps == 1


def test_fused_steps_size_one_and_empty_dimensions_as_the_default_path():
    # a size-1 dimension's stride does not matter, nor a 0-element tensor's: stepped, and
    # to torch's default path's values
    def run(fused):
        bias_like = torch.nn.Parameter(torch.arange(8.0).reshape(1, 8))
        empty = torch.nn.Parameter(torch.zeros(2, 0, 3))
        optimizer = PhysicsSGD([bias_like, empty], lr=0.1, fused=fused)
        for k in range(2):
            bias_like.grad = (torch.arange(8.0) + k).reshape(8, 1).t()  # strides (1, 1)
            empty.grad = torch.zeros(3, 0, 2).permute(2, 1, 0)  # other strides, no elements
            optimizer.step()
        return bias_like.detach()

    torch.testing.assert_close(run(True), run(None), rtol=1e-6, atol=1e-7)
    assert not torch.equal(run(True), torch.arange(8.0).reshape(1, 8))


def test_fused_refuses_a_strided_view_parameter_before_any_update():
    # torch's fused kernel runs over numel elements from the start: on base[:, ::2] it would
    # update the wrong elements and write outside the view, silently, even with a gradient
    # of the same strides
    base = torch.randn(4, 6)
    start = base.clone()
    view = torch.nn.Parameter(base[:, ::2])
    view.grad = torch.randn(4, 6)[:, ::2]
    with pytest.raises(ValueError, match="not dense"):
        PhysicsSGD([view], lr=0.1, fused=True).step()
    assert torch.equal(base, start)
    PhysicsSGD([view], lr=0.1).step()  # the default path steps it, within the view
    assert torch.equal(base[:, 1::2], start[:, 1::2]) and not torch.equal(base, start)
