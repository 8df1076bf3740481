"""Machinery shared by the friction optimizers of Karoni et al. (iKFAD, CD, CADAM), and the one
place that knows the backends.

Each optimizer module defines its rule as a :class:`dampopt._rule.Rule` (per-step scalars, a
single-tensor step, a foreach step; a Triton kernel of the same name in ``dampopt.kernels``).
This module holds what the optimizers share - argument checks, the ``lr = h**2`` convention,
fp32 state for low-precision parameters - and the dispatcher, which resolves a backend once per
(param group, device, dtype) bucket and hands it tensor lists and scalars. The backends know
nothing of optimizers.

Backends (``backend=``):
    "torch"    the rule's foreach step, a few passes over memory per step;
    "loop"     the rule's single-tensor step, tensor by tensor (slowest; the definition);
    "triton"   one fused Triton kernel launch per bucket - ``dampopt.kernels``;
    "compiled" the single-tensor step fused by ``torch.compile`` (pays a one-off compile);
    "auto"     "triton" for fp32/bf16/fp16 CUDA tensors when triton imports; on CPU the
               fastest measured path, "compiled", when a C++ compiler is found (see
               ``cpu_backend``); "torch" otherwise.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch

from . import _nonfinite
from ._distributed import local_tensor
from ._rule import Rule
from ._state import (
    check_state_dict,
    check_state_shapes,
    load_state_dict_keeping_state_dtype,
    pre_hooks_applied,
    state_dtype,
)
from ._validation import (
    check_gradients,
    check_learning_rate,
    check_non_negative,
    learning_rate,
    step_learning_rate,
)

BACKENDS = ("auto", "torch", "loop", "triton", "compiled")

def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# older state dicts lack these; "step" counts the group's steps (auto's compile decision)
_GROUP_DEFAULTS = {"nonfinite": None, "step": 0}


class FrictionOptimizer(torch.optim.Optimizer):
    """Base class: a subclass sets :attr:`rule` (and its own ``__init__`` with the defaults)."""

    #: the update rule (dampopt._rule.Rule)
    rule: Rule
    extra_state_names: tuple = ()  # per-parameter state besides the rule's (not param-shaped)

    #: from the rule: the per-element state tensors, in the order its steps take them
    state_names: tuple[str, ...] = ()
    #: from the rule: hyperparameter (besides lr, weight_decay) -> its check
    hyperparameter_checks: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "rule" in cls.__dict__:
            cls.state_names = cls.rule.state_names
            cls.hyperparameter_checks = dict(cls.rule.checks)

    def __init__(self, params, lr, weight_decay, backend, nonfinite=None, **hyperparameters):
        lr = learning_rate(lr)  # a 1-element tensor stays one (torch.compile, see step())
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
        # the group's step count (auto's compile decision), not a setting: kept out of
        # defaults so that cls(params, **optimizer.defaults) still builds an optimizer
        self.param_groups[-1].setdefault("step", 0)

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

    def _gather(self, params):
        """The state lists of ``params`` (one per state name), creating missing state."""
        states = [[] for _ in self.state_names]
        for param in params:
            state = self.state[param]
            if not state:
                self._init_state(param, state)
            for i, name in enumerate(self.state_names):
                states[i].append(state[name])
        return states

    def _record_sums(self, params, sums) -> None:
        """Hook for rules with a ``summed_state`` (iKFAD's friction): its per-tensor sums."""

    # -- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Validate every group, and resolve each bucket's backend, before changing any: no
        # half-updated optimizer.
        check_state_shapes(self, self.state_names)
        # Under torch.compile the step is traced: every backend is the rule's single-tensor
        # step ("loop"), which the caller's compile fuses; a tensor lr stays a tensor, so the
        # scalars are data in the graph and an LR scheduler never recompiles.
        traced = torch.compiler.is_compiling()
        plans, lrs = [], []
        for group in self.param_groups:
            lrs.append(step_learning_rate(group["lr"]))
            params = [p for p in group["params"] if p.grad is not None]
            check_gradients(params)
            buckets = defaultdict(list)
            for param in params:
                buckets[(param.device, param.dtype)].append(param)
            plan = []
            for (device, dtype), bucket in buckets.items():
                backend = "loop" if traced else resolve_backend(
                    group["backend"], device, dtype, bucket=bucket, steps_taken=group["step"],
                    rule=self.rule.name)
                if backend == "triton":
                    self._admit_to_triton(bucket)
                plan.append((backend, bucket))
            plans.append(plan)

        if _nonfinite.handle(self):  # nonfinite="skip" and a NaN/inf gradient
            return loss

        for group, plan, lr in zip(self.param_groups, plans, lrs):
            if not plan:
                continue
            hyperparameters = self.hyperparameters(group)
            scalars = self.rule.scalars(lr, weight_decay=group["weight_decay"],
                                        **hyperparameters)  # fmt: skip
            has_weight_decay = bool(group["weight_decay"])
            for backend, bucket in plan:
                states = self._gather(bucket)
                # FSDP2 parameters, grads and state are DTensors: every backend works on this
                # rank's shards (views), so no full parameter is ever gathered.
                sums = run_backend(
                    self.rule,
                    backend,
                    [local_tensor(p) for p in bucket],
                    [local_tensor(p.grad) for p in bucket],
                    [[local_tensor(t) for t in state] for state in states],
                    scalars,
                    has_weight_decay,
                )
                if sums is not None:
                    self._record_sums(bucket, sums)
        for group in self.param_groups:
            group["step"] += 1
        return loss

    def _admit_to_triton(self, params) -> None:
        """The kernels' dtype, device and layout checks for one bucket, before any update."""
        from dampopt import kernels

        have_state = [p for p in params if self.state.get(p)]
        kernels.check_arrays([local_tensor(p) for p in params],
                             [local_tensor(p.grad) for p in params], [])  # fmt: skip
        if have_state:  # a loaded state dict may hold other strides than its parameter
            kernels.check_arrays(
                [local_tensor(p) for p in have_state],
                [local_tensor(p.grad) for p in have_state],
                [[local_tensor(self.state[p][n]) for p in have_state] for n in self.state_names],
            )


# -- backends --------------------------------------------------------------------------------


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


#: The backend "auto" picks for CPU tensors: the fastest measured there (benchmarks/README.md).
#: It runs the foreach step until the compile would have paid for itself
#: (dampopt._compiled.worth_compiling), then compiles once per rule (seconds; cached on disk);
#: tensors under dampopt._compiled.SMALL_TENSOR elements are never compiled.
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


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                    bucket=None, steps_taken: int | None = None,
                    rule: str | None = None) -> str:  # fmt: skip
    """The concrete backend for tensors on ``device``; raises for impossible requests.

    Given the ``bucket`` (its tensors), its group's ``steps_taken`` and the ``rule``'s name,
    "auto" on CPU picks
    "compiled" only once a compile would have paid for itself
    (:func:`dampopt._compiled.worth_compiling`), "torch" before.
    """
    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64 and _triton_available():
            return "triton"
        if device.type == "cpu" and cpu_backend == "compiled" and _cpp_compiler_available():
            if bucket is None or steps_taken is None:
                return "compiled"
            from ._compiled import worth_compiling

            return "compiled" if worth_compiling(steps_taken, bucket, rule) else "torch"
        return "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        from dampopt import kernels

        kernels.check_device_and_dtype(device, dtype)
    return backend


def run_backend(rule: Rule, backend: str, params, grads, states, scalars: dict,
                has_weight_decay: bool):  # fmt: skip
    """One step of ``rule`` with ``backend`` over one (device, dtype) bucket, in place.

    ``states`` holds one list per ``rule.state_names``; ``scalars`` is ``rule.scalars(...)``.
    Returns the per-tensor sums of ``rule.summed_state`` (0-d tensors), or None.
    """
    sums = None
    if backend == "loop":
        for i, (p, g) in enumerate(zip(params, grads)):
            rule.step(p, g, *[state[i] for state in states], scalars, has_weight_decay)
    elif backend == "torch":
        rule.step_foreach(params, grads, *states, scalars, has_weight_decay)
    elif backend == "triton":
        from dampopt import kernels

        # admitted in step() before any bucket moved (FrictionOptimizer._admit_to_triton)
        sums = kernels.launch(rule.name, params, grads, states, scalars,
                              dict(HAS_WEIGHT_DECAY=has_weight_decay), checked=True)  # fmt: skip
    elif backend == "compiled":
        from ._compiled import compiled_update

        compiled_update(rule, params, grads, states, scalars, has_weight_decay)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    if sums is None:
        sums = rule.sums(states)
    return sums
