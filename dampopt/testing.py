"""The one table of friction-optimizer configurations every "backend equals the reference"
check runs: the CPU tests (``tests/``) and the GPU check (``benchmarks/gpu_correctness.py``).

Hyperparameters are far from the authors' defaults on purpose: large enough that every
sub-step changes the numbers within a few steps (the authors' ``c ~ 1e5`` would flatten the
momentum at once, and a tiny friction would leave the thermostat untested).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._rule import Rule
from .cadam import CADAM, CADAM_RULE
from .cubic_damped_sgd import CUBIC_DAMPED_RULE, CubicDampedSGD
from .ikfad import IKFAD_RULE, iKFAD


@dataclass(frozen=True)
class FrictionCase:
    optimizer: type
    rule: Rule
    hyperparameters: dict  # besides lr and weight_decay
    lr: float

    def kwargs(self) -> dict:
        """Constructor keyword arguments: lr and the hyperparameters."""
        return dict(lr=self.lr, **self.hyperparameters)


#: rule name -> its case
FRICTION_CASES = {
    "ikfad": FrictionCase(iKFAD, IKFAD_RULE, dict(gamma=0.4, alpha=0.402, mu=0.5), lr=0.01),
    "cubic_damped": FrictionCase(CubicDampedSGD, CUBIC_DAMPED_RULE, dict(gamma=0.17, c=5.0),
                                 lr=0.01),  # fmt: skip
    "cadam": FrictionCase(CADAM, CADAM_RULE, dict(gamma=0.5, c=5.0, alpha=0.3, eps=1e-8),
                          lr=1e-3),  # fmt: skip
}
