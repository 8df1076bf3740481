r"""SGD with momentum as a damped oscillator (the paper, Sec. 3, Eq. 5).

Heavy-ball SGD, ``v = mu*v - lr*g; theta += v``, is in the continuous limit the forced damped
oscillator ``x'' + gamma x' + omega^2 x = F`` with damping ``gamma = 1 - mu`` and natural
frequency ``omega = sqrt(lambda * lr)`` for curvature ``lambda``. Critical damping
``gamma = 2 omega`` gives

.. math:: \mu_c(\alpha) = 1 - 2\sqrt{\lambda\,\alpha}.

``lr`` here is the learning rate as torch.optim means it (what LR schedulers change).
"""

from __future__ import annotations

import math

import torch

from ._validation import check_learning_rate, check_momentum_bounds, check_non_negative

UNDERDAMPED = "underdamped"
CRITICAL = "critical"
OVERDAMPED = "overdamped"
REGIMES = (UNDERDAMPED, CRITICAL, OVERDAMPED)


def critical_momentum(lr: float, curvature: float = 1.0) -> float:
    """Unclamped critically damped momentum ``1 - 2*sqrt(curvature*lr)`` (Eq. 5).

    It goes negative for ``curvature*lr > 1/4``; :func:`physics_momentum` clamps it.
    """
    lr = check_learning_rate(lr, allow_zero=True)
    curvature = check_non_negative("curvature", curvature)
    return 1.0 - 2.0 * math.sqrt(curvature * lr)


def physics_momentum(
    lr: float, mu_min: float = 0.5, mu_max: float = 0.99, curvature: float = 1.0
) -> float:
    """``clamp(critical_momentum(lr, curvature), mu_min, mu_max)``; the paper uses [0.5, 0.99]."""
    mu_min, mu_max = check_momentum_bounds(mu_min, mu_max)
    return min(max(critical_momentum(lr, curvature), mu_min), mu_max)


def physics_momentum_traced(lr: torch.Tensor, mu_min: float, mu_max: float,
                            curvature: float) -> torch.Tensor:  # fmt: skip
    """:func:`physics_momentum` of a tensor ``lr`` as a 0-d tensor, for steps traced by
    ``torch.compile``: a float momentum would be a guard there, a recompile per lr value. The
    bounds are checked by the caller; the tensor's value cannot be checked inside a graph."""
    return torch.clamp(1.0 - 2.0 * torch.sqrt(curvature * lr), mu_min, mu_max)


def classify_regime(mu: float, lr: float, tol: float = 0.05, curvature: float = 1.0) -> str:
    """Damping regime of momentum ``mu`` at learning rate ``lr`` (the paper, Sec. 4.5).

    ``dmu = mu - mu_c(lr)``: "underdamped" if ``dmu > tol`` (too little damping, oscillates),
    "overdamped" if ``dmu < -tol``, "critical" otherwise.
    """
    tol = check_non_negative("tol", tol)
    if not 0.0 <= float(mu) < 1.0:
        raise ValueError(f"mu must be in [0, 1), got {mu}")
    delta = float(mu) - critical_momentum(lr, curvature)
    if delta > tol:
        return UNDERDAMPED
    if delta < -tol:
        return OVERDAMPED
    return CRITICAL


def momentum_in_effect(group: dict) -> float | None:
    """The momentum coefficient a param group runs with now: SGD's (and PhysicsSGD's)
    ``momentum``, Adam's ``betas[0]``; None for optimizers without one."""
    if "momentum" in group:
        return float(group["momentum"])
    if "betas" in group:
        return float(group["betas"][0])
    return None
