"""Fused Triton kernels for dampopt's friction optimizers (installed as ``dampopt.kernels``).

One kernel per rule does the whole step in one pass over memory (read param, grad and state
once, write param and state once; fp32 math for fp32/bf16/fp16 params), and one launch covers
every tensor of a (param group, device, dtype) bucket. A kernel is named like its rule
(:class:`dampopt._rule.Rule`), takes the rule's per-step scalars by name and knows nothing of
optimizers; a kernel with a ``sums`` argument accumulates each tensor's sum of the rule's
summed state. The kernels are tested against the rules' torch steps.
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

from . import _multi_tensor
from ._multi_tensor import PARAM_DTYPES
from .cadam import cadam_kernel
from .cubic_damped import cubic_damped_kernel
from .ikfad import ikfad_kernel

__all__ = ["KERNELS", "check_arrays", "check_device_and_dtype", "interpreting", "launch"]

# triton.jit decides at decoration time whether a kernel is interpreted or compiled.
_INTERPRETED = isinstance(ikfad_kernel, InterpretedFunction)

#: rule name -> its jitted kernel
KERNELS = {
    "ikfad": ikfad_kernel,
    "cubic_damped": cubic_damped_kernel,
    "cadam": cadam_kernel,
}


def interpreting() -> bool:
    """Whether these kernels were built for Triton's interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETED


def check_device_and_dtype(device: torch.device, dtype: torch.dtype | None) -> None:
    """Raise unless the kernels can run on ``device`` with ``dtype`` parameters."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device.type}); on CPU use "
            "backend='torch', 'compiled' or 'auto', or set TRITON_INTERPRET=1 before "
            "importing triton to run the kernels in Triton's (slow) interpreter"
        )
    if dtype is not None and dtype not in PARAM_DTYPES:
        raise TypeError(
            f"the Triton kernels take fp32, bf16 or fp16 parameters, got "
            f"{str(dtype).removeprefix('torch.')}; use "
            "backend='torch' (or 'auto', which does not pick triton for fp64) for these"
        )


def check_arrays(params, grads, states) -> None:
    """Everything a launch needs of its lists: device, dtype, lengths and layouts."""
    if not params:
        return
    check_device_and_dtype(params[0].device, params[0].dtype)
    _multi_tensor.check_lists(params, grads, states)


def launch(name: str, params, grads, states, scalars: dict, flags: dict, checked: bool = False):
    """Apply one step of rule ``name`` in place with one kernel launch.

    ``states`` holds one list per state name, in the rule's ``state_names`` order; ``scalars``
    are the rule's per-step scalars (``rule.scalars(...)``), ``flags`` its ``tl.constexpr``
    switches (``HAS_WEIGHT_DECAY``). ``checked=True`` skips :func:`check_arrays` (the
    dispatcher ran it before any bucket moved). Returns the per-tensor sums (0-d fp32 tensors)
    when the kernel computes them, else None.
    """
    if name not in KERNELS:
        raise ValueError(f"kernel name must be one of {sorted(KERNELS)}, got {name!r}")
    kernel = KERNELS[name]
    summed = "sums" in kernel.arg_names
    if not params:
        return [] if summed else None
    if not checked:
        check_arrays(params, grads, states)
    sums = None
    if summed:
        sums = torch.zeros(len(params), dtype=torch.float32, device=params[0].device)
    _multi_tensor.launch(kernel, params, grads, states, scalars, flags, sums=sums)
    return None if sums is None else list(sums.unbind(0))
