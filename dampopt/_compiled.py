"""The "compiled" backend: each friction rule fused into about one pass by ``torch.compile``.

For CPU users, where the Triton kernels do not run. Inductor turns each step function below
into one C++ loop that reads param, grad and state once and writes them once.

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
    return xi.sum()


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

    Contiguous tensors are passed flattened with a symbolic length, so one compiled graph
    serves every tensor of every model: the compile cost does not grow with the number of
    tensors (one graph over ResNet-18's list of 62 tensors took 60-110 s to compile here).
    """
    if kernel_name not in _COMPILED:
        _COMPILED[kernel_name] = torch.compile(_RULES[kernel_name][1], fullgraph=True,
                                               dynamic=True)
    return _COMPILED[kernel_name]


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view whose length torch.compile treats as unknown: one graph for every size.

    ``mark_unbacked`` (rather than ``dynamic=True`` alone) because the latter still
    specializes sizes 0, 1 and inductor's small-reduction sizes, and guards on the view's base.
    """
    flat = tensor.detach().view(-1)
    torch._dynamo.decorators.mark_unbacked(flat, 0)
    return flat


def _arguments(params, grads, states, i):
    tensors = [params[i], grads[i], *[state[i] for state in states]]
    if all(t.is_contiguous() for t in tensors):
        return [_flat(t) for t in tensors]
    # Other layouts (a channels-last conv weight whose grad is contiguous, say) go in as they
    # are: elementwise on the logical shape is right for any mix of strides; one more compile.
    return tensors


def compiled_update(optimizer, params, grads, states, kwargs):
    """One step of ``optimizer``'s rule over one (device, dtype) bucket, in place.

    Same contract as ``dampopt.kernels.launch``: returns iKFAD's per-tensor friction sums
    (0-d tensors in the state dtype), else None.
    """
    name = optimizer.kernel_name
    if name not in _RULES:
        raise ValueError(f"no compiled rule for kernel_name {name!r}; one of {sorted(_RULES)}")
    if not params:
        return [] if name == "ikfad" else None
    scalars_of, _ = _RULES[name]
    # The scalars travel as one tensor in the state dtype (what the reference's Python floats
    # become inside its fp32 ops), so their values are data, not guards.
    scalars = torch.tensor(scalars_of(**kwargs), dtype=states[0][0].dtype, device=params[0].device)
    has_weight_decay = bool(kwargs.get("weight_decay", 0.0))
    step = compiled_step(name)
    results = [
        step(*_arguments(params, grads, states, i), scalars, has_weight_decay)
        for i in range(len(params))
    ]
    return results if name == "ikfad" else None
