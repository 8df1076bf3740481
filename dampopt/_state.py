"""Optimizer state dtype: fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 ones."""

from __future__ import annotations

import torch


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Optimizer state and math are fp32 for fp16/bf16/fp32 parameters, fp64 for fp64 ones."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def load_state_dict_keeping_state_dtype(optimizer, state_dict, load) -> None:
    """Run torch's ``load`` and then undo its cast of floating state to the param's dtype.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its
    parameter's dtype, which would turn the fp32 state of a bf16 parameter into bf16 on every
    resume. The saved values are put back in :func:`state_dtype` instead.
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
            if (
                torch.is_tensor(value)
                and value.is_floating_point()
                and torch.is_tensor(current)
                and current.dtype != value.dtype
                and value.dtype == target
            ):
                state[key] = value.to(device=current.device)
                if state[key] is value:  # never alias the caller's state_dict
                    state[key] = value.clone()
