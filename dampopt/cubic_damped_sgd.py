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

import math

import torch

from ._friction import FrictionOptimizer, working_lists, working_tensors, write_back, write_backs
from ._validation import check_non_negative


def cubic_damped_update(param, grad, momentum, *, lr, gamma, c, weight_decay=0.0):
    """One CD step on one tensor, in place (math in the state's dtype)."""
    h = math.sqrt(lr)
    p = momentum
    q, g = working_tensors(param, grad, p.dtype, weight_decay)
    p.add_(g, alpha=-h)  # B: p = p - h g
    q.add_(p, alpha=h)  # A: q = q + h p
    p.div_(torch.sqrt(1 + (2 * c * h) * p * p))  # C: cubic damping, exact flow
    p.mul_(math.exp(-gamma * h))  # D: linear friction
    write_back(param, q)


def cubic_damped_update_foreach(params, grads, momenta, *, lr, gamma, c, weight_decay=0.0):
    """:func:`cubic_damped_update` over lists of tensors of one device and dtype."""
    h = math.sqrt(lr)
    dtype = momenta[0].dtype
    qs, gs = working_lists(params, grads, dtype, weight_decay)
    torch._foreach_add_(momenta, gs, alpha=-h)  # B
    torch._foreach_add_(qs, momenta, alpha=h)  # A
    denominator = torch._foreach_mul(momenta, momenta)  # C
    torch._foreach_mul_(denominator, 2 * c * h)
    torch._foreach_add_(denominator, 1.0)
    torch._foreach_sqrt_(denominator)
    torch._foreach_div_(momenta, denominator)
    torch._foreach_mul_(momenta, math.exp(-gamma * h))  # D
    write_backs(params, qs)


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

    state_names = ("momentum",)
    hyperparameter_checks = {"gamma": check_non_negative, "c": check_non_negative}
    kernel_name = "cubic_damped"
    update = staticmethod(cubic_damped_update)
    update_foreach = staticmethod(cubic_damped_update_foreach)

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
