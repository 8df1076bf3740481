r"""PhysicsSGD: SGD whose momentum follows the critical damping curve (the paper, Sec. 4 and 7).

Every step, per param group, the momentum is recomputed from the group's *current* lr

.. math:: \mu = \mathrm{clamp}\big(1 - 2\sqrt{\lambda\,\alpha},\ \mu_{min},\ \mu_{max}\big)

so any LR scheduler drives it. The update itself is torch.optim.SGD's, done by torch's own
functional ``sgd`` (single-tensor, foreach and fused paths), so with ``mu_min == mu_max``
fp32/fp64 parameters are bit-identical to ``torch.optim.SGD`` with that momentum and the same
``foreach``/``fused`` flags. (``fused=True`` also steps what torch's fused kernel raises on or
silently mis-updates: a parameter whose first gradient comes late is stepped, a gradient or
buffer with other strides than its parameter, or a parameter that is a strided view, is refused
before any update.)

Hybrid schedule (Sec. 7): once a trigger fires, every group switches to its constant
``switch_momentum`` for the rest of training. Triggers: ``switch_step`` (the optimizer step
count), ``observe(value)`` with ``value >= switch_metric`` (e.g. test accuracy 0.90,
"Hybrid-90"), or ``switch()``.

Param-group keys (every setting lives in the groups, so torch's own ``state_dict``, pickling
and deepcopy carry it):

* ``"momentum"``: the momentum *in effect* now - the physics momentum before the switch, the
  constant after - so loggers and :class:`dampopt.diagnostics.RegimeMonitor` read the truth.
  It is written at every step: schedulers that write ``"momentum"`` (OneCycleLR with
  ``cycle_momentum=True``) are overridden; use ``cycle_momentum=False``.
* ``"switch_momentum"``: the post-switch constant. The constructor's ``momentum=`` sets it
  (as torch.optim.SGD's ``momentum=``, so the drop-in call reads the same), and so does a
  ``"momentum"`` key in a group passed to the constructor or ``add_param_group`` - unless the
  group also has ``"switch_momentum"`` (another PhysicsSGD's groups), where ``"momentum"`` is
  the derived value and is recomputed.
* ``"switch_step"``, ``"switch_metric"``: the triggers, optimizer-wide (the same in every
  group); ``"switched_at"`` and ``"step"``: the switch state and the step count.

torch.compile: as for torch.optim.SGD, give a tensor lr (``lr=torch.tensor(0.01)``) when
``step()`` is compiled, so that an LR scheduler's changes are data and never recompile. Under
the trace the momentum is then a 0-d tensor too (and so is ``group["momentum"]``), and the
update is the traced twin of torch's, :func:`_traced_sgd`, fused by inductor (torch's ``sgd``
takes the momentum as a number only). That needs ``mu_min > 0`` (the default 0.5): with
``mu_min == 0`` the momentum can reach 0, where torch's update takes another branch, so it is
read as a float as before (a graph break, and a recompile per lr value). Outside
``torch.compile`` a tensor lr is read as a float and the update stays torch's own (bit for bit
as a float lr of the tensor's value: an fp32 tensor holds a scheduler's values rounded to fp32).

fp16/bf16 parameters keep their dtype; their momentum buffers and the update math are fp32
(torch.optim.SGD would keep them in the parameter's dtype).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.optim.sgd import sgd as _torch_sgd

try:  # torch's check behind its "fused=True requires ..." message
    from torch.optim.optimizer import _device_dtype_check_for_fused
except ImportError:  # pragma: no cover - older torch: the fused kernel raises itself

    def _device_dtype_check_for_fused(p, cuda_unsupported=False):
        return None

from . import _nonfinite
from ._distributed import is_dtensor
from ._state import (
    check_state_dict,
    check_state_shapes,
    load_state_dict_keeping_state_dtype,
    pre_hooks_applied,
)
from ._validation import (
    check_finite,
    check_gradients,
    check_int,
    check_learning_rate,
    check_momentum_bounds,
    check_non_negative,
    learning_rate,
    step_learning_rate,
    traced_tensor,
)
from .momentum import (
    classify_regime,
    critical_momentum,
    physics_momentum,
    physics_momentum_traced,
)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# param-group keys a PhysicsSGD state dict must have, and those older ones may lack
_GROUP_REQUIRED = ("lr", "mu_min", "mu_max", "curvature", "switch_momentum", "dampening",
                   "weight_decay")  # fmt: skip
_GROUP_DEFAULTS = {"nesterov": False, "maximize": False, "foreach": None, "fused": None,
                   "switched_at": None, "step": 0, "nonfinite": None}  # fmt: skip
# optimizer-wide settings kept in every group (older state dicts kept them in "hybrid")
_HYBRID = ("switch_step", "switch_metric")


def _check_switch_metric(value, name: str = "switch_metric"):
    return None if value is None else check_finite(name, value)


@dataclass(frozen=True)
class DampingState:
    """The damping of one param group at its current lr."""

    lr: float
    mu: float  # momentum the next step uses
    mu_c: float  # unclamped critical momentum 1 - 2 sqrt(curvature * lr)
    regime: str  # "underdamped" | "critical" | "overdamped" (tol 0.05)
    switched: bool  # True once the hybrid switch has fired

    def to_dict(self) -> dict:
        return asdict(self)


class PhysicsSGD(torch.optim.Optimizer):
    """Drop-in for ``torch.optim.SGD`` with critically damped, lr-driven momentum.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate (> 0), torch's meaning (default 1e-3, torch.optim.SGD's).
        momentum: the constant momentum used after the hybrid switch (paper: 0.9); stored as
            ``"switch_momentum"`` (``group["momentum"]`` is the momentum in effect now).
        mu_min, mu_max: clamp of the physics momentum, in [0, 1) (paper: 0.5, 0.99).
        curvature: the curvature lambda in ``mu_c = 1 - 2 sqrt(lambda * lr)`` (default 1).
        dampening, weight_decay, nesterov, maximize, foreach, fused: as torch.optim.SGD.
        switch_step: switch to ``momentum`` at this optimizer step count (None: never).
        switch_metric: switch once ``observe(value)`` sees ``value >= switch_metric``.
        nonfinite: None (torch's behaviour: a NaN/inf gradient is applied), "raise" (a
            ValueError naming the parameter, nothing changed) or "skip" (the step is skipped
            and counted in each group's ``"nonfinite_skips"``, present from the first skip).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        mu_min: float = 0.5,
        mu_max: float = 0.99,
        curvature: float = 1.0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        maximize: bool = False,
        switch_step: int | None = None,
        switch_metric: float | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite: str | None = None,
    ):
        lr = learning_rate(lr)  # a 1-element tensor stays one (see "torch.compile" above)
        momentum = check_non_negative("momentum", momentum)
        if momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        mu_min, mu_max = check_momentum_bounds(mu_min, mu_max)
        curvature = check_non_negative("curvature", curvature)
        dampening = check_non_negative("dampening", dampening)
        weight_decay = check_non_negative("weight_decay", weight_decay)
        if nesterov and dampening != 0:
            raise ValueError("nesterov momentum requires dampening=0")
        check_int("switch_step", switch_step, 0, allow_none=True)
        switch_metric = _check_switch_metric(switch_metric)
        if fused and foreach:
            raise RuntimeError("`foreach` and `fused` cannot both be True")
        defaults = dict(
            lr=lr,
            momentum=physics_momentum(lr, mu_min, mu_max, curvature),
            switch_momentum=momentum,
            mu_min=mu_min,
            mu_max=mu_max,
            curvature=curvature,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            switch_step=switch_step,
            switch_metric=switch_metric,
            switched_at=None,
            step=0,
            nonfinite=_nonfinite.check_mode(nonfinite),
        )
        super().__init__(params, defaults)
        if fused:
            # GradScaler hands scale and found_inf to the fused kernel instead of unscaling.
            self._step_supports_amp_scaling = True

    # -- hybrid switch -------------------------------------------------------------------------

    def __setstate__(self, state):
        # pickles from before the hybrid settings moved into the groups kept them here
        hybrid = {key: state.pop(key) for key in _HYBRID if key in state}
        super().__setstate__(state)
        for key in _HYBRID:
            if key in hybrid:
                self.defaults[key] = hybrid[key]
            self.defaults.setdefault(key, None)
        for group in self.param_groups:  # older or partial state dicts: torch SGD's defaults
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            for key in _HYBRID:
                group.setdefault(key, self.defaults[key])

    def add_param_group(self, param_group: dict) -> None:
        if "lr" in param_group:
            check_learning_rate(param_group["lr"])
        if "curvature" in param_group:
            check_non_negative("curvature", param_group["curvature"])
        if "mu_min" in param_group or "mu_max" in param_group:
            check_momentum_bounds(
                param_group.get("mu_min", self.defaults["mu_min"]),
                param_group.get("mu_max", self.defaults["mu_max"]),
            )
        for key in _HYBRID:
            if key in param_group and not self.param_groups:
                # the first group's own value is the optimizer's (PhysicsSGD(other.param_groups))
                value = param_group[key]
                if key == "switch_step":
                    check_int("switch_step", value, 0, allow_none=True)
                else:
                    _check_switch_metric(value)
                self.defaults[key] = value
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key} is optimizer-wide (every group switches together): give it to "
                    f"PhysicsSGD(...), not to one param group"
                )
        if "momentum" in param_group:
            param_group = dict(param_group)
            if "switch_momentum" in param_group:
                # a PhysicsSGD group (PhysicsSGD(other.param_groups)): its "momentum" is the
                # one in effect, derived from the rest, not a setting
                param_group.pop("momentum")
            else:
                # a group's own "momentum" is its post-switch constant, as in the constructor
                param_group["switch_momentum"] = param_group.pop("momentum")
        if param_group.get("fused") and param_group.get("foreach"):
            raise RuntimeError("`foreach` and `fused` cannot both be True")
        if "switch_momentum" in param_group:
            value = check_non_negative("momentum", param_group["switch_momentum"])
            if value >= 1:
                raise ValueError(f"momentum must be in [0, 1), got {value}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if len(self.param_groups) > 1:
            # A group added mid-training joins the optimizer's clock and switch state.
            group["step"] = self.param_groups[0]["step"]
            group["switched_at"] = self.param_groups[0]["switched_at"]
        group["momentum"] = self._momentum_for(group)

    @property
    def steps(self) -> int:
        """Number of optimizer steps taken."""
        return self.param_groups[0]["step"] if self.param_groups else 0

    @property
    def switch_step(self) -> int | None:
        """The step count at which the hybrid switch fires (None: never)."""
        return self.defaults["switch_step"]

    @switch_step.setter
    def switch_step(self, value) -> None:
        self._set_hybrid("switch_step", check_int("switch_step", value, 0, allow_none=True))

    @property
    def switch_metric(self) -> float | None:
        """The threshold ``observe`` switches at (None: observe never switches)."""
        return self.defaults["switch_metric"]

    @switch_metric.setter
    def switch_metric(self, value) -> None:
        self._set_hybrid("switch_metric", _check_switch_metric(value))

    def _set_hybrid(self, key: str, value) -> None:
        self.defaults[key] = value
        for group in self.param_groups:
            group[key] = value

    @property
    def switched_at(self) -> int | None:
        """Step count at which the hybrid switch fired, or None."""
        return self.param_groups[0]["switched_at"] if self.param_groups else None

    def switch(self) -> None:
        """Switch every group to its constant ``momentum`` from the next step on."""
        if self.switched_at is not None:
            return
        for group in self.param_groups:
            group["switched_at"] = group["step"]
            group["momentum"] = self._momentum_for(group)

    def observe(self, value: float) -> bool:
        """Feed a metric (e.g. test accuracy); switches once ``value >= switch_metric``.

        Returns True if the optimizer is switched after this call.
        """
        if self.switch_metric is not None and self.switched_at is None:
            # checked only where it decides something: a diverged run's NaN after the switch
            # (or without a switch_metric) stays a no-op, as before
            if check_finite("observe(value)", value) >= self.switch_metric:
                self.switch()
        return self.switched_at is not None

    def load_state_dict(self, state_dict) -> None:
        # everything is checked, after the user's pre-hooks, before anything is stored
        with pre_hooks_applied(self, state_dict) as state_dict:
            check_state_dict(
                self, state_dict, required=_GROUP_REQUIRED, defaults=_GROUP_DEFAULTS,
                param_state=("momentum_buffer",),
            )  # fmt: skip
            state_dict = self._with_hybrid_in_groups(state_dict)
            load_state_dict_keeping_state_dtype(self, state_dict, super().load_state_dict)
        for key in _HYBRID:  # optimizer-wide: new groups get the loaded values
            self.defaults[key] = self.param_groups[0][key]

    def _with_hybrid_in_groups(self, state_dict) -> dict:
        """A state dict whose groups hold the hybrid settings: older ones kept them in a
        top-level "hybrid" entry, and the oldest nowhere (then the current ones stay)."""
        hybrid = state_dict.get("hybrid")
        if hybrid is not None:
            if not isinstance(hybrid, dict) or set(hybrid) != set(_HYBRID):
                raise ValueError("state dict 'hybrid' must hold switch_step and switch_metric")
            check_int("hybrid switch_step", hybrid["switch_step"], 0, allow_none=True)
            _check_switch_metric(hybrid["switch_metric"], "hybrid switch_metric")
        groups = []
        for saved in state_dict["param_groups"]:
            saved = dict(saved)
            for key in _HYBRID:
                if key not in saved:
                    saved[key] = hybrid[key] if hybrid is not None else self.defaults[key]
            check_int("switch_step", saved["switch_step"], 0, allow_none=True)
            _check_switch_metric(saved["switch_metric"])
            groups.append(saved)
        if any(g[key] != groups[0][key] for g in groups for key in _HYBRID):
            raise ValueError("state dict param groups disagree on switch_step/switch_metric")
        state_dict = {k: v for k, v in state_dict.items() if k != "hybrid"}
        state_dict["param_groups"] = groups
        return state_dict

    # -- damping -------------------------------------------------------------------------------

    def _momentum_for(self, group: dict) -> float:
        if group["switched_at"] is not None:
            return group["switch_momentum"]
        if group["mu_max"] == 0:
            return 0.0  # clamped to [0, 0] whatever the lr: nothing to read
        if _traced_momentum(group):
            return physics_momentum_traced(group["lr"], group["mu_min"], group["mu_max"],
                                           group["curvature"])  # fmt: skip
        return physics_momentum(group["lr"], group["mu_min"], group["mu_max"], group["curvature"])

    def damping(self) -> list[DampingState]:
        """Per group: lr now, the momentum the next step uses, mu_c and the regime."""
        states = []
        for group in self.param_groups:
            lr = float(group["lr"])
            mu = self._momentum_for(group)
            states.append(
                DampingState(
                    lr=lr,
                    mu=mu,
                    mu_c=critical_momentum(lr, group["curvature"]),
                    regime=classify_regime(mu, lr, curvature=group["curvature"]),
                    switched=group["switched_at"] is not None,
                )
            )
        return states

    # -- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Validate everything before anything changes: no half-updated optimizer.
        check_state_shapes(self, ("momentum_buffer",))
        for group in self.param_groups:
            step_learning_rate(group["lr"])
            check_gradients(p for p in group["params"] if p.grad is not None)
            if group["fused"] and group["foreach"]:
                raise RuntimeError("`foreach` and `fused` cannot both be True")
            if group["fused"]:
                for p in group["params"]:
                    if p.grad is not None and not is_dtensor(p):
                        _device_dtype_check_for_fused(p)  # torch's own message, before any update
                        _check_fused_layout(self, p)
            if group["fused"] and any(is_dtensor(p) for p in group["params"]):
                raise RuntimeError(
                    "PhysicsSGD(fused=True) cannot step DTensor (FSDP2) parameters: torch's "
                    "fused SGD kernel has no DTensor rule; use the default (foreach) path"
                )

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None and any(map(_steps_traced, self.param_groups)):
            # before any group moves: the traced update takes no GradScaler scale (a group on
            # torch's update - switched, mu_max = 0 or mu_min = 0 - takes it as usual)
            raise RuntimeError("PhysicsSGD with a tensor lr under torch.compile does not take "
                               "GradScaler's fused scaling; use fused=False")  # fmt: skip
        if found_inf is not None and bool(found_inf):
            # GradScaler found inf/NaN gradients: skip the step entirely, as the unfused path
            # (where GradScaler never calls step) does, so the step count stays honest.
            return loss
        # (fused AMP hands over still-scaled grads: their overflows are GradScaler's, above)
        if grad_scale is None and _nonfinite.handle(self):  # nonfinite="skip", a NaN/inf grad
            return loss

        for group in self.param_groups:
            if group["switched_at"] is None and _switches_by(group):
                group["switched_at"] = group["switch_step"]
            group["momentum"] = mu = self._momentum_for(group)
            self._update_group(group, mu, grad_scale, found_inf)
            group["step"] += 1
        return loss

    def _update_group(self, group, mu, grad_scale, found_inf) -> None:
        kwargs = dict(
            foreach=group["foreach"],
            fused=group["fused"],
            grad_scale=grad_scale,
            found_inf=found_inf,
            weight_decay=group["weight_decay"],
            momentum=mu,
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        native, native_grads, native_bufs = [], [], []
        upcast, upcast_grads, upcast_bufs = [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if param.dtype in _LOW_PRECISION:
                upcast.append(param)
                upcast_grads.append(param.grad.float())
                upcast_bufs.append(state.get("momentum_buffer"))
            else:
                native.append(param)
                native_grads.append(param.grad)
                native_bufs.append(state.get("momentum_buffer"))

        # a tensor momentum (a tensor lr under torch.compile) goes to the traced twin of
        # torch's update, which takes it as data; torch's sgd takes momentum as a number
        update = _traced_sgd if isinstance(mu, torch.Tensor) else _torch_sgd
        if kwargs["fused"] and update is _torch_sgd:
            update = _fused_in_parts
        if native:
            native_bufs = update(native, native_grads, native_bufs, **kwargs) or native_bufs
            self._store_buffers(native, native_bufs, mu)
        if upcast:
            # fp32 working copies: the update is computed in fp32 and rounded once on write-back.
            masters = [p.float() for p in upcast]
            upcast_bufs = update(masters, upcast_grads, upcast_bufs, **kwargs) or upcast_bufs
            for param, master in zip(upcast, masters):
                param.copy_(master)
            self._store_buffers(upcast, upcast_bufs, mu)

    def _store_buffers(self, params, buffers, mu) -> None:
        if not isinstance(mu, torch.Tensor) and mu == 0:
            return  # torch's sgd keeps no buffer without momentum
        for param, buf in zip(params, buffers):
            self.state[param]["momentum_buffer"] = buf


def _traced_momentum(group: dict) -> bool:
    """Whether an unswitched group's momentum is a 0-d tensor, for the traced update: a tensor
    lr under torch.compile, ``mu_max > 0``, and ``mu_min > 0`` (mu then never reaches 0, where
    torch's SGD keeps no buffer and ignores dampening: the traced twin need not follow that
    branch)."""
    return traced_tensor(group["lr"]) and group["mu_max"] != 0 and group["mu_min"] > 0


def _switches_by(group: dict) -> bool:
    """Whether the hybrid schedule has switched the group by this step (or switches at it)."""
    if group["switched_at"] is not None:
        return True
    return group["switch_step"] is not None and group["step"] >= group["switch_step"]


def _steps_traced(group: dict) -> bool:
    """Whether this step updates some parameter of ``group`` by the traced update."""
    return (_traced_momentum(group) and not _switches_by(group)
            and any(p.grad is not None for p in group["params"]))  # fmt: skip


def _check_fused_layout(optimizer, param) -> None:
    """torch's fused SGD kernel pairs elements by memory position over ``numel`` elements from
    each tensor's start: a gradient (or momentum buffer) with other strides than its parameter,
    or a parameter that is a strided view (not dense), would get a wrong update, silently
    (measured: a channels_last weight with a contiguous gradient; a ``base[:, ::2]`` view,
    written outside itself). Refused before any update."""
    if param.numel() == 0:
        return  # nothing to pair
    if not _dense(param):
        raise ValueError(
            f"PhysicsSGD(fused=True): a parameter of shape {tuple(param.shape)} with strides "
            f"{param.stride()} is not dense in memory (a strided view); torch's fused SGD kernel "
            "would write outside it. Nothing was updated; use the default path (fused=None)"
        )
    buffer = optimizer.state.get(param, {}).get("momentum_buffer")
    for name, tensor in (("gradient", param.grad), ("momentum buffer", buffer)):
        if tensor is not None and not _same_layout(tensor, param):
            raise ValueError(
                f"PhysicsSGD(fused=True): a parameter of shape {tuple(param.shape)} has strides "
                f"{param.stride()} but its {name} {tensor.stride()}; torch's fused SGD kernel "
                "would pair the wrong elements. Nothing was updated; use the default path "
                "(fused=None) or give the tensor its parameter's memory format"
            )


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides wherever a dimension has more than one element (others do not matter)."""
    return all(x == y for n, x, y in zip(b.shape, a.stride(), b.stride()) if n > 1)


def _dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` covers one gap-free, non-overlapping block of memory, in any order of
    its dimensions (contiguous, channels_last, a transpose...); size-1 dimensions do not count."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _fused_in_parts(params, grads, buffers, **kwargs):
    """torch's fused sgd, once for the parameters with a momentum buffer and once for those
    without: it takes "is this the first step" for the whole list, and fails on a mix (a
    parameter whose first gradient arrives after the others have buffers). Elementwise, so
    the split changes no value."""
    have = [b is not None for b in buffers]
    if all(have) or not any(have):
        _torch_sgd(params, grads, buffers, **kwargs)
        return buffers
    out = list(buffers)
    for part in (True, False):
        index = [i for i, h in enumerate(have) if h == part]
        bufs = [buffers[i] for i in index]
        _torch_sgd([params[i] for i in index], [grads[i] for i in index], bufs, **kwargs)
        for i, buf in zip(index, bufs):
            out[i] = buf
    return out


def _traced_sgd(params, grads, buffers, *, lr, momentum, dampening, weight_decay, nesterov,
                maximize, foreach=None, fused=None, grad_scale=None, found_inf=None):  # fmt: skip
    """torch.optim.SGD's update, tensor by tensor, with ``lr`` and ``momentum`` as 0-d tensors:
    the step PhysicsSGD takes under ``torch.compile`` with a tensor lr, which inductor fuses.
    (torch's ``sgd`` takes the momentum as a number: as a tensor it would break the graph, as a
    float it would recompile at every new lr.) ``foreach``/``fused`` are the compiler's
    business here; ``mu_min > 0``, so the momentum is never 0 (torch's no-buffer branch).
    Returns the momentum buffers, new ones (the gradient, as torch starts them) where there
    were none."""
    out = []  # (grad_scale / found_inf: refused in step() before any update)
    for param, grad, buf in zip(params, grads, buffers):
        if maximize:
            grad = -grad
        if weight_decay != 0:
            grad = grad + weight_decay * param
        if buf is None:
            buf = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad + momentum * buf if nesterov else buf
        param.sub_(lr * grad)
        out.append(buf)
    return out
