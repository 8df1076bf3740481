"""backend="compiled" (torch.compile of each rule) against the reference, and its guards.

torch.compile costs ~20 s per graph here, so each test compiles one graph: one rule, one
dtype, sizes on one side of inductor's small-reduction threshold.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

from dampopt import _compiled
from dampopt._friction import FrictionOptimizer, run_backend
from dampopt._rule import Rule
from dampopt.cubic_damped_sgd import CubicDampedSGD
from dampopt.ikfad import iKFAD
from dampopt.testing import FRICTION_CASES

# the project's one table of configurations (dampopt/testing.py): name -> (class, hyper)
CASES = {name: (case.optimizer, case.hyperparameters) for name, case in FRICTION_CASES.items()}
# (the lr of these tests is their own: 0.01 then a scheduler-like change, for every rule)
SIZES = [(7,), (40, 25), (3, 4, 5, 6)]  # ranks 1, 2 and 4 share one graph (flattened)


@pytest.fixture(autouse=True)
def _every_tensor_compiled(monkeypatch):
    # Small tensors normally take the foreach rule; these tests are about the compiled one.
    monkeypatch.setattr(_compiled, "SMALL_TENSOR", 0)


def run_pair(optimizer_class, hyper, dtype, lrs):
    """The same steps with backend="compiled" and "loop"; returns both param lists."""
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=generator).to(dtype) for s in SIZES]
    grads = [[torch.randn(s, generator=generator).to(dtype) for s in SIZES] for _ in lrs]
    runs = {}
    for backend in ("compiled", "loop"):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = optimizer_class(params, lr=lrs[0], weight_decay=0.01, backend=backend,
                                    **hyper)
        for lr, step_grads in zip(lrs, grads):
            optimizer.param_groups[0]["lr"] = lr  # as a scheduler would
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        runs[backend] = (params, optimizer)
    return runs["compiled"], runs["loop"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_matches_reference_without_recompiling_when_lr_changes(name):
    optimizer_class, hyper = CASES[name]
    graphs_before = counters["stats"]["unique_graphs"]
    (params, optimizer), (ref_params, ref_optimizer) = run_pair(
        optimizer_class, hyper, torch.float32, lrs=[0.01, 0.02, 0.005]
    )
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # lr changed twice
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    for p, ref in zip(params, ref_params):
        for key in optimizer_class.state_names:
            want = ref_optimizer.state[ref][key]
            torch.testing.assert_close(optimizer.state[p][key], want, rtol=1e-6,
                                       atol=1e-6 * want.abs().max().item())
    if name == "ikfad":
        got, want = optimizer.friction_summary(), ref_optimizer.friction_summary()
        for key in want:
            assert got[key].steps == 3
            assert got[key].mean == pytest.approx(want[key].mean, rel=1e-6)
            assert got[key].accumulated == pytest.approx(want[key].accumulated, rel=1e-6)


def test_compiled_bf16_params_keep_their_dtype_and_match_reference():
    (params, optimizer), (ref_params, _) = run_pair(
        CubicDampedSGD, CASES["cubic_damped"][1], torch.bfloat16, lrs=[0.01, 0.02]
    )
    for p, ref in zip(params, ref_params):
        assert p.dtype == torch.bfloat16
        assert optimizer.state[p]["momentum"].dtype == torch.float32
        torch.testing.assert_close(p, ref, rtol=2**-7, atol=1e-6)


def test_small_tensors_take_the_foreach_rule_and_large_ones_the_compiled(monkeypatch):
    monkeypatch.setattr(_compiled, "SMALL_TENSOR", 1000)
    compiled_indices = []
    real = _compiled._compiled_steps

    def spy(rule, params, grads, states, scalars, has_weight_decay, indices):
        compiled_indices.append(list(indices))
        return real(rule, params, grads, states, scalars, has_weight_decay, indices)

    monkeypatch.setattr(_compiled, "_compiled_steps", spy)
    (params, optimizer), (ref_params, ref_optimizer) = run_pair(
        iKFAD, CASES["ikfad"][1], torch.float32, lrs=[0.01, 0.02]
    )
    assert compiled_indices == [[1], [1]]  # only the (40, 25) tensor has >= 1000 elements
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    got, want = optimizer.friction_summary(), ref_optimizer.friction_summary()
    for key in want:
        assert got[key].mean == pytest.approx(want[key].mean, rel=1e-6)


# A fourth rule, written only as a Rule: heavy-ball momentum, p = mu p - lr g; q = q + p.
def _heavy_ball_scalars(lr, mu, weight_decay=0.0):
    return dict(lr=lr, mu=mu, weight_decay=weight_decay)


def _heavy_ball_step(param, grad, momentum, s, has_weight_decay):
    g = grad + s["weight_decay"] * param if has_weight_decay else grad
    p = s["mu"] * momentum - s["lr"] * g
    param.copy_(param + p)
    momentum.copy_(p)


def _heavy_ball_step_foreach(params, grads, momenta, s, has_weight_decay):
    for args in zip(params, grads, momenta):
        _heavy_ball_step(*args, s, has_weight_decay)


HEAVY_BALL = Rule("heavy_ball", ("momentum",), {}, _heavy_ball_scalars, _heavy_ball_step,
                  _heavy_ball_step_foreach, summed_state="momentum")  # fmt: skip


def test_a_new_rule_runs_on_every_cpu_backend_without_editing_them():
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=generator) for s in SIZES]
    grads = [torch.randn(s, generator=generator) for s in SIZES]
    results = {}
    for backend in ("loop", "torch", "compiled"):
        params = [p.clone() for p in start]
        momenta = [torch.full_like(p, 0.5) for p in params]
        for lr in (0.1, 0.05):
            scalars = HEAVY_BALL.scalars(lr, mu=0.9, weight_decay=0.01)
            sums = run_backend(HEAVY_BALL, backend, params, grads, [momenta], scalars, True)
        results[backend] = (params, momenta, sums)
    want_params, want_momenta, want_sums = results["loop"]
    # by hand: p1 = 0.45 - 0.1 g1, q1 = q0 + p1; p2 = 0.9 p1 - 0.05 g2, q2 = q1 + p2
    for q0, g, q in zip(start, grads, want_params):
        p1 = 0.9 * 0.5 - 0.1 * (g + 0.01 * q0)
        q1 = q0 + p1
        p2 = 0.9 * p1 - 0.05 * (g + 0.01 * q1)
        torch.testing.assert_close(q, q1 + p2)
    for backend in ("torch", "compiled"):
        params, momenta, sums = results[backend]
        for a, b in zip(params + momenta, want_params + want_momenta):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.stack(sums), torch.stack(want_sums))
    assert issubclass(iKFAD, FrictionOptimizer) and iKFAD.rule.summed_state == "friction"


def test_auto_runs_foreach_until_a_compile_would_have_paid_for_itself(monkeypatch):
    from dampopt import _friction

    monkeypatch.setattr(_compiled, "SMALL_TENSOR", 1000)
    monkeypatch.setattr(_friction, "_cpp_compiler_available", lambda: True)
    # break-even after 2 steps of this model's one large tensor (1000 elements)
    saving = _compiled.SAVING_SECONDS_PER_ELEMENT["cubic_damped"]
    monkeypatch.setattr(_compiled, "COMPILE_SECONDS", 2000 * saving)
    calls = []
    real = _compiled._compiled_steps
    monkeypatch.setattr(_compiled, "_compiled_steps",
                        lambda *args: calls.append(len(calls)) or real(*args))  # fmt: skip
    hyper = CASES["cubic_damped"][1]
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=generator) for s in [(7,), (40, 25)]]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]

    def run(backend, steps, resume_at=None):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = CubicDampedSGD(params, lr=0.01, backend=backend, **hyper)
        for step in steps:
            if step == resume_at:  # a new optimizer from the state dict, as after a restart
                state = optimizer.state_dict()
                optimizer = CubicDampedSGD(params, lr=0.01, backend=backend, **hyper)
                optimizer.load_state_dict(state)
            for p, g in zip(params, grads[step]):
                p.grad = g.clone()
            optimizer.step()
            if backend == "auto" and resume_at is None:
                assert len(calls) == max(0, step - 1), step  # steps 0, 1 foreach; then compiled
        return params

    auto, loop = run("auto", range(5)), run("loop", range(5))
    for p, ref in zip(auto, loop):
        torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-6)
    # the switch is a function of the group's step count: a resume across it is bit-identical
    for p, ref in zip(run("auto", range(5), resume_at=2), auto):
        assert torch.equal(p, ref)
    # a model without large tensors never compiles
    small = [torch.nn.Parameter(torch.randn(10))]
    assert not _compiled.worth_compiling(10**9, small, "cubic_damped")


def test_each_rule_repays_a_compile_after_its_own_measured_saving():
    # iKFAD's step saves more per element than CD's when compiled: it compiles sooner
    large = [torch.nn.Parameter(torch.zeros(1 << 20))]
    steps = {rule: next(n for n in range(1, 10**6) if _compiled.worth_compiling(n, large, rule))
             for rule in ("ikfad", "cubic_damped")}  # fmt: skip
    assert steps["ikfad"] < steps["cubic_damped"]
    saving = _compiled.SAVING_SECONDS_PER_ELEMENT["ikfad"]
    assert steps["ikfad"] == math.ceil(_compiled.COMPILE_SECONDS / (saving * (1 << 20)))
