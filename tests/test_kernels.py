"""The fused Triton kernels (dampopt.kernels) against the torch reference rules.

Runs in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), so
the tested path is the real kernel with its pointer and block tables; sizes stay small.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from dampopt.kernels import _multi_tensor

from dampopt import kernels
from dampopt._friction import resolve_backend
from dampopt.ikfad import iKFAD
from dampopt.testing import FRICTION_CASES

# name -> (reference update, number of state arrays, hyperparameters, optimizer class), from
# the project's one table of configurations (dampopt/testing.py)
RULES = {
    name: (case.rule, len(case.rule.state_names), case.hyperparameters, case.optimizer)
    for name, case in FRICTION_CASES.items()
}


def launch(name, params, grads, states, kwargs):
    """The kernel of rule ``name`` with the rule's scalars for ``kwargs`` (lr, wd, hyper)."""
    rule = RULES[name][0] if name in RULES else None
    scalars = rule.scalars(**kwargs) if rule else {}
    flags = dict(HAS_WEIGHT_DECAY=bool(kwargs.get("weight_decay")))
    return kernels.launch(name, params, grads, states, scalars, flags)


BLOCK = _multi_tensor.BLOCK
# sizes: empty, tiny, one full block, a full block plus a tail, two blocks plus a tail
SIZES = [0, 5, BLOCK, BLOCK + 1, 2 * BLOCK + 300]
# how far a kernel may be from the reference: fp32 arrays within 1e-6 of the tensor's scale,
# low-precision params within their dtype's epsilon (a unit or two in the last place)
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def assert_matches(actual, expected, dtype=torch.float32):
    assert actual.dtype == expected.dtype
    if expected.numel() == 0:
        return
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=RTOL[dtype], atol=1e-6 * scale)


def make_tensors(sizes, dtype, n_states, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=generator).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=generator).to(dtype) for n in sizes]
    # non-zero state so the first step already exercises every term
    states = [[0.3 * torch.rand(n, generator=generator) for n in sizes] for _ in range(n_states)]
    return params, grads, states


def clone_all(params, states):
    return [p.clone() for p in params], [[s.clone() for s in state] for state in states]


def reference_step(name, params, grads, states, kwargs):
    """The rule's single-tensor step (the "loop" backend), tensor by tensor; the sums."""
    rule = RULES[name][0]
    scalars = rule.scalars(**kwargs)
    for i, (p, g) in enumerate(zip(params, grads)):
        rule.step(p, g, *[state[i] for state in states], scalars, bool(kwargs["weight_decay"]))
    return rule.sums(states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(RULES))
def test_kernel_matches_reference(name, dtype):
    _, n_states, hyper, _ = RULES[name]
    params, grads, states = make_tensors(SIZES, dtype, n_states)
    ref_params, ref_states = clone_all(params, states)
    for step, lr in enumerate((0.01, 0.02)):  # lr changes between steps, as under a scheduler
        kwargs = dict(lr=lr, weight_decay=0.01 * step, **hyper)
        sums = launch(name, params, grads, states, kwargs)
        ref_sums = reference_step(name, ref_params, grads, ref_states, kwargs)
    for p, ref in zip(params, ref_params):
        assert_matches(p, ref, dtype)
    for state, ref_state in zip(states, ref_states):
        for s, ref in zip(state, ref_state):
            assert_matches(s, ref)
    if name == "ikfad":
        assert [s.dtype for s in sums] == [torch.float32] * len(SIZES)
        torch.testing.assert_close(torch.stack(sums), torch.stack(ref_sums), rtol=1e-6, atol=0)
        assert sums[0].item() == 0.0  # the empty tensor
    else:
        assert sums is None


def test_unaligned_views_of_one_buffer():
    # Slices at odd offsets: addresses not 16-byte aligned, so the unhinted variant runs.
    buffer = torch.randn(3 * BLOCK + 10)
    params = [buffer[1 : BLOCK + 2], buffer[BLOCK + 3 : BLOCK + 700]]
    gaps = buffer[[0, BLOCK + 2, BLOCK + 700]].clone()
    grads = [torch.randn_like(p) for p in params]
    states = [[torch.rand_like(p) for p in params] for _ in range(2)]
    _, aligned = _multi_tensor.pointer_table([params, grads, *states], params[0].device)
    assert not aligned
    ref_params, ref_states = clone_all(params, states)
    kwargs = dict(lr=0.01, weight_decay=0.0, **RULES["cadam"][2])
    launch("cadam", params, grads, states, kwargs)
    reference_step("cadam", ref_params, grads, ref_states, kwargs)
    for p, ref in zip(params + states[0] + states[1], ref_params + ref_states[0] + ref_states[1]):
        assert_matches(p, ref)
    assert torch.equal(buffer[[0, BLOCK + 2, BLOCK + 700]], gaps)  # no write outside a tensor


