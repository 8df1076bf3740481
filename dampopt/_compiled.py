"""The "compiled" backend: each friction rule fused into about one pass by ``torch.compile``.

For CPU users, where the Triton kernels do not run. Inductor turns each step function below
into one C++ loop that reads param, grad and state once and writes them once (iKFAD's friction
sums take one more read of xi, outside the compiled step). Tensors under ``SMALL_TENSOR``
elements take the rule's foreach version instead: for them a compiled call's host time costs
more than the pass it saves.

Why the rules are restated here instead of compiling ``update``/``update_foreach`` directly:
those take ``lr`` and the hyperparameters as Python floats and call ``math.sqrt(lr)``, and
torch.compile guards on such floats, so a scheduler that changes lr every step recompiled
every step (measured: a guard ``lr == 0.01`` on ``h = math.sqrt(lr)``, 1-10 s per step). Here
every per-step scalar is computed on the host exactly as the reference computes it and passed
in one tensor, so changing lr never recompiles. Each function below mirrors its reference
(:func:`dampopt.ikfad.ikfad_update`, :func:`dampopt.cubic_damped_sgd.cubic_damped_update`,
:func:`dampopt.cadam.cadam_update`) line by line and is tested against it.

Compile cost: paid on the first step of each (param group, device, dtype) bucket, and again
only if that bucket's tensor shapes, dtypes or ``weight_decay != 0`` change (see
``benchmarks/README.md`` for the measured seconds). Compiled code is cached on disk by inductor
(``/tmp/torchinductor_<user>``), so a second process pays less. torch.compile keeps at most
``torch._dynamo.config.recompile_limit`` variants per rule (8 by default); beyond that it runs
the rule uncompiled, still correct.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.graph import increment_version

from ._friction import relaxation_weight


def _ikfad_scalars(lr, gamma, alpha, mu, weight_decay=0.0):
    h = math.sqrt(lr)
    return [
        h,
        weight_decay,
        -h / 2,
        math.exp(-alpha * h),
        relaxation_weight(alpha, h) / mu,
        math.exp(-gamma * h),
    ]


def _ikfad_step(param, grad, momentum, friction, scalars, has_weight_decay: bool):
    h, weight_decay, neg_half_h, friction_decay, friction_gain, momentum_decay = scalars.unbind(0)
    q = param.to(momentum.dtype)
    g = grad.to(momentum.dtype)
    if has_weight_decay:
        g = g + weight_decay * q
    p = momentum - h * g  # B: p = p - h g
    q = q + h * p  # A: q = q + h p
    p = p * torch.exp(friction * neg_half_h)  # C: half kick of friction
    xi = friction * friction_decay + friction_gain * (p * p)
    p = p * torch.exp(xi * neg_half_h)  #    second half kick with the new xi
    p = p * momentum_decay  # D: linear friction
    param.copy_(q)
    momentum.copy_(p)
    friction.copy_(xi)


def _cubic_damped_scalars(lr, gamma, c, weight_decay=0.0):
    h = math.sqrt(lr)
    return [h, weight_decay, 2 * c * h, math.exp(-gamma * h)]


def _cubic_damped_step(param, grad, momentum, scalars, has_weight_decay: bool):
    h, weight_decay, two_c_h, momentum_decay = scalars.unbind(0)
    q = param.to(momentum.dtype)
    g = grad.to(momentum.dtype)
    if has_weight_decay:
        g = g + weight_decay * q
    p = momentum - h * g  # B: p = p - h g
    q = q + h * p  # A: q = q + h p
    p = p / torch.sqrt(1 + two_c_h * p * p)  # C: cubic damping, exact flow
    p = p * momentum_decay  # D: linear friction
    param.copy_(q)
    momentum.copy_(p)


def _cadam_scalars(lr, gamma, c, alpha, eps, weight_decay=0.0):
    h = math.sqrt(lr)
    return [
        h,
        weight_decay,
        math.exp(-alpha * h),
        relaxation_weight(alpha, h),
        eps,
        2 * c * h,
        math.exp(-gamma * h),
    ]


def _cadam_step(param, grad, momentum, second_moment, scalars, has_weight_decay: bool):
    h, weight_decay, moment_decay, moment_gain, eps, two_c_h, momentum_decay = scalars.unbind(0)
    q = param.to(momentum.dtype)
    g = grad.to(momentum.dtype)
    if has_weight_decay:
        g = g + weight_decay * q
    p = momentum - h * g  # B: p = p - h g
    zeta = second_moment * moment_decay + moment_gain * (g * g)  # C: second moment
    q = q + h * (p / (torch.sqrt(zeta) + eps))  # A: q = q + h p / (sqrt(zeta) + eps)
    p = p / torch.sqrt(1 + two_c_h * p * p)  # D: cubic damping, exact flow
    p = p * momentum_decay  # E: linear friction
    param.copy_(q)
    momentum.copy_(p)
    second_moment.copy_(zeta)


#: kernel name -> (host scalars, step function); the step functions are compiled on first use
_RULES = {
    "ikfad": (_ikfad_scalars, _ikfad_step),
    "cubic_damped": (_cubic_damped_scalars, _cubic_damped_step),
    "cadam": (_cadam_scalars, _cadam_step),
}
_COMPILED: dict = {}


def compiled_step(kernel_name: str):
    """The torch.compile'd per-tensor step of a rule (compiled lazily, once per process).

    Contiguous tensors are passed flattened with a symbolic length, so one or two compiled
    graphs serve every tensor of every model: the compile cost does not grow with the number
    of tensors (one graph over ResNet-18's list of 62 tensors took 60-110 s to compile here).
    """
    if kernel_name not in _COMPILED:
        _COMPILED[kernel_name] = torch.compile(_RULES[kernel_name][1], fullgraph=True,
                                               dynamic=True)
    return _COMPILED[kernel_name]


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor over the same memory that is not a view of ``tensor``.

    Not ``tensor.view(-1)``: torch.compile guards on a view's base (a recompile per shape),
    and marking the length unbacked to avoid that made inductor split the step into four loops
    (measured 6x slower). A plain alias with a dynamic length compiles to one fused loop and
    one graph for all sizes (inductor still specializes sizes 0, 1 and small reductions).
    """
    flat = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return flat.set_(tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,))


