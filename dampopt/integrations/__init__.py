"""Glue for training frameworks; none of them is a dependency of dampopt.

``dampopt.integrations.huggingface.DampoptCallback`` (an HF ``TrainerCallback``) and
``dampopt.integrations.lightning.DampoptCallback`` (a Lightning ``Callback``) import their
framework when imported themselves; this package imports neither.
"""

from __future__ import annotations

import torch

__all__ = ["unwrap_optimizer"]


def _wrapped(optimizer):
    """The optimizer inside a framework's wrapper, or None when ``optimizer`` is not one."""
    module = type(optimizer).__module__.split(".")[0]
    if module == "accelerate":  # accelerate's AcceleratedOptimizer (what HF Trainer holds)
        return getattr(optimizer, "optimizer", None)
    if module in ("lightning", "pytorch_lightning"):  # LightningOptimizer
        return getattr(optimizer, "_optimizer", None)
    return None


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` and Lightning's
    ``LightningOptimizer`` (nested wrappers too); any other optimizer comes back as it is.

    Those wrappers forward ``step`` and ``param_groups`` but not an optimizer's own methods:
    :class:`dampopt.PhysicsSGD`'s ``observe``, ``damping`` and ``switched_at`` live on the
    unwrapped object. Raises TypeError for something that is not a torch optimizer.
    """
    seen = 0
    while (inner := _wrapped(optimizer)) is not None and seen < 16:
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


class _Recorder:
    """What both callbacks do, framework-free: a RegimeMonitor per epoch and observe(metric)."""

    def __init__(self, metric: str, monitor: bool):
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be the name of a logged metric, got {metric!r}")
        self.metric = metric
        self.record_regimes = bool(monitor)
        self.optimizer = None
        self.monitor = None
        self.observed: list = []  # (optimizer step, metric value, switched after it)

    def attach(self, optimizer) -> None:
        from ..diagnostics import RegimeMonitor

        self.optimizer = unwrap_optimizer(optimizer)
        if self.record_regimes and self.monitor is None:
            self.monitor = RegimeMonitor(self.optimizer)

    def epoch_end(self) -> None:
        if self.monitor is not None:
            self.monitor.record()

    def observe(self, metrics: dict, names: tuple) -> None:
        value = next((metrics[n] for n in names if n in metrics), None)
        if value is None or self.optimizer is None:
            return
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        observe = getattr(self.optimizer, "observe", None)
        switched = bool(observe(value)) if observe is not None else False
        self.observed.append((self._steps(), value, switched))

    def _steps(self) -> int | None:
        steps = getattr(self.optimizer, "steps", None)
        return steps if isinstance(steps, int) else None

    @property
    def switched_at(self) -> int | None:
        """The optimizer step PhysicsSGD switched at (None: not yet, or not a PhysicsSGD)."""
        return getattr(self.optimizer, "switched_at", None)


class _RecorderViews:
    """The callbacks' read-only views of their :class:`_Recorder`."""

    _recorder: _Recorder

    metric = property(lambda self: self._recorder.metric, doc="the metric fed to observe")
    monitor = property(lambda self: self._recorder.monitor, doc="RegimeMonitor, or None")
    observed = property(lambda self: self._recorder.observed,
                        doc="(optimizer step, value, switched) per evaluation")  # fmt: skip
    optimizer = property(lambda self: self._recorder.optimizer, doc="the unwrapped optimizer")
    switched_at = property(lambda self: self._recorder.switched_at,
                           doc="the step PhysicsSGD switched at, or None")  # fmt: skip
