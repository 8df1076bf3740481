"""Generic torch.optim behaviour of iKFAD, CubicDampedSGD and CADAM, driven by one table."""

import copy
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from dampopt import CADAM, CubicDampedSGD, iKFAD
from dampopt.testing import FRICTION_CASES

# the project's one table of configurations (dampopt/testing.py): name -> (class, kwargs)
CONFIGS = {name: (case.optimizer, case.kwargs()) for name, case in FRICTION_CASES.items()}


# -- an independent transcription of the README's update rules, per element, numpy float64 --


def numpy_ikfad(q, g, s, lr, gamma, alpha, mu, wd):
    h = math.sqrt(lr)
    g = g + wd * q
    p, xi = s.get("p", np.zeros_like(q)), s.get("xi", np.zeros_like(q))
    p = p - h * g  # B
    q = q + h * p  # A
    p = p * np.exp(-h * xi / 2)  # C
    xi = xi * np.exp(-alpha * h) + (1 - np.exp(-alpha * h)) * p * p / (mu * alpha)
    p = p * np.exp(-h * xi / 2)
    p = p * np.exp(-gamma * h)  # D
    s.update(p=p, xi=xi)
    return q


def numpy_cd(q, g, s, lr, gamma, c, wd):
    h = math.sqrt(lr)
    g = g + wd * q
    p = s.get("p", np.zeros_like(q))
    p = p - h * g
    q = q + h * p
    p = p / np.sqrt(1 + 2 * c * h * p * p)
    p = p * np.exp(-gamma * h)
    s.update(p=p)
    return q


def numpy_cadam(q, g, s, lr, gamma, c, alpha, eps, wd):
    h = math.sqrt(lr)
    g = g + wd * q
    p, zeta = s.get("p", np.zeros_like(q)), s.get("zeta", np.zeros_like(q))
    p = p - h * g
    zeta = zeta * np.exp(-alpha * h) + (1 - np.exp(-alpha * h)) / alpha * g * g
    q = q + h * p / (np.sqrt(zeta) + eps)
    p = p / np.sqrt(1 + 2 * c * h * p * p)
    p = p * np.exp(-gamma * h)
    s.update(p=p, zeta=zeta)
    return q


NUMPY_RULES = {"ikfad": numpy_ikfad, "cubic_damped": numpy_cd, "cadam": numpy_cadam}


def _quadratic_grad(q, target):
    # gradient of 0.5 * sum(w * (q - target)^2), a deterministic function of q
    weights = np.linspace(0.5, 3.0, q.size).reshape(q.shape)
    return weights * (q - target)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_float64_matches_independent_transcription_under_cosine_schedule(name, backend):
    cls, hyper = CONFIGS[name]
    rng = np.random.default_rng(0)
    start, target = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    param = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = cls([param], weight_decay=1e-3, backend=backend, **hyper)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50, eta_min=1e-5)
    q, state = start.copy(), {}
    rule_kwargs = {k: v for k, v in hyper.items() if k != "lr"}
    for _ in range(50):
        lr = optimizer.param_groups[0]["lr"]
        param.grad = torch.tensor(_quadratic_grad(param.detach().numpy(), target))
        optimizer.step()
        scheduler.step()
        q = NUMPY_RULES[name](q, _quadratic_grad(q, target), state, lr=lr, wd=1e-3, **rule_kwargs)
    np.testing.assert_allclose(param.detach().numpy(), q, rtol=1e-12, atol=0)
    assert optimizer.state[param]["momentum"].dtype == torch.float64
    assert not np.allclose(q, start)  # the run moved


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    return model.to(dtype)


