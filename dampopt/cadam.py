r"""CADAM: Adam-like preconditioning with cubic damping (Karoni et al. 2026, arXiv:2602.00334).

``lr = h**2`` (torch's meaning kept, ``h = sqrt(lr)`` recomputed every step). Each element has
a momentum ``p`` and a second-moment estimate ``zeta``, both starting at 0; a step applies

.. math::
    B:&\ p \leftarrow p - h g \\
    C:&\ \zeta \leftarrow \zeta e^{-\alpha h} + \frac{1 - e^{-\alpha h}}{\alpha} g^2 \\
    A:&\ q \leftarrow q + h\,\frac{p}{\sqrt{\zeta} + \epsilon} \\
    D:&\ p \leftarrow p / \sqrt{1 + 2 c h p^2} \\
    E:&\ p \leftarrow p\,e^{-\gamma h}

``weight_decay`` is coupled L2, ``g <- g + weight_decay * q`` (it enters zeta too, as in Adam).
"""

from __future__ import annotations

import torch

from ._friction import FrictionOptimizer
from ._rule import (
    Rule,
    cubic_damping,
    cubic_damping_foreach_,
    exp,
    relaxation_weight,
    sqrt,
    working,
    working_lists,
    write_backs,
)
from ._validation import check_non_negative


def cadam_scalars(lr, gamma, c, alpha, eps, weight_decay=0.0) -> dict:
    """The per-step constants of a step at learning rate ``lr = h**2``."""
    h = sqrt(lr)
    return dict(
        h=h,
        weight_decay=weight_decay,
        moment_decay=exp(-alpha * h),  # e^{-alpha h}
        moment_gain=relaxation_weight(alpha, h),  # (1 - e^{-alpha h}) / alpha
        eps=eps,
        two_c_h=2 * c * h,
        momentum_decay=exp(-gamma * h),  # e^{-gamma h}
    )


def cadam_step(param, grad, momentum, second_moment, s, has_weight_decay: bool) -> None:
    """One step on one tensor, in place; ``s`` from :func:`cadam_scalars`."""
    q, g = working(param, grad, momentum.dtype, s, has_weight_decay)
    p = momentum - s["h"] * g  # B: p = p - h g
    zeta = second_moment * s["moment_decay"] + s["moment_gain"] * (g * g)  # C: second moment
    q = q + s["h"] * (p / (torch.sqrt(zeta) + s["eps"]))  # A: q = q + h p / (sqrt(zeta) + eps)
    p = cubic_damping(p, s["two_c_h"])  # D: cubic damping, exact flow
    p = p * s["momentum_decay"]  # E: linear friction
    param.copy_(q)
    momentum.copy_(p)
    second_moment.copy_(zeta)


def cadam_step_foreach(params, grads, momenta, second_moments, s, has_weight_decay: bool) -> None:
    """:func:`cadam_step` over lists of tensors of one device and dtype."""
    qs, gs = working_lists(params, grads, momenta[0].dtype, s, has_weight_decay)
    torch._foreach_add_(momenta, gs, alpha=-s["h"])  # B
    torch._foreach_mul_(second_moments, s["moment_decay"])  # C
    torch._foreach_addcmul_(second_moments, gs, gs, value=s["moment_gain"])
    denominator = torch._foreach_sqrt(second_moments)  # A
    torch._foreach_add_(denominator, s["eps"])
    torch._foreach_addcdiv_(qs, momenta, denominator, value=s["h"])
    cubic_damping_foreach_(momenta, s["two_c_h"])  # D
    torch._foreach_mul_(momenta, s["momentum_decay"])  # E
    write_backs(params, qs)


CADAM_RULE = Rule(
    name="cadam",
    state_names=("momentum", "second_moment"),
    checks={
        "gamma": check_non_negative,
        "c": check_non_negative,
        "alpha": check_non_negative,
        "eps": check_non_negative,
    },
    scalars=cadam_scalars,
    step=cadam_step,
    step_foreach=cadam_step_foreach,
)


def cadam_update(
    param, grad, momentum, second_moment, *, lr, gamma, c, alpha, eps, weight_decay=0.0
):
    """One CADAM step on one tensor, in place (math in the state's dtype)."""
    s = cadam_scalars(lr, gamma, c, alpha, eps, weight_decay)
    cadam_step(param, grad, momentum, second_moment, s, bool(weight_decay))


class CADAM(FrictionOptimizer):
    """CADAM with ``lr = h**2``; defaults are the authors' CIFAR-10 values (h = 0.0037).

    Args:
        lr: learning rate, ``h**2`` (> 0).
        gamma: linear friction (>= 0).
        c: cubic damping coefficient (>= 0).
        alpha: relaxation rate of the second moment (>= 0).
        eps: added to ``sqrt(zeta)`` (>= 0).
        weight_decay: coupled L2 added to the gradient (>= 0).
        backend: "auto" | "torch" | "loop" | "triton" | "compiled".
        nonfinite: None (torch's behaviour), "raise" or "skip" a step with a NaN/inf gradient
            (see :mod:`dampopt._nonfinite`).
    """

    rule = CADAM_RULE

    def __init__(
        self,
        params,
        lr: float = 0.0037**2,
        gamma: float = 3.55,
        c: float = 82552.90,
        alpha: float = 0.005,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        backend: str = "auto",
        nonfinite: str | None = None,
    ):
        super().__init__(
            params, lr, weight_decay, backend, nonfinite, gamma=gamma, c=c, alpha=alpha, eps=eps
        )
