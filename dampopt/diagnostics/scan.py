"""Step 1, Scan: the damping regime of every epoch (the paper, Sec. 4.5, Table 6).

``dmu = mu - mu_c(lr)`` with ``mu_c = 1 - 2 sqrt(curvature * lr)``: underdamped if
``dmu > tol``, overdamped if ``dmu < -tol``, critical otherwise (``dampopt.classify_regime``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .._validation import check_int, check_learning_rate, check_non_negative
from ..momentum import REGIMES, classify_regime, critical_momentum, momentum_in_effect
from ._report import Report, markdown_table


def cosine_schedule(lr_max: float, lr_min: float, epochs: int) -> list[float]:
    """Per-epoch cosine annealing, the paper's schedule.

    ``lr[e] = lr_min + (lr_max - lr_min) * (1 + cos(pi * e / epochs)) / 2`` for
    ``e = 0 .. epochs-1``: the first epoch runs at ``lr_max`` and the last just above ``lr_min``.
    """
    lr_max = check_learning_rate(lr_max, "lr_max")
    lr_min = check_learning_rate(lr_min, "lr_min", allow_zero=True)
    check_int("epochs", epochs, 1)
    return [
        lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)
    ]


@dataclass(frozen=True)
class ScanRow(Report):
    """One epoch: ``epoch`` counts from 1, as in the paper's Table 15."""

    epoch: int
    lr: float
    mu: float
    mu_c: float  # unclamped critical momentum at this lr
    dmu: float  # mu - mu_c; > tol is underdamped
    regime: str


@dataclass(frozen=True)
class ScanReport(Report):
    """Regime of every epoch and the counts per regime (the paper's Table 6 row)."""

    rows: list
    counts: dict  # {"underdamped": n, "critical": n, "overdamped": n}
    tol: float
    curvature: float

    @property
    def fractions(self) -> dict:
        total = max(len(self.rows), 1)
        return {regime: count / total for regime, count in self.counts.items()}

    def to_markdown(self, rows: bool = False) -> str:
        """The counts as a table; with ``rows=True`` also one line per epoch."""
        fractions = self.fractions
        text = markdown_table(
            ["Regime", "Epochs", "Fraction"],
            [(regime, self.counts[regime], fractions[regime]) for regime in REGIMES],
        )
        if rows:
            text += "\n\n" + markdown_table(
                ["Epoch", "lr", "mu", "mu_c", "dmu", "Regime"],
                [(r.epoch, r.lr, r.mu, r.mu_c, r.dmu, r.regime) for r in self.rows],
            )
        return text


def scan_schedule(lrs, mus, tol: float = 0.05, curvature: float = 1.0) -> ScanReport:
    """Classify each epoch of a schedule.

    Args:
        lrs: the learning rate of each epoch (torch's meaning).
        mus: the momentum of each epoch (same length), or one number for a constant momentum.
        tol: half-width of the critical band on ``dmu`` (the paper: 0.05).
        curvature: lambda in ``mu_c = 1 - 2 sqrt(lambda * lr)``.

    The paper's baseline (cosine 0.1 -> 1e-4 over 200 epochs, mu = 0.9) gives 170 underdamped,
    21 critical, 9 overdamped. The clamped physics schedule gives 66 underdamped epochs by this
    rule (its clamp at mu_min = 0.5 sits above mu_c + tol early on); the paper reports 0.
    """
    lrs = [check_learning_rate(lr, "lrs", allow_zero=True) for lr in lrs]
    if not lrs:
        raise ValueError("lrs is empty: give the learning rate of at least one epoch")
    if isinstance(mus, (int, float)) and not isinstance(mus, bool):
        mus = [float(mus)] * len(lrs)
    mus = [float(mu) for mu in mus]
    if len(mus) != len(lrs):
        raise ValueError(
            f"mus must be one number or have len(lrs)={len(lrs)} values, got {len(mus)}"
        )
    tol = check_non_negative("tol", tol)
    curvature = check_non_negative("curvature", curvature)
    rows = []
    for epoch, (lr, mu) in enumerate(zip(lrs, mus), start=1):
        mu_c = critical_momentum(lr, curvature)
        regime = classify_regime(mu, lr, tol=tol, curvature=curvature)
        rows.append(ScanRow(epoch, lr, mu, mu_c, mu - mu_c, regime))
    counts = {regime: sum(row.regime == regime for row in rows) for regime in REGIMES}
    return ScanReport(rows=rows, counts=counts, tol=tol, curvature=curvature)


@dataclass
class RegimeMonitor:
    """Records (lr, momentum) of a live optimizer once per epoch and scans them.

    Works with any torch optimizer whose param group has ``"momentum"`` (SGD, RMSprop,
    :class:`dampopt.PhysicsSGD`, whose ``"momentum"`` always holds the momentum in effect) or
    ``"betas"`` (Adam, AdamW, NAdam...: ``betas[0]`` plays the role of the momentum). Call
    :meth:`record` at the end of each epoch, *before* ``scheduler.step()``, so the row holds the
    lr and momentum the epoch ran with.

    Args:
        optimizer: the optimizer to watch.
        group: index of the param group to read (default: the first).
        tol, curvature: as :func:`scan_schedule`. A group's own ``"curvature"`` (PhysicsSGD)
            takes precedence over ``curvature``.
    """

    optimizer: object
    group: int = 0
    tol: float = 0.05
    curvature: float = 1.0
    lrs: list = field(default_factory=list)
    mus: list = field(default_factory=list)

    def __post_init__(self):
        groups = getattr(self.optimizer, "param_groups", None)
        if groups is None:
            raise TypeError(
                f"optimizer must be a torch optimizer, got {type(self.optimizer).__name__}"
            )
        if not 0 <= self.group < len(groups):
            raise ValueError(f"group must be in [0, {len(groups)}), got {self.group}")
        self._momentum_key()  # fail now, not at the end of the first epoch
        self.tol = check_non_negative("tol", self.tol)
        self.curvature = check_non_negative(
            "curvature", self.optimizer.param_groups[self.group].get("curvature", self.curvature)
        )

    def _momentum_key(self) -> str:
        group = self.optimizer.param_groups[self.group]
        if "momentum" in group:
            return "momentum"
        if "betas" in group:
            return "betas"
        raise ValueError(
            f"{type(self.optimizer).__name__} has neither 'momentum' nor 'betas' in its param "
            "groups: there is no momentum coefficient to classify"
        )

    def current(self) -> tuple[float, float]:
        """(lr, momentum) of the watched group now."""
        group = self.optimizer.param_groups[self.group]
        self._momentum_key()  # a clear error for optimizers without one
        return float(group["lr"]), momentum_in_effect(group)

    def record(self) -> ScanRow:
        """Append this epoch's (lr, momentum); returns its classified row."""
        lr, mu = self.current()
        self.lrs.append(lr)
        self.mus.append(mu)
        return self.report().rows[-1]

    def report(self) -> ScanReport:
        if not self.lrs:
            raise ValueError("RegimeMonitor has recorded no epoch yet: call record() first")
        return scan_schedule(self.lrs, self.mus, tol=self.tol, curvature=self.curvature)
