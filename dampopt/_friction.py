"""Machinery shared by the friction optimizers of Karoni et al. (iKFAD, CD, CADAM).

Each optimizer module supplies its update rule twice: once as a plain function on one tensor
(the reference every backend is tested against) and once with torch's multi-tensor
``_foreach`` ops. This module holds what they share: argument checks, the ``lr = h**2``
convention, fp32 state for low-precision parameters, and the choice of backend.

Backends (``backend=``):
    "torch"    torch ``_foreach`` ops, a few passes over memory per step;
    "loop"     the reference function tensor by tensor (slowest; the definition);
    "triton"   one fused Triton kernel launch per (group, device, dtype) - ``dampopt.kernels``;
    "compiled" the foreach rule fused by ``torch.compile`` (pays a one-off compile);
    "auto"     "triton" for fp32/bf16/fp16 CUDA tensors when triton imports; on CPU the
               fastest measured path, "compiled", when a C++ compiler is found (see
               ``cpu_backend``); "torch" otherwise.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch

from . import _nonfinite
from ._distributed import local_tensor
from ._state import (
    check_state_dict,
    check_state_shapes,
    load_state_dict_keeping_state_dtype,
    pre_hooks_applied,
    state_dtype,
)
from ._validation import check_gradients, check_learning_rate, check_non_negative

BACKENDS = ("auto", "torch", "loop", "triton", "compiled")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def relaxation_weight(alpha: float, h: float) -> float:
    """``(1 - exp(-alpha*h)) / alpha``, with its limit ``h`` at alpha = 0."""
    return h if alpha == 0 else -math.expm1(-alpha * h) / alpha


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


_GROUP_DEFAULTS = {"nonfinite": None}  # older state dicts lack it


class FrictionOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set the class attributes below and the two update functions."""

    #: names of the per-element state tensors, in the order the update functions take them
    state_names: tuple[str, ...] = ()
    #: hyperparameters of the rule (besides lr and weight_decay) with the check for each
    hyperparameter_checks: dict = {}
    #: name of the kernel in dampopt.kernels
    kernel_name: str = ""
    #: whether the update returns the per-tensor sum of a state (iKFAD's friction)
    returns_sums: bool = False
    extra_state_names: tuple = ()  # per-parameter state besides state_names (not param-shaped)

    @staticmethod
    def update(param, grad, *state, lr, weight_decay, **hyperparameters):
        raise NotImplementedError

    @staticmethod
    def update_foreach(params, grads, *states, lr, weight_decay, **hyperparameters):
        raise NotImplementedError

    def __init__(self, params, lr, weight_decay, backend, nonfinite=None, **hyperparameters):
        lr = check_learning_rate(lr)
        weight_decay = check_non_negative("weight_decay", weight_decay)
        backend = check_backend(backend)
        checked = {
            name: self.hyperparameter_checks[name](name, value)
            for name, value in hyperparameters.items()
        }
        defaults = dict(lr=lr, weight_decay=weight_decay, backend=backend,
                        nonfinite=_nonfinite.check_mode(nonfinite), **checked)  # fmt: skip
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts from before nonfinite= existed
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        # Check a new group's own values before the base class stores anything.
        if "lr" in param_group:
            check_learning_rate(param_group["lr"])
        if "weight_decay" in param_group:
            check_non_negative("weight_decay", param_group["weight_decay"])
        if "backend" in param_group:
            check_backend(param_group["backend"])
        if "nonfinite" in param_group:
            _nonfinite.check_mode(param_group["nonfinite"])
        for name, check in self.hyperparameter_checks.items():
            if name in param_group:
                check(name, param_group[name])
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict) -> None:
        # everything is checked, after the user's pre-hooks, before anything is stored
        with pre_hooks_applied(self, state_dict) as state_dict:
            check_state_dict(self, state_dict,
                             required=("lr", "weight_decay", "backend",
                                       *self.hyperparameter_checks),
                             defaults=_GROUP_DEFAULTS, param_state=self.state_names,
                             extra_state=self.extra_state_names)  # fmt: skip
            load_state_dict_keeping_state_dtype(self, state_dict, super().load_state_dict)

    def hyperparameters(self, group: dict) -> dict:
        return {name: group[name] for name in self.hyperparameter_checks}

    # -- state ---------------------------------------------------------------------------------

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        dtype = state_dtype(param)
        for name in self.state_names:
            state[name] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)

    def _gather(self, group: dict):
        """Params with a grad, their grads and state lists, in group order."""
        params, grads = [], []
        states = [[] for _ in self.state_names]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                self._init_state(param, state)
            params.append(param)
            grads.append(param.grad)
            for i, name in enumerate(self.state_names):
                states[i].append(state[name])
        return params, grads, states

    def _record_sums(self, params, sums) -> None:
        """Hook for optimizers whose update returns per-tensor sums (iKFAD's friction)."""

    # -- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Validate every group before changing any: no half-updated optimizer.
        check_state_shapes(self, self.state_names)
        for group in self.param_groups:
            check_learning_rate(group["lr"], allow_zero=True)
            check_gradients(p for p in group["params"] if p.grad is not None)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if resolve_backend(group["backend"], p.device, p.dtype) == "triton":
                    from dampopt.kernels import check_arrays

                    # dtype and layout problems surface here, not after other buckets moved
                    check_arrays([local_tensor(p)], [local_tensor(p.grad)], [])

        if _nonfinite.handle(self):  # nonfinite="skip" and a NaN/inf gradient
            return loss

        for group in self.param_groups:
            params, grads, states = self._gather(group)
            if not params:
                continue
            kwargs = dict(lr=group["lr"], weight_decay=group["weight_decay"])
            kwargs.update(self.hyperparameters(group))
            buckets = defaultdict(list)
            for i, param in enumerate(params):
                buckets[(param.device, param.dtype)].append(i)
            for (device, dtype), index in buckets.items():
                backend = resolve_backend(group["backend"], device, dtype)
                # FSDP2 parameters, grads and state are DTensors: every backend works on this
                # rank's shards (views), so no full parameter is ever gathered.
                sums = run_backend(
                    self,
                    backend,
                    [local_tensor(params[i]) for i in index],
                    [local_tensor(grads[i]) for i in index],
                    [[local_tensor(state[i]) for i in index] for state in states],
                    kwargs,
                )
                if self.returns_sums:
                    self._record_sums([params[i] for i in index], sums)
        return loss


