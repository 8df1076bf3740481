"""backend="compiled" (torch.compile of each rule) against the reference, and its guards.

torch.compile costs ~20 s per graph here, so each test compiles one graph: one rule, one
dtype, sizes on one side of inductor's small-reduction threshold.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from dampopt import _compiled
from dampopt.cadam import CADAM
from dampopt.cubic_damped_sgd import CubicDampedSGD
from dampopt.ikfad import iKFAD

CASES = {
    "ikfad": (iKFAD, dict(gamma=0.4, alpha=0.402, mu=0.5)),
    "cubic_damped": (CubicDampedSGD, dict(gamma=0.17, c=5.0)),
    "cadam": (CADAM, dict(gamma=0.5, c=5.0, alpha=0.3, eps=1e-8)),
}
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

    def spy(name, params, grads, states, kwargs, indices):
        compiled_indices.append(list(indices))
        return real(name, params, grads, states, kwargs, indices)

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


def test_unknown_rule_is_a_value_error():
    class NoRule:
        kernel_name = "adam"

    with pytest.raises(ValueError, match="no compiled rule"):
        _compiled.compiled_update(NoRule(), [], [], [], {})
