"""Surgical LoRA: low-rank adapters on the modules of the flagged groups only (paper, Sec. 8.3).

:func:`lora_targets` turns a localization into the module names peft's
``LoraConfig(target_modules=...)`` takes; :func:`treat` with ``adapter="lora"`` wraps a copy of
the model with those adapters and trains only them. peft and transformers are optional: they
are imported when an adapter is built, not when this module is.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from .._validation import check_int
from ._data import unwrap
from .groups import resolve_groups
from .localize import Localization

__all__ = ["lora_targets"]

INSTALL_HINT = 'pip install "dampopt[llm]" (that is: pip install peft transformers)'


def require_peft():
    """The ``peft`` module, or an ImportError naming the install command."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"LoRA adapters need peft and transformers: {INSTALL_HINT}") from error
    return peft


def default_module_types() -> tuple:
    """``nn.Linear``, and transformers' ``Conv1D`` (GPT-2's projections) when importable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def flagged_parameters(model: nn.Module, localization) -> tuple[list, set]:
    """``(group names, {id of every parameter in those groups})`` on ``model``.

    ``localization``: a :class:`Localization` (its ``problem_layers``, looked up in its own
    groups when they are ``model``'s parameters, else by name), group names, or
    ``{group: [parameters]}``.
    """
    if isinstance(localization, Localization):
        if not localization.problem_layers:
            raise ValueError("the localization flagged no group: there is nothing to adapt")
        stored = localization.groups or {}
        owned = {id(p) for p in model.parameters()}
        flagged = list(localization.problem_layers)
        if stored and all(id(p) in owned for g in flagged for p in stored.get(g, [None])):
            groups = {g: stored[g] for g in flagged}
        else:
            groups = resolve_groups(model, flagged, argument="localization.problem_layers")
    elif localization is None:
        raise ValueError("give a Localization, group names or {group: [parameters]}")
    else:
        groups = resolve_groups(model, localization, argument="localization")
    return list(groups), {id(p) for ps in groups.values() for p in ps}


def lora_targets(model: nn.Module, localization, module_types=None) -> list[str]:
    """Sorted names of the adaptable modules under the flagged groups, for peft's LoRA.

    Args:
        model: the model the adapters will go on (a DDP / compiled wrapper is seen through);
            names are full dotted paths relative to it, as ``model.named_modules()`` has them
            (``"transformer.h.2.attn.c_attn"``).
        localization: a :class:`Localization` (its ``problem_layers``), group names
            (``["transformer.h.2"]``) or ``{group: [parameters]}``.
        module_types: the module classes to adapt. Default: ``nn.Linear`` and, when
            transformers is importable, its ``Conv1D``: GPT-2 computes attention and MLP
            with ``Conv1D``, so ``nn.Linear`` alone finds nothing in GPT-2's blocks.

    A module is chosen when it is of one of ``module_types`` and every parameter it holds
    itself belongs to the flagged groups (a tied weight counts for the group it is listed in:
    GPT-2's ``lm_head`` shares ``transformer.wte.weight``, so it is chosen when
    ``transformer.wte`` is flagged).

    peft matches a list of names by suffix (``key == name or key.endswith("." + name)``), so a
    full name could also select a module whose path ends with it; a ValueError says so when
    that happens. :func:`lora_config` sidesteps it with an anchored regular expression.
    Raises ValueError when the flagged groups hold no module of ``module_types``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    types = default_module_types() if module_types is None else module_types
    types = (types,) if isinstance(types, type) else tuple(types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f"module_types must be nn.Module subclasses, got {module_types!r}")
    names, wanted = flagged_parameters(model, localization)
    modules = dict(model.named_modules())
    chosen = []
    for name, module in modules.items():
        own = list(module.parameters(recurse=False))
        if name and isinstance(module, types) and own and all(id(p) in wanted for p in own):
            chosen.append(name)
    if not chosen:
        raise ValueError(
            f"groups {names} hold no module of type {[t.__name__ for t in types]}: nothing "
            "to put an adapter on (pass module_types=)"
        )
    chosen_set = set(chosen)
    for name in chosen:
        clash = [k for k in modules if k.endswith("." + name) and k not in chosen_set]
        if clash:
            raise ValueError(
                f"module name {name!r} is a suffix of {clash[0]!r}: peft's list matching would "
                "adapt both; use lora_config(), which matches names exactly"
            )
    return sorted(chosen)


def exact_pattern(names) -> str:
    """A regex that peft's ``re.fullmatch`` matches against exactly ``names`` and nothing else."""
    return "(?:" + "|".join(re.escape(name) for name in sorted(names)) + ")"


def lora_config(model: nn.Module, targets, rank: int = 8, alpha: float = 16, dropout=0.0):
    """``peft.LoraConfig`` adapting exactly the modules ``targets`` of ``model``."""
    peft = require_peft()
    check_int("rank", rank, 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    modules = dict(unwrap(model).named_modules())
    missing = [t for t in targets if t not in modules]
    if missing or not targets:
        raise ValueError(f"targets must be module names of model, got unknown {missing}")
    kinds = {type(modules[t]).__name__ for t in targets}
    return peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=exact_pattern(targets),
        # Conv1D stores weights transposed; peft corrects a wrong setting per module (with a
        # warning), so this only picks the common case
        fan_in_fan_out=kinds == {"Conv1D"},
        bias="none",
    )


def wrap_with_lora(model: nn.Module, targets, rank: int, alpha: float, seed: int | None):
    """``model`` (modified in place: pass a copy) wrapped by peft with LoRA on ``targets``.

    The adapters' random initialisation (A: Kaiming-uniform, B: zeros, peft's default) is
    drawn under ``seed`` when given, without touching the caller's RNG state.
    """
    peft = require_peft()
    config = lora_config(model, targets, rank, alpha)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        if seed is not None:
            torch.manual_seed(seed)
        wrapped = peft.get_peft_model(model, config)
    adapted = sorted(
        name for name, module in wrapped.get_base_model().named_modules()
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A", {}))
    )  # fmt: skip
    if adapted != sorted(targets):
        raise RuntimeError(f"peft adapted {adapted}, expected exactly {sorted(targets)}")
    return wrapped