# -- backends --------------------------------------------------------------------------------


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: The backend "auto" picks for CPU tensors: the fastest measured there (benchmarks/README.md).
#: It compiles once per bucket on the first step (seconds; cached on disk) and runs tensors
#: under dampopt._compiled.SMALL_TENSOR elements uncompiled, so small models never compile.
cpu_backend = "compiled"


@functools.cache
def _cpp_compiler_available() -> bool:
    """Whether torch.compile can build CPU code here: dynamo supports this Python, and a C++
    compiler is on the PATH (inductor compiles C++ at run time). Otherwise auto uses foreach."""
    import os
    import shutil

    try:
        from torch._dynamo import is_dynamo_supported

        if not is_dynamo_supported():
            return False
    except Exception:  # a torch without dynamo
        return False
    candidates = (os.environ.get("CXX", ""), "g++", "c++", "clang++")
    return any(shutil.which(name) for name in candidates if name)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for tensors on ``device``; raises for impossible requests."""
    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64 and _triton_available():
            return "triton"
        if device.type == "cpu" and cpu_backend == "compiled" and _cpp_compiler_available():
            return "compiled"
        return "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU use "
                "backend='torch', 'compiled' or 'auto', or set TRITON_INTERPRET=1 before "
                "importing triton to run the kernels in Triton's (slow) interpreter"
            )
        if dtype == torch.float64:
            raise TypeError(
                "backend='triton' takes fp32, bf16 or fp16 parameters, got float64; use "
                "backend='torch' or 'auto' (which sends fp64 to torch)"
            )
    return backend


def run_backend(optimizer, backend, params, grads, states, kwargs):
    """Apply the optimizer's rule with ``backend`` to one (device, dtype) bucket."""
    if backend == "loop":
        sums = [
            optimizer.update(p, g, *[state[i] for state in states], **kwargs)
            for i, (p, g) in enumerate(zip(params, grads))
        ]
        return sums
    if backend == "torch":
        return optimizer.update_foreach(params, grads, *states, **kwargs)
    if backend == "triton":
        from dampopt.kernels import launch

        return launch(optimizer.kernel_name, params, grads, states, kwargs)
    if backend == "compiled":
        from ._compiled import compiled_update

        return compiled_update(optimizer, params, grads, states, kwargs)
    raise ValueError(f"unknown backend {backend!r}")


# -- helpers the update functions share ------------------------------------------------------


def working_tensors(param, grad, dtype, weight_decay):
    """``(q, g)`` in the math dtype: the parameter itself when it already has that dtype (else
    an fp32 copy, written back by :func:`write_back`), and the gradient with coupled L2 weight
    decay, ``g + weight_decay * q``."""
    q = param if param.dtype == dtype else param.to(dtype)
    g = grad.to(dtype)
    if weight_decay:
        g = g + weight_decay * q
    return q, g


def write_back(param: torch.Tensor, work: torch.Tensor) -> None:
    if work is not param:
        param.copy_(work)


def working_lists(params, grads, dtype, weight_decay):
    """:func:`working_tensors` for lists of one dtype, with foreach ops."""
    qs = params if params[0].dtype == dtype else [p.to(dtype) for p in params]
    gs = grads if grads[0].dtype == dtype else [g.to(dtype) for g in grads]
    if weight_decay:
        gs = torch._foreach_add(gs, qs, alpha=weight_decay)
    return qs, gs


def write_backs(params, works) -> None:
    if works is not params:
        torch._foreach_copy_(params, works)
