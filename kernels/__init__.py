"""Fused Triton kernels for dampopt's friction optimizers (installed as ``dampopt.kernels``).

One kernel per optimizer does the whole step in one pass over memory (read param, grad and
state once, write param and state once; fp32 math for fp32/bf16/fp16 params), and one launch
covers every tensor of a (param group, device, dtype) bucket. ``dampopt._friction.run_backend``
calls :func:`launch`; the kernels are tested against the torch reference functions.
"""

from __future__ import annotations

from triton.runtime.interpreter import InterpretedFunction

from ._multi_tensor import check_arrays
from .cadam import cadam_launch
from .cubic_damped import cubic_damped_launch
from .ikfad import ikfad_kernel, ikfad_launch

__all__ = ["LAUNCHERS", "check_arrays", "interpreting", "launch"]

# triton.jit decides at decoration time whether a kernel is interpreted or compiled.
_INTERPRETED = isinstance(ikfad_kernel, InterpretedFunction)

#: kernel name (an optimizer's ``kernel_name``) -> launcher taking the optimizer's kwargs
LAUNCHERS = {
    "ikfad": ikfad_launch,
    "cubic_damped": cubic_damped_launch,
    "cadam": cadam_launch,
}


def interpreting() -> bool:
    """Whether these kernels were built for Triton's interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETED


def launch(kernel_name: str, params, grads, states, kwargs: dict):
    """Apply one optimizer step in place with one kernel launch.

    ``states`` holds one list per state name, in the optimizer's ``state_names`` order;
    ``kwargs`` is lr, weight_decay and the rule's hyperparameters. Returns the per-tensor
    friction sums (0-d fp32 tensors) for ``"ikfad"``, else None.
    """
    if kernel_name not in LAUNCHERS:
        raise ValueError(f"kernel_name must be one of {sorted(LAUNCHERS)}, got {kernel_name!r}")
    if not params:
        return [] if kernel_name == "ikfad" else None
    device = params[0].device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device.type}); CPU tensors work only "
            "in Triton's interpreter, with TRITON_INTERPRET=1 set before triton is imported"
        )
    return LAUNCHERS[kernel_name](params, grads, states, **kwargs)