class CountingKernel:
    """Stands in for a jitted kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_two_hundred_small_tensors_take_one_launch(monkeypatch):
    counting = CountingKernel(kernels.KERNELS["ikfad"])
    monkeypatch.setitem(kernels.KERNELS, "ikfad", counting)
    generator = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 300, (200,), generator=generator).tolist()
    params, grads, states = make_tensors(sizes, torch.float32, 2)
    ref_params, ref_states = clone_all(params, states)
    kwargs = dict(lr=0.01, weight_decay=0.0, **RULES["ikfad"][2])
    sums = launch("ikfad", params, grads, states, kwargs)
    ref_sums = reference_step("ikfad", ref_params, grads, ref_states, kwargs)
    assert counting.grids == [(200,)]  # one launch, one block per tensor (all < BLOCK)
    for p, ref in zip(params, ref_params):
        assert_matches(p, ref)
    torch.testing.assert_close(torch.stack(sums), torch.stack(ref_sums), rtol=1e-6, atol=0)


def test_channels_last_layout_matches_reference():
    param = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    grad = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    state = torch.rand_like(param)  # preserve_format: channels-last too
    ref_param, ref_state = param.clone(), state.clone()
    kwargs = dict(lr=0.01, weight_decay=0.0, **RULES["cubic_damped"][2])
    launch("cubic_damped", [param], [grad], [[state]], kwargs)
    reference_step("cubic_damped", [ref_param], [grad], [[ref_state]], kwargs)
    assert_matches(param, ref_param)
    assert_matches(state, ref_state)


def test_mismatched_layouts_raise_before_changing_anything():
    param = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    grad = torch.randn(4, 3, 5, 5)  # contiguous: different strides from the param
    state = torch.zeros_like(param)
    before = param.clone()
    kwargs = dict(lr=0.01, weight_decay=0.0, **RULES["cubic_damped"][2])
    with pytest.raises(ValueError, match="same strides"):
        launch("cubic_damped", [param], [grad], [[state]], kwargs)
    assert torch.equal(param, before)


def test_fp64_params_are_rejected_with_a_clear_error():
    params, grads, states = make_tensors([10], torch.float64, 1)
    kwargs = dict(lr=0.01, weight_decay=0.0, **RULES["cubic_damped"][2])
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        launch("cubic_damped", params, grads, states, kwargs)


def test_unknown_kernel_name_is_a_value_error():
    with pytest.raises(ValueError, match="kernel name must be one of"):
        launch("adam", [], [], [], {})


def test_triton_on_cpu_outside_the_interpreter_is_a_clear_error(monkeypatch):
    # One source of truth: how the kernels were built (not the environment variable now).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("triton", torch.device("cpu")) == "triton"  # built interpreted
    monkeypatch.setattr(kernels, "interpreting", lambda: False)  # as if built for a GPU
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))
    # and the launcher itself refuses when its kernels were compiled for a GPU
    params, grads, states = make_tensors([10], torch.float32, 1)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        launch("cubic_damped", params, grads, states,
               dict(lr=0.01, weight_decay=0.0, **RULES["cubic_damped"][2]))


def test_tables_are_cached_and_follow_new_addresses():
    params, grads, states = make_tensors([BLOCK + 5, 7], torch.float32, 1)
    arrays = [params, grads, *states]
    device = params[0].device
    first, _ = _multi_tensor.pointer_table(arrays, device)
    again, _ = _multi_tensor.pointer_table(arrays, device)
    assert again is first
    new_grads = [g.clone() for g in grads]  # what zero_grad(set_to_none=True) leads to
    moved, _ = _multi_tensor.pointer_table([params, new_grads, *states], device)
    assert moved is not first
    assert moved[:, 1].tolist() == [g.data_ptr() for g in new_grads]
    blocks = _multi_tensor.block_table((BLOCK + 5, 0, 7), device)
    assert blocks.tolist() == [[0, 0, BLOCK + 5], [0, BLOCK, BLOCK + 5], [2, 0, 7]]


# -- through the optimizer classes --------------------------------------------------------


def small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model


def regression_data():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(32, 6, generator=generator), torch.randn(32, 3, generator=generator)


def train(model, optimizer, steps):
    inputs, targets = regression_data()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.7)
    for _ in range(steps):
        optimizer.zero_grad()  # set_to_none: new grad tensors, new pointer tables, each step
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(inputs), targets).item()


@pytest.mark.parametrize("name", sorted(RULES))
def test_fifty_training_steps_match_the_loop_backend(name):
    _, _, hyper, optimizer_class = RULES[name]
    models = {}
    losses = {}
    for backend in ("triton", "loop"):
        model = small_model()
        optimizer = optimizer_class(model.parameters(), lr=0.01, weight_decay=1e-3,
                                    backend=backend, **hyper)
        losses[backend] = train(model, optimizer, 50)
        models[backend] = (model, optimizer)
    (triton_model, triton_opt), (loop_model, loop_opt) = models["triton"], models["loop"]
    inputs, targets = regression_data()
    with torch.no_grad():
        first_loss = torch.nn.functional.mse_loss(small_model()(inputs), targets).item()
    assert losses["loop"] < 0.9 * first_loss  # it trains, so the comparison means something
    for a, b in zip(triton_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    if name == "ikfad":
        got = triton_opt.friction_summary()
        want = loop_opt.friction_summary()
        for key in want:
            assert got[key].steps == want[key].steps == 50
            assert got[key].mean == pytest.approx(want[key].mean, rel=1e-5)
            assert got[key].accumulated == pytest.approx(want[key].accumulated, rel=1e-5)


def test_two_groups_of_different_dtypes_match_the_loop_backend():
    def build(backend):
        torch.manual_seed(0)
        full = torch.nn.Linear(6, 8)
        half = torch.nn.Linear(8, 3).to(torch.bfloat16)
        optimizer = iKFAD(
            [{"params": full.parameters()}, {"params": half.parameters(), "lr": 0.02}],
            lr=0.01, backend=backend, mu=0.5,
        )
        return full, half, optimizer

    results = {}
    for backend in ("triton", "loop"):
        full, half, optimizer = build(backend)
        inputs = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
        for _ in range(5):
            optimizer.zero_grad()
            out = half(full(inputs).to(torch.bfloat16)).float()
            out.square().mean().backward()
            optimizer.step()
        results[backend] = (full, half, optimizer)
    (full_t, half_t, opt_t), (full_l, half_l, opt_l) = results["triton"], results["loop"]
    for a, b in zip(full_t.parameters(), full_l.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(half_t.parameters(), half_l.parameters()):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6)
    for a, b in zip(opt_t.friction_summary().values(), opt_l.friction_summary().values()):
        assert a.mean == pytest.approx(b.mean, rel=1e-5)


# -- the real (GPU) compiler ---------------------------------------------------------------

_CUDA_COMPILE = textwrap.dedent(
    """
    import os, re
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dampopt.kernels.cadam import cadam_kernel
    from dampopt.kernels.cubic_damped import cubic_damped_kernel
    from dampopt.kernels.ikfad import ikfad_kernel

    pointers = dict(pointers="*i64", blocks="*i64", sums="*fp32", param="*bf16", grad="*bf16",
                    momentum="*fp32", friction="*fp32", second_moment="*fp32")
    for kernel in (ikfad_kernel, cubic_damped_kernel, cadam_kernel):
        names = kernel.arg_names
        constants = {"HAS_WEIGHT_DECAY": True, "ALIGNED": True, "BLOCK": 1024}
        signature = {n: "constexpr" if n in constants else pointers.get(n, "fp32") for n in names}
        constexprs = {(names.index(n),): v for n, v in constants.items()}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        ptx = compiled.asm["ptx"]
        # full blocks of the fp32 state use 128-bit loads and stores
        print(len(re.findall(r"ld\\.global[.a-z]*\\.v4\\.b32", ptx)),
              len(re.findall(r"st\\.global[.a-z]*\\.v4\\.b32", ptx)))
    """
)


def _has_cuda_compiler() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_cuda_compiler(), reason="triton without its NVIDIA backend")
def test_kernels_compile_for_a_cuda_gpu_with_vector_loads():
    # CI has no GPU, but Triton can still compile to PTX for an H100/H200 (sm_90): this catches
    # what the interpreter accepts and the real compiler would not, and checks that the
    # alignment hint gives full blocks 128-bit memory access.
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", _CUDA_COMPILE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = [tuple(map(int, line.split())) for line in out.stdout.split("\n") if line.strip()]
    assert len(counts) == 3
    for loads, stores in counts:
        assert loads >= 2 and stores >= 2
