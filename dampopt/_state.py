"""Optimizer state: its dtype (fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 ones), and the
checks a state dict passes before anything of it is stored."""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Optimizer state and math are fp32 for fp16/bf16/fp32 parameters, fp64 for fp64 ones."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def load_state_dict_keeping_state_dtype(optimizer, state_dict, load) -> None:
    """Run torch's ``load`` and then undo its cast of floating state to the param's dtype.

    ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's
    floating dtype, which would turn the fp32 state of a bf16 parameter into bf16 on every
    resume (and an integer counter into a float). The saved values are put back in
    :func:`state_dtype`, integer ones in their own dtype, instead.
    """
    saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
    saved_state = state_dict["state"]
    load(state_dict)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, param in zip(saved_ids, params):
        saved, state = saved_state.get(pid), optimizer.state.get(param)
        if not saved or not state:
            continue
        target = state_dtype(param)
        for key, value in saved.items():
            current = state.get(key)
            # floating state back to fp32 (or fp64); integer state (iKFAD's step counter),
            # which torch casts to the parameter's floating dtype too, back to its own dtype
            if (
                torch.is_tensor(value)
                and torch.is_tensor(current)
                and current.dtype != value.dtype
                and (value.dtype == target or not value.is_floating_point())
            ):
                state[key] = value.to(device=current.device)
                if state[key] is value:  # never alias the caller's state_dict
                    state[key] = value.clone()


def check_state_dict(optimizer, state_dict, *, required: tuple, defaults: dict,
                     param_state: tuple, extra_state: tuple = ()) -> None:  # fmt: skip
    """Raise ValueError, before anything is stored, for a state dict ``optimizer`` cannot use.

    Checked: the two top-level entries; the number of groups and of parameters per group; the
    group keys the optimizer needs (``required``; keys in ``defaults`` may be missing, as in an
    older state dict, and get those defaults on load); per parameter, only known state entries
    (``param_state``, shaped like the parameter, and ``extra_state``), and every
    ``param_state`` tensor's shape against its parameter. A torch.optim.SGD/Adam state dict, or
    one of another dampopt optimizer, fails here with the missing keys named, instead of a bare
    KeyError at the next step; one with other shapes fails instead of corrupting memory.
    """
    kind = type(optimizer).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"a {kind} state dict is a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"state dict has {len(saved_groups)} param groups, the {kind} has "
            f"{len(optimizer.param_groups)}"
        )
    params = {}
    for i, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(
                f"param group {i} of the state dict has {len(saved.get('params', ()))} "
                f"parameters, the {kind}'s has {len(group['params'])}"
            )
        missing = [key for key in required if key not in saved and key not in defaults]
        if missing:
            raise ValueError(
                f"param group {i} of the state dict lacks {missing}: it is not a {kind} state "
                "dict (one from another optimizer?)"
            )
        params.update(zip(saved["params"], group["params"]))
    for pid, state in state_dict["state"].items():
        if pid not in params:
            raise ValueError(f"state dict holds state for parameter {pid!r}, which no group lists")
        unknown = sorted(set(state) - set(param_state) - set(extra_state))
        if unknown:
            raise ValueError(
                f"state of parameter {pid!r} has entries {unknown} a {kind} does not keep "
                f"(it keeps {list(param_state) + list(extra_state)})"
            )
        param = params[pid]
        for name in param_state:
            if name not in state:
                continue
            value = state[name]
            if not torch.is_tensor(value) or tuple(value.shape) != tuple(param.shape):
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(
                    f"state {name!r} of parameter {pid!r} has shape {shape}, its parameter "
                    f"{tuple(param.shape)}"
                )


def check_state_shapes(optimizer, names: tuple) -> None:
    """Before a step: every state tensor in ``names`` still has its parameter's shape."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            for name in names:
                value = state.get(name)
                if torch.is_tensor(value) and value.shape != param.shape:
                    raise ValueError(
                        f"{type(optimizer).__name__} state {name!r} has shape "
                        f"{tuple(value.shape)} but its parameter {tuple(param.shape)} (was the "
                        "state changed by hand?); nothing was updated"
                    )


@contextlib.contextmanager
def pre_hooks_applied(optimizer, state_dict):
    """Yield ``state_dict`` as the user's load_state_dict pre-hooks leave it, hooks then paused.

    The checks must see what the hooks make of a state dict (a hook may convert an older or
    foreign one), and torch's load must not run the hooks a second time.
    """
    hooks = optimizer._optimizer_load_state_dict_pre_hooks
    for hook in list(hooks.values()):
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()
    try:
        yield state_dict
    finally:
        optimizer._optimizer_load_state_dict_pre_hooks = hooks
