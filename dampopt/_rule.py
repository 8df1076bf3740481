"""A friction update rule as data: what every backend needs, and nothing about optimizers.

Each friction optimizer module (:mod:`dampopt.ikfad`, :mod:`dampopt.cubic_damped_sgd`,
:mod:`dampopt.cadam`) writes its rule once per kind of code, the torch/optimi standard:

* ``scalars(lr, weight_decay, **hyperparameters) -> {name: float}``: every per-step constant
  (``h = sqrt(lr)``, the exponential decays, ...), derived once on the host; every backend,
  the Triton kernels included, takes these values by name;
* ``step(param, grad, *states, s, has_weight_decay)``: the single-tensor step, out of place and
  then copied back; run eagerly with float scalars for ``backend="loop"`` (the definition every
  backend is tested against) and fused by ``torch.compile`` with 0-d tensor scalars for
  ``backend="compiled"``;
* ``step_foreach(params, grads, *states, s, has_weight_decay)``: the same step with torch's
  multi-tensor ``_foreach`` ops (``backend="torch"``);

and a Triton block in ``kernels/``. This module sits below the optimizers and the backends: it
imports neither.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rule:
    """One friction rule: its state, its hyperparameters' checks and its transcriptions."""

    name: str  # also the name of its Triton kernel in dampopt.kernels
    state_names: tuple[str, ...]  # per-element state, in the order the steps take it
    checks: Mapping[str, Callable]  # hyperparameter (besides lr, weight_decay) -> its check
    scalars: Callable[..., dict]
    step: Callable
    step_foreach: Callable
    #: the state whose per-tensor sum every step reports (iKFAD's friction), or None
    summed_state: str | None = None

    def sums(self, states) -> list[torch.Tensor] | None:
        """The per-tensor sums of :attr:`summed_state` from a bucket's state lists."""
        if self.summed_state is None:
            return None
        # one plain sum per tensor: reads at memory speed and is more accurate than a
        # _foreach_norm(., 1), which gives the same value since the summed state is >= 0
        return [t.sum() for t in states[self.state_names.index(self.summed_state)]]


# The scalars' math: Python floats, or 0-d tensors when the lr is a tensor under torch.compile
# (then every per-step constant is data in the graph, and a new lr never recompiles).


def sqrt(x):
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else math.sqrt(x)


def exp(x):
    return torch.exp(x) if isinstance(x, torch.Tensor) else math.exp(x)


def relaxation_weight(alpha: float, h):
    """``(1 - exp(-alpha*h)) / alpha``, with its limit ``h`` at alpha = 0."""
    if alpha == 0:
        return h
    expm1 = torch.expm1 if isinstance(h, torch.Tensor) else math.expm1
    return -expm1(-alpha * h) / alpha


# -- pieces the single-tensor steps share (eager and compiled) -------------------------------


def working(param, grad, dtype, s, has_weight_decay: bool):
    """``(q, g)`` in the math dtype (the state's): the parameter itself when it has that dtype,
    else an fp32 copy (the step copies the result back into the parameter), and the gradient
    with coupled L2 weight decay, ``g + weight_decay * q``."""
    q = param.to(dtype)
    g = grad.to(dtype)
    if has_weight_decay:
        g = g + s["weight_decay"] * q
    return q, g


def cubic_damping(p, two_c_h):
    """The exact flow of ``dp/dt = -c p^3`` over a time ``h``: ``p / sqrt(1 + 2 c h p^2)``."""
    return p / torch.sqrt(1 + two_c_h * p * p)


# -- pieces the foreach steps share ----------------------------------------------------------


def working_lists(params, grads, dtype, s, has_weight_decay: bool):
    """:func:`working` for lists of one dtype, with foreach ops."""
    qs = params if params[0].dtype == dtype else [p.to(dtype) for p in params]
    gs = grads if grads[0].dtype == dtype else [g.to(dtype) for g in grads]
    if has_weight_decay:
        gs = torch._foreach_add(gs, qs, alpha=s["weight_decay"])
    return qs, gs


def write_backs(params, works) -> None:
    """Copy fp32 working copies back into low-precision parameters (rounding once)."""
    if works is not params:
        torch._foreach_copy_(params, works)


def cubic_damping_foreach_(momenta, two_c_h: float) -> None:
    """:func:`cubic_damping` in place over a list."""
    denominator = torch._foreach_mul(momenta, momenta)
    torch._foreach_mul_(denominator, two_c_h)
    torch._foreach_add_(denominator, 1.0)
    torch._foreach_sqrt_(denominator)
    torch._foreach_div_(momenta, denominator)
