"""``DampoptCallback`` for Lightning: the regime per epoch, and the metric for
:class:`dampopt.PhysicsSGD`'s hybrid switch.

Example::

    trainer = lightning.Trainer(callbacks=[DampoptCallback(metric="val_acc")], ...)

where the LightningModule logs ``self.log("val_acc", ...)`` in ``validation_step`` and returns
a PhysicsSGD from ``configure_optimizers``. ``pl_module.optimizers()`` is a
``LightningOptimizer``; the callback works on the optimizer inside it
(:func:`dampopt.integrations.unwrap_optimizer`). Uses ``lightning`` if installed, else
``pytorch_lightning``.
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - exercised only without lightning
    try:
        from pytorch_lightning import Callback
    except ImportError as error:
        raise ImportError(
            "dampopt.integrations.lightning needs lightning (pip install lightning)"
        ) from error

from . import _Recorder, _RecorderViews

__all__ = ["DampoptCallback"]


class DampoptCallback(_RecorderViews, Callback):
    """Records the damping regime each training epoch and feeds a logged metric to ``observe``.

    Args:
        metric: a metric the module logs in validation (``trainer.callback_metrics``), fed to
            ``optimizer.observe`` after each validation run (sanity checks excluded). Ignored
            when the optimizer has no ``observe`` (anything but PhysicsSGD).
        monitor: record ``(lr, momentum)`` at each training epoch end in a
            :class:`dampopt.diagnostics.RegimeMonitor` (``.monitor``).
        optimizer_index: which of ``trainer.optimizers`` to watch.

    After training: ``observed`` holds ``(optimizer step, value, switched)`` per validation,
    ``switched_at`` the step PhysicsSGD switched at, ``optimizer`` the unwrapped optimizer.
    """

    def __init__(self, metric: str = "val_acc", monitor: bool = True, optimizer_index: int = 0):
        self._recorder = _Recorder(metric, monitor)
        self.optimizer_index = optimizer_index

    def _attach(self, trainer) -> None:
        if self._recorder.optimizer is None and trainer.optimizers:
            self._recorder.attach(trainer.optimizers[self.optimizer_index])

    def on_train_start(self, trainer, pl_module):
        self._attach(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._attach(trainer)
        self._recorder.epoch_end()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self._attach(trainer)
        self._recorder.observe(dict(trainer.callback_metrics), (self._recorder.metric,))
