"""The "compiled" backend: a rule's single-tensor step fused into one pass by ``torch.compile``.

For CPU users, where the Triton kernels do not run. Inductor turns a rule's ``step`` (the same
function ``backend="loop"`` runs eagerly) into one C++ loop that reads param, grad and state
once and writes them once (iKFAD's friction sums take one more read of xi, after the step).
Tensors under ``SMALL_TENSOR`` elements take the rule's foreach step instead: for them a
compiled call's host time costs more than the pass it saves.

The per-step scalars (``rule.scalars``, computed on the host exactly as for every backend) go
in as one tensor and are unpacked by name inside the compiled graph: torch.compile guards on
Python floats, so passing ``h = sqrt(lr)`` as a float recompiled at every scheduler step
(measured: 1-10 s per step); as data, changing lr never recompiles.

Compile cost: paid on the first compiled step of each (param group, device, dtype) bucket
(under ``backend="auto"`` only once :func:`worth_compiling` says so), and again only if that
bucket's tensor shapes, dtypes or ``weight_decay != 0`` change (see
``benchmarks/README.md`` for the measured seconds). Compiled code is cached on disk by inductor
(``/tmp/torchinductor_<user>``), so a second process pays less. torch.compile keeps at most
``torch._dynamo.config.recompile_limit`` variants per rule (8 by default); beyond that it runs
the rule uncompiled, still correct.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import increment_version

_COMPILED: dict = {}


def _packed_step(rule, names: tuple):
    """``rule.step`` taking its scalars packed in one tensor, in the order of ``names``."""

    def step(param, grad, *rest):
        *states, packed, has_weight_decay = rest
        rule.step(param, grad, *states, dict(zip(names, packed.unbind(0))), has_weight_decay)

    return step


def compiled_step(rule, names: tuple):
    """The torch.compile'd per-tensor step of ``rule`` with its scalars packed in the order of
    ``names`` (the keys of ``rule.scalars``), compiled lazily, once per process.

    Contiguous tensors are passed flattened with a symbolic length, so one or two compiled
    graphs serve every tensor of every model: the compile cost does not grow with the number
    of tensors (one graph over ResNet-18's list of 62 tensors took 60-110 s to compile here).
    """
    key = (rule.name, names)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_packed_step(rule, names), fullgraph=True, dynamic=True)
    return _COMPILED[key]


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


# -- when "auto" compiles -----------------------------------------------------------------------

#: Seconds the first compile in a process costs here (an empty inductor cache: 11.7 s measured
#: on a quiet machine, most of it torch.compile's start-up; later rules about 1 s, a warm cache
#: 2-4 s), and per rule the least time a compiled step saved over the foreach step per element
#: of the large tensors, at 1 and 2 threads, on ResNet-18 shapes (benchmarks/README.md, "When
#: auto compiles"). "auto" runs the foreach step until the time it lost that way would have paid
#: for a compile, then compiles (the ski-rental rule: never more than about twice the better
#: choice in hindsight). ResNet-18: iKFAD after ~380 steps, CADAM ~470, CD ~940; a short run
#: never compiles.
COMPILE_SECONDS = 12.0
SAVING_SECONDS_PER_ELEMENT = {"ikfad": 2.7e-9, "cadam": 2.2e-9, "cubic_damped": 1.1e-9}


def worth_compiling(steps_taken: int, params, rule: str | None = None) -> bool:
    """Whether ``backend="auto"`` should run this bucket of ``rule`` (its name) compiled, after
    its param group has taken ``steps_taken`` steps: once the time the foreach steps lost would
    have paid for a compile (a rule without a measured saving takes the least one). A function
    of the group's own step count, so a resumed run switches at the same step as an
    uninterrupted one (bit-identical resumes) whatever else the process ran."""
    saving = SAVING_SECONDS_PER_ELEMENT.get(rule, min(SAVING_SECONDS_PER_ELEMENT.values()))
    large = sum(p.numel() for p in params if p.numel() >= SMALL_TENSOR)
    return bool(large) and steps_taken * large * saving >= COMPILE_SECONDS


#: tensors with fewer elements go through the rule's foreach version in one batch: a compiled
#: call costs 0.15-0.45 ms of host time here (guards, aliases), more than such a tensor's step
SMALL_TENSOR = 1 << 15


def compiled_update(rule, params, grads, states, scalars: dict, has_weight_decay: bool) -> None:
    """One step of ``rule`` over one (device, dtype) bucket, in place.

    Tensors under :data:`SMALL_TENSOR` elements take ``rule.step_foreach`` together; the rest
    one compiled call each.
    """
    small = [i for i, p in enumerate(params) if p.numel() < SMALL_TENSOR]
    if small:
        rule.step_foreach(
            [params[i] for i in small],
            [grads[i] for i in small],
            *[[state[i] for i in small] for state in states],
            scalars,
            has_weight_decay,
        )
    large = [i for i, p in enumerate(params) if p.numel() >= SMALL_TENSOR]
    if large:
        _compiled_steps(rule, params, grads, states, scalars, has_weight_decay, large)


def _compiled_steps(rule, params, grads, states, scalars, has_weight_decay, indices) -> None:
    # The scalars travel as one tensor in the state dtype (what the loop's Python floats
    # become inside its fp32 ops), so their values are data, not guards. Static length, or
    # torch.compile may tie it to a parameter of the same length and specialize both.
    packed = torch.tensor(list(scalars.values()), dtype=states[0][0].dtype,
                          device=params[0].device)  # fmt: skip
    torch._dynamo.mark_static(packed)
    step = compiled_step(rule, tuple(scalars))
    for i in indices:
        step(*_arguments(params, grads, states, i), packed, has_weight_decay)
    _mark_changed([params[i] for i in indices], [[state[i] for i in indices] for state in states])
