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

import math

import torch

from ._friction import (
    FrictionOptimizer,
    relaxation_weight,
    working_lists,
    working_tensors,
    write_back,
    write_backs,
)
from ._validation import check_non_negative


def cadam_update(
    param, grad, momentum, second_moment, *, lr, gamma, c, alpha, eps, weight_decay=0.0
):
    """One CADAM step on one tensor, in place (math in the state's dtype)."""
    h = math.sqrt(lr)
    p, zeta = momentum, second_moment
    q, g = working_tensors(param, grad, p.dtype, weight_decay)
    p.add_(g, alpha=-h)  # B: p = p - h g
    zeta.mul_(math.exp(-alpha * h)).addcmul_(g, g, value=relaxation_weight(alpha, h))  # C
    q.addcdiv_(p, zeta.sqrt().add_(eps), value=h)  # A: q = q + h p / (sqrt(zeta) + eps)
    p.div_(torch.sqrt(1 + (2 * c * h) * p * p))  # D: cubic damping, exact flow
    p.mul_(math.exp(-gamma * h))  # E: linear friction
    write_back(param, q)


def cadam_update_foreach(
    params, grads, momenta, second_moments, *, lr, gamma, c, alpha, eps, weight_decay=0.0
):
    """:func:`cadam_update` over lists of tensors of one device and dtype."""
    h = math.sqrt(lr)
    dtype = momenta[0].dtype
    qs, gs = working_lists(params, grads, dtype, weight_decay)
    torch._foreach_add_(momenta, gs, alpha=-h)  # B
    torch._foreach_mul_(second_moments, math.exp(-alpha * h))  # C
    torch._foreach_addcmul_(second_moments, gs, gs, value=relaxation_weight(alpha, h))
    denominator = torch._foreach_sqrt(second_moments)  # A
    torch._foreach_add_(denominator, eps)
    torch._foreach_addcdiv_(qs, momenta, denominator, value=h)
    denominator = torch._foreach_mul(momenta, momenta)  # D
    torch._foreach_mul_(denominator, 2 * c * h)
    torch._foreach_add_(denominator, 1.0)
    torch._foreach_sqrt_(denominator)
    torch._foreach_div_(momenta, denominator)
    torch._foreach_mul_(momenta, math.exp(-gamma * h))  # E
    write_backs(params, qs)


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

    state_names = ("momentum", "second_moment")
    hyperparameter_checks = {
        "gamma": check_non_negative,
        "c": check_non_negative,
        "alpha": check_non_negative,
        "eps": check_non_negative,
    }
    kernel_name = "cadam"
    update = staticmethod(cadam_update)
    update_foreach = staticmethod(cadam_update_foreach)

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
