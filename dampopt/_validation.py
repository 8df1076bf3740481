"""Argument checks shared by every optimizer and diagnostic.

Each check raises before anything is changed and names the argument and the allowed range,
so a typo in a config never leaves an optimizer half-built.
"""

from __future__ import annotations

import math
from numbers import Real

import torch


def _as_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:  # torch.optim raises ValueError for a tensor lr too
            raise ValueError(
                f"{name} must be a number or a 1-element tensor, got a tensor of shape "
                f"{tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_learning_rate(value, name: str = "lr", allow_zero: bool = False) -> float:
    """lr must be a finite number > 0 (>= 0 where a schedule may reach zero)."""
    value = _as_float(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def learning_rate(value, name: str = "lr") -> float | torch.Tensor:
    """:func:`check_learning_rate` for a constructor or a new param group: a number becomes a
    float; a 1-element tensor is checked and kept as the tensor (torch's convention for steps
    under ``torch.compile``, where an LR scheduler then changes data, not a guard)."""
    checked = check_learning_rate(value, name)
    return value if isinstance(value, torch.Tensor) else checked


def traced_tensor(value) -> bool:
    """Whether ``value`` is a tensor seen by a ``torch.compile`` trace: there it must stay a
    tensor (``float()`` of it would break the graph, and a float would be a guard)."""
    return isinstance(value, torch.Tensor) and torch.compiler.is_compiling()


def step_learning_rate(value):
    """A group's lr at step time, checked (finite, >= 0): a float, or under ``torch.compile``
    a tensor lr as the tensor, unchecked (its value cannot be read without leaving the graph;
    torch.optim checks none at step time)."""
    if traced_tensor(value):
        return value
    return check_learning_rate(value, allow_zero=True)


def check_non_negative(name: str, value) -> float:
    """A finite number >= 0 (friction, curvature, decay rates, eps...)."""
    value = _as_float(name, value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_positive(name: str, value) -> float:
    value = _as_float(name, value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_momentum_bounds(mu_min, mu_max) -> tuple[float, float]:
    """Momentum bounds live in [0, 1): mu = 1 would be an undamped oscillator."""
    mu_min = _as_float("mu_min", mu_min)
    mu_max = _as_float("mu_max", mu_max)
    for name, value in (("mu_min", mu_min), ("mu_max", mu_max)):
        if not (0.0 <= value < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if mu_min > mu_max:
        raise ValueError(f"mu_min must be <= mu_max, got mu_min={mu_min} > mu_max={mu_max}")
    return mu_min, mu_max


def check_gradients(params_with_grad) -> None:
    """Reject gradients no update rule here is defined for, before any state changes."""
    for param in params_with_grad:
        grad = param.grad
        if grad.is_sparse or grad.layout != torch.strided:
            raise RuntimeError(
                "dampopt optimizers do not support sparse gradients; "
                f"got a {grad.layout} gradient for a parameter of shape {tuple(param.shape)}"
            )
        if torch.is_complex(param) or torch.is_complex(grad):
            raise TypeError(
                "dampopt optimizers do not support complex parameters or gradients; "
                f"got dtype {grad.dtype} for a parameter of shape {tuple(param.shape)}"
            )


def check_seed(value, name: str = "seed", allow_none: bool = False):
    """An int seed (None too where that means "not seeded")."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an int or None" if allow_none else "an int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_level(value, name: str = "alpha") -> float:
    """A significance level: a number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def check_finite(name: str, value) -> float:
    """A finite real number (or a 1-element tensor holding one)."""
    value = _as_float(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_int(name: str, value, minimum: int = 0, allow_none: bool = False, hint: str = ""):
    """An int (not a bool) ``>= minimum``; None too where that means "not set"."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}{hint}, got {value!r}")
    return value
