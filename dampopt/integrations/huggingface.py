"""``DampoptCallback`` for HF ``transformers.Trainer``: the regime per epoch, and the metric for
:class:`dampopt.PhysicsSGD`'s hybrid switch.

Example::

    trainer = Trainer(
        model, args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy,
        optimizer_cls_and_kwargs=(PhysicsSGD, {"lr": 0.05, "switch_metric": 0.9}),
        callbacks=[DampoptCallback(metric="eval_accuracy")],
    )

The Trainer's optimizer is accelerate's ``AcceleratedOptimizer``; the callback works on the
PhysicsSGD inside it (:func:`dampopt.integrations.unwrap_optimizer`).
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "dampopt.integrations.huggingface needs transformers (pip install transformers)"
    ) from error

from . import _Recorder, _RecorderViews

__all__ = ["DampoptCallback"]


class DampoptCallback(_RecorderViews, TrainerCallback):
    """Records the damping regime each epoch and feeds an eval metric to ``observe``.

    Args:
        metric: the evaluation metric fed to ``optimizer.observe`` after each evaluation, as
            the Trainer names it (``"eval_accuracy"``; ``"accuracy"`` finds it too). Ignored
            when the optimizer has no ``observe`` (anything but PhysicsSGD): then only the
            regime is recorded.
        monitor: record ``(lr, momentum)`` at each epoch end in a
            :class:`dampopt.diagnostics.RegimeMonitor` (``.monitor``; ``.monitor.report()``).

    After training: ``observed`` holds ``(optimizer step, value, switched)`` per evaluation,
    ``switched_at`` the step PhysicsSGD switched at (None if it did not), ``optimizer`` the
    unwrapped optimizer.
    """

    def __init__(self, metric: str = "eval_accuracy", monitor: bool = True):
        self._recorder = _Recorder(metric, monitor)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self._recorder.attach(optimizer)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._recorder.epoch_end()

    def on_evaluate(self, args, state, control, metrics=None, optimizer=None, **kwargs):
        if self._recorder.optimizer is None and optimizer is not None:
            self._recorder.attach(optimizer)
        name = self._recorder.metric
        bare = name[len("eval_") :] if name.startswith("eval_") else name
        self._recorder.observe(metrics or {}, (name, f"eval_{bare}", bare))