def _arguments(params, grads, states, i):
    tensors = [params[i], grads[i], *[state[i] for state in states]]
    if all(t.is_contiguous() for t in tensors):
        return [_flat(t) for t in tensors]
    # Other layouts (a channels-last conv weight whose grad is contiguous, say) go in as they
    # are: elementwise on the logical shape is right for any mix of strides; one more compile.
    return tensors


def _mark_changed(params, states) -> None:
    # The aliases hide the in-place update from autograd's version counters; bump them as an
    # in-place op would, so a stale saved tensor still raises in backward.
    for tensor in [*params, *(t for state in states for t in state)]:
        increment_version(tensor)


#: tensors with fewer elements go through the rule's foreach version in one batch: a compiled
#: call costs 0.15-0.45 ms of host time here (guards, aliases), more than such a tensor's step
SMALL_TENSOR = 1 << 15


def compiled_update(optimizer, params, grads, states, kwargs):
    """One step of ``optimizer``'s rule over one (device, dtype) bucket, in place.

    Same contract as ``dampopt.kernels.launch``: returns iKFAD's per-tensor friction sums
    (0-d tensors in the state dtype), else None. Tensors under :data:`SMALL_TENSOR` elements
    take ``optimizer.update_foreach`` together; the rest one compiled call each.
    """
    name = optimizer.kernel_name
    if name not in _RULES:
        raise ValueError(f"no compiled rule for kernel_name {name!r}; one of {sorted(_RULES)}")
    results = [None] * len(params)
    small = [i for i, p in enumerate(params) if p.numel() < SMALL_TENSOR]
    if small:
        sums = optimizer.update_foreach(
            [params[i] for i in small], [grads[i] for i in small],
            *[[state[i] for i in small] for state in states], **kwargs
        )
        for i, total in zip(small, sums or [None] * len(small)):
            results[i] = total
    large = [i for i, p in enumerate(params) if p.numel() >= SMALL_TENSOR]
    if large:
        for i, total in zip(large, _compiled_steps(name, params, grads, states, kwargs, large)):
            results[i] = total
    return results if name == "ikfad" else None


def _compiled_steps(name, params, grads, states, kwargs, indices):
    scalars_of, _ = _RULES[name]
    # The scalars travel as one tensor in the state dtype (what the reference's Python floats
    # become inside its fp32 ops), so their values are data, not guards. Static length, or
    # torch.compile may tie it to a parameter of the same length and specialize both.
    scalars = torch.tensor(scalars_of(**kwargs), dtype=states[0][0].dtype, device=params[0].device)
    torch._dynamo.mark_static(scalars)
    has_weight_decay = bool(kwargs.get("weight_decay", 0.0))
    step = compiled_step(name)
    for i in indices:
        step(*_arguments(params, grads, states, i), scalars, has_weight_decay)
    _mark_changed([params[i] for i in indices], [[state[i] for i in indices] for state in states])
    if name != "ikfad":
        return [None] * len(indices)
    # The friction sums, as the foreach rule takes them (xi >= 0, so its L1 norm is its sum):
    # one extra read of xi. Inductor's own sum inside the step doubled the step's time here.
    return list(torch._foreach_norm([states[1][i] for i in indices], 1))
