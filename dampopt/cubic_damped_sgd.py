r"""CubicDampedSGD: SGD with cubic damping ("CD", Karoni et al. 2026, arXiv:2602.00334).

``lr = h**2`` (torch's meaning kept, ``h = sqrt(lr)`` recomputed every step). Each element has
a momentum ``p`` starting at 0 (the authors' code starts it at ``+grad``, which makes the first
step go uphill; this project starts at 0), and a step applies

.. math::
    B:&\ p \leftarrow p - h g \\
    A:&\ q \leftarrow q + h p \\
    C:&\ p \leftarrow p / \sqrt{1 + 2 c h p^2}
        \quad\text{(the exact flow of } \dot p = -c p^3 \text{ over time } h) \\
    D:&\ p \leftarrow p\,e^{-\gamma h}

``weight_decay`` is coupled L2, ``g <- g + weight_decay * q``.
"""

from __future__ import annotations

import torch

from ._friction import FrictionOptimizer
from ._rule import (
    Rule,
    cubic_damping,
    cubic_damping_foreach_,
    exp,
    sqrt,
    working,
    working_lists,
    write_backs,
)
from ._validation import check_non_negative


def cubic_damped_scalars(lr, gamma, c, weight_decay=0.0) -> dict:
    """The per-step constants of a step at learning rate ``lr = h**2``."""
    h = sqrt(lr)
    return dict(h=h, weight_decay=weight_decay, two_c_h=2 * c * h,
                momentum_decay=exp(-gamma * h))  # fmt: skip


def cubic_damped_step(param, grad, momentum, s, has_weight_decay: bool) -> None:
    """One step on one tensor, in place; ``s`` from :func:`cubic_damped_scalars`."""
    q, g = working(param, grad, momentum.dtype, s, has_weight_decay)
    p = momentum - s["h"] * g  # B: p = p - h g
    q = q + s["h"] * p  # A: q = q + h p
    p = cubic_damping(p, s["two_c_h"])  # C: cubic damping, exact flow
    p = p * s["momentum_decay"]  # D: linear friction
    param.copy_(q)
    momentum.copy_(p)


def cubic_damped_step_foreach(params, grads, momenta, s, has_weight_decay: bool) -> None:
    """:func:`cubic_damped_step` over lists of tensors of one device and dtype."""
    qs, gs = working_lists(params, grads, momenta[0].dtype, s, has_weight_decay)
    torch._foreach_add_(momenta, gs, alpha=-s["h"])  # B
    torch._foreach_add_(qs, momenta, alpha=s["h"])  # A
    cubic_damping_foreach_(momenta, s["two_c_h"])  # C
    torch._foreach_mul_(momenta, s["momentum_decay"])  # D
    write_backs(params, qs)


CUBIC_DAMPED_RULE = Rule(
    name="cubic_damped",
    state_names=("momentum",),
    checks={"gamma": check_non_negative, "c": check_non_negative},
    scalars=cubic_damped_scalars,
    step=cubic_damped_step,
    step_foreach=cubic_damped_step_foreach,
)


def cubic_damped_update(param, grad, momentum, *, lr, gamma, c, weight_decay=0.0):
    """One CD step on one tensor, in place (math in the state's dtype)."""
    s = cubic_damped_scalars(lr, gamma, c, weight_decay)
    cubic_damped_step(param, grad, momentum, s, bool(weight_decay))


class CubicDampedSGD(FrictionOptimizer):
    """Cubically damped SGD with ``lr = h**2``; defaults are the authors' CIFAR-10 values
    (h = 0.0448, c = 56814.47). The diagnostic paper trained with c = 0.1.

    Args:
        lr: learning rate, ``h**2`` (> 0).
        gamma: linear friction (>= 0).
        c: cubic damping coefficient (>= 0).
        weight_decay: coupled L2 added to the gradient (>= 0).
        backend: "auto" | "torch" | "loop" | "triton" | "compiled".
        nonfinite: None (torch's behaviour), "raise" or "skip" a step with a NaN/inf gradient
            (see :mod:`dampopt._nonfinite`).
    """

    rule = CUBIC_DAMPED_RULE

    def __init__(
        self,
        params,
        lr: float = 0.0448**2,
        gamma: float = 0.17,
        c: float = 56814.47,
        weight_decay: float = 0.0,
        backend: str = "auto",
        nonfinite: str | None = None,
    ):
        super().__init__(
            params, lr, weight_decay, backend, nonfinite, gamma=gamma, c=c
        )