def _train(model, optimizer, steps, start=0, scheduler=None):
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=generator).to(next(model.parameters()).dtype)
        y = torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _flat(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", CONFIGS)
def test_foreach_backend_matches_the_reference_loop(name):
    cls, hyper = CONFIGS[name]
    results = []
    for backend in ("loop", "torch"):
        model = _model()
        _train(model, cls(model.parameters(), weight_decay=5e-4, backend=backend, **hyper), 30)
        results.append(_flat(model))
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0], _flat(_model()))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_low_precision_params_keep_dtype_with_fp32_state(name, dtype, backend):
    cls, hyper = CONFIGS[name]
    param = torch.nn.Parameter(torch.randn(40).to(dtype))
    optimizer = cls([param], backend=backend, **hyper)
    twin = torch.nn.Parameter(param.detach().float().clone())
    reference = cls([twin], backend="loop", **hyper)
    for step in range(3):
        grad = torch.randn(40, generator=torch.Generator().manual_seed(step)).to(dtype)
        param.grad, twin.grad = grad, grad.float()
        optimizer.step()
        reference.step()
        twin.data = twin.data.to(dtype).float()  # the fp32 reference sees the same roundings
    assert param.dtype == dtype
    assert all(
        v.dtype == torch.float32
        for k, v in optimizer.state[param].items()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    torch.testing.assert_close(param.detach().float(), twin.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_param_groups_with_different_hyperparameters(name):
    cls, hyper = CONFIGS[name]
    model, twin = _model(), _model()
    slow = dict(hyper, lr=hyper["lr"] / 4, gamma=1.0)
    optimizer = cls(
        [{"params": model[0].parameters(), **slow}, {"params": model[2].parameters()}], **hyper
    )
    first = cls(twin[0].parameters(), **slow)
    second = cls(twin[2].parameters(), **hyper)
    for step in range(5):
        generator = torch.Generator().manual_seed(step)
        x, y = (
            torch.randn(16, 6, generator=generator),
            torch.randint(0, 3, (16,), generator=generator),
        )
        for m, opts in ((model, [optimizer]), (twin, [first, second])):
            for o in opts:
                o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            for o in opts:
                o.step()
    assert torch.equal(_flat(model), _flat(twin))


@pytest.mark.parametrize("name", CONFIGS)
def test_add_param_group_validates_before_adding(name):
    cls, hyper = CONFIGS[name]
    model = _model()
    optimizer = cls(model[0].parameters(), **hyper)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        optimizer.add_param_group({"params": model[2].parameters(), "gamma": -1.0})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": model[2].parameters(), "lr": 1e-4})
    _train(model, optimizer, 1)
    assert optimizer.param_groups[1]["lr"] == 1e-4 and model[2].weight in optimizer.state


@pytest.mark.parametrize("name", CONFIGS)
def test_resume_from_state_dict_is_bit_identical(name):
    cls, hyper = CONFIGS[name]
    straight = _model()
    optimizer = cls(straight.parameters(), **hyper)
    _train(straight, optimizer, 10)

    first = _model()
    optimizer = cls(first.parameters(), **hyper)
    _train(first, optimizer, 4)
    saved = copy.deepcopy((first.state_dict(), optimizer.state_dict()))
    resumed = _model()
    resumed.load_state_dict(saved[0])
    optimizer = cls(resumed.parameters(), **hyper)
    optimizer.load_state_dict(saved[1])
    _train(resumed, optimizer, 6, start=4)
    assert torch.equal(_flat(resumed), _flat(straight))


RESUME_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_friction_optimizers import CONFIGS, _model, _train, _flat
cls, hyper = CONFIGS[{name!r}]
saved = torch.load({path!r}, weights_only=False)
model = _model(); model.load_state_dict(saved["model"])
optimizer = cls(model.parameters(), **hyper); optimizer.load_state_dict(saved["optimizer"])
_train(model, optimizer, 6, start=4)
torch.save(_flat(model), {out!r})
"""


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    """Save at step 4, continue in a new Python process: same parameters as never stopping."""
    import os

    for name, (cls, hyper) in CONFIGS.items():
        straight = _model()
        _train(straight, cls(straight.parameters(), **hyper), 10)
        model = _model()
        optimizer = cls(model.parameters(), **hyper)
        _train(model, optimizer, 4)
        path, out = tmp_path / f"{name}.pt", tmp_path / f"{name}.out"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        script = RESUME_SCRIPT.format(
            tests=os.path.dirname(__file__), name=name, path=str(path), out=str(out)
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
        assert torch.equal(torch.load(out), _flat(straight)), name


@pytest.mark.parametrize("name", CONFIGS)
def test_deepcopy_and_pickle_continue_identically(name):
    cls, hyper = CONFIGS[name]
    model = _model()
    optimizer = cls(model.parameters(), **hyper)
    _train(model, optimizer, 3)
    copies = [copy.deepcopy((model, optimizer)), pickle.loads(pickle.dumps((model, optimizer)))]
    _train(model, optimizer, 3, start=3)
    for other_model, other_optimizer in copies:
        _train(other_model, other_optimizer, 3, start=3)
        assert torch.equal(_flat(other_model), _flat(model))


@pytest.mark.parametrize("name", CONFIGS)
def test_params_without_grad_are_skipped_and_closure_returns_loss(name):
    cls, hyper = CONFIGS[name]
    model = _model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    optimizer = cls(model.parameters(), **hyper)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert optimizer.step(closure).item() > 0
    assert torch.equal(model[0].weight, frozen) and model[0].weight not in optimizer.state
    assert model[2].weight in optimizer.state


@pytest.mark.parametrize("name", CONFIGS)
def test_grad_scaler_unscales_and_skips_inf(name):
    cls, hyper = CONFIGS[name]
    model, twin = _model(), _model()
    optimizer, plain = cls(model.parameters(), **hyper), cls(twin.parameters(), **hyper)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for m, o, scale in ((model, optimizer, True), (twin, plain, False)):
        o.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        if scale:
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
        else:
            loss.backward()
            o.step()
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-6, atol=1e-8)
    before = _flat(model)
    optimizer.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y) * float("nan")).backward()
    scaler.step(optimizer)
    assert torch.equal(_flat(model), before)


def test_ikfad_friction_summary_is_mean_and_accumulated_mean_of_xi():
    cls, hyper = CONFIGS["ikfad"]
    model = _model()
    optimizer = cls(model.parameters(), **hyper)
    means = []
    for step in range(4):
        _train(model, optimizer, 1, start=step)
        means.append(optimizer.friction(model[0].weight).mean().item())
    summary = optimizer.friction_summary(model.named_parameters())
    stats = summary["0.weight"]
    assert set(summary) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert stats.numel == 72 and stats.steps == 4
    assert stats.mean == pytest.approx(means[-1], rel=1e-6)
    assert stats.accumulated == pytest.approx(sum(means), rel=1e-6)
    assert means[-1] > 0
    by_index = optimizer.friction_summary()
    assert by_index[0] == stats
    # a parameter that never stepped reports zeros
    fresh = cls([torch.nn.Parameter(torch.ones(3))], **hyper)
    assert fresh.friction_summary()[0].accumulated == 0.0


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (iKFAD, dict(lr=0.0), "lr must be > 0"),
        (iKFAD, dict(lr=float("nan")), "lr must be finite"),
        (iKFAD, dict(gamma=-0.1), "gamma must be a finite number >= 0"),
        (iKFAD, dict(alpha=-1.0), "alpha must be a finite number >= 0"),
        (iKFAD, dict(mu=-1.87), "mu must be a finite number > 0"),
        (iKFAD, dict(mu=0.0), "mu must be a finite number > 0"),
        (iKFAD, dict(weight_decay=-1e-4), "weight_decay"),
        (CubicDampedSGD, dict(lr=-1.0), "lr must be > 0"),
        (CubicDampedSGD, dict(c=-1.0), "c must be a finite number >= 0"),
        (CubicDampedSGD, dict(gamma=float("inf")), "gamma must be a finite number >= 0"),
        (CADAM, dict(eps=-1e-8), "eps must be a finite number >= 0"),
        (CADAM, dict(alpha=-0.005), "alpha must be a finite number >= 0"),
        (CADAM, dict(c=-5.0), "c must be a finite number >= 0"),
        (CADAM, dict(backend="cuda-magic"), "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(_model().parameters(), **kwargs)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("kind", ["sparse", "complex"])
def test_unsupported_gradients_raise_before_any_group_changes(name, kind):
    cls, hyper = CONFIGS[name]
    good = torch.nn.Parameter(torch.ones(4))
    good.grad = torch.ones(4)
    if kind == "sparse":
        bad = torch.nn.Parameter(torch.ones(4))
        bad.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,))
    else:
        bad = torch.nn.Parameter(torch.ones(4, dtype=torch.complex64))
        bad.grad = torch.ones(4, dtype=torch.complex64)
    optimizer = cls([{"params": [good]}, {"params": [bad]}], **hyper)
    with pytest.raises((RuntimeError, TypeError), match=kind):
        optimizer.step()
    assert torch.equal(good.detach(), torch.ones(4)) and not optimizer.state


def test_zero_lr_reached_by_a_schedule_leaves_params_unchanged():
    for cls, hyper in CONFIGS.values():
        model = _model()
        optimizer = cls(model.parameters(), **hyper)
        _train(model, optimizer, 2)
        optimizer.param_groups[0]["lr"] = 0.0
        before = _flat(model)
        _train(model, optimizer, 1, start=2)
        assert torch.equal(_flat(model), before)


@pytest.mark.parametrize("name", [*CONFIGS, "physics"])
def test_bf16_resume_keeps_fp32_state_and_is_bit_identical(name):
    """torch's load_state_dict casts state to the param dtype; ours must stay fp32."""
    from dampopt import PhysicsSGD

    cls, hyper = CONFIGS.get(name, (PhysicsSGD, dict(lr=0.05)))
    straight = _model(torch.bfloat16)
    _train(straight, cls(straight.parameters(), **hyper), 6)
    first = _model(torch.bfloat16)
    optimizer = cls(first.parameters(), **hyper)
    _train(first, optimizer, 3)
    saved = copy.deepcopy((first.state_dict(), optimizer.state_dict()))
    resumed = _model(torch.bfloat16)
    resumed.load_state_dict(saved[0])
    optimizer = cls(resumed.parameters(), **hyper)
    optimizer.load_state_dict(saved[1])
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "friction_steps":
                assert value.dtype == torch.float32, key
            elif key == "friction_steps":  # iKFAD's step counter stays an integer tensor
                assert torch.is_tensor(value) and value.dtype == torch.int64
    _train(resumed, optimizer, 3, start=3)
    assert torch.equal(_flat(resumed), _flat(straight))


def test_auto_backend_resolution(monkeypatch):
    from dampopt import _friction

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(_friction, "_triton_available", lambda: True)
    assert _friction.resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert _friction.resolve_backend("auto", cuda, torch.float64) == "torch"  # kernels are fp32
    monkeypatch.setattr(_friction, "_cpp_compiler_available", lambda: True)
    assert _friction.resolve_backend("auto", cpu, torch.float32) == "compiled"
    monkeypatch.setattr(_friction, "_cpp_compiler_available", lambda: False)
    assert _friction.resolve_backend("auto", cpu, torch.float32) == "torch"
    with pytest.raises(TypeError, match="got float64"):
        _friction.resolve_backend("triton", cuda, torch.float64)


@pytest.mark.parametrize("name", CONFIGS)
def test_triton_layout_problem_raises_before_any_bucket_changes(name):
    cls, hyper = CONFIGS[name]
    good = torch.nn.Parameter(torch.ones(8))
    good.grad = torch.ones(8)
    odd = torch.nn.Parameter(torch.ones(4, 6))
    odd.grad = torch.ones(6, 4).t()  # same shape, transposed strides: not the param's layout
    optimizer = cls([{"params": [good]}, {"params": [odd]}], backend="triton", **hyper)
    with pytest.raises(ValueError, match="strides"):
        optimizer.step()
    assert torch.equal(good.detach(), torch.ones(8)) and not optimizer.state


@pytest.mark.parametrize("name", CONFIGS)
def test_an_optimizer_rebuilt_from_defaults_and_groups_counts_its_steps(name):
    cls, hyper = CONFIGS[name]
    model = _model()
    optimizer = cls(model.parameters(), **hyper)
    again = cls(model.parameters(), **optimizer.defaults)  # the common rebuild idiom
    assert again.defaults == optimizer.defaults
    _train(model, optimizer, 3)
    assert [g["step"] for g in optimizer.param_groups] == [3]
    assert optimizer.state_dict()["param_groups"][0]["step"] == 3
