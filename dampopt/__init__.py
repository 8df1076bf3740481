"""dampopt: physics-based optimizers and surgical layer repair for PyTorch.

Implements "A Physics-Based Diagnostic Pipeline for Neural Networks: From Damping Regimes to
Surgical Layer Repair": critically damped momentum (:class:`PhysicsSGD`), the friction
optimizers of Karoni et al. (:class:`iKFAD`, :class:`CubicDampedSGD`, :class:`CADAM`) and the
Scan -> Localize -> Diagnose -> Treat -> Verify pipeline (:mod:`dampopt.diagnostics`).
"""

from .cadam import CADAM, cadam_update
from .cubic_damped_sgd import CubicDampedSGD, cubic_damped_update
from .ikfad import FrictionStats, iKFAD, ikfad_update
from .momentum import classify_regime, critical_momentum, physics_momentum
from .physics_sgd import DampingState, PhysicsSGD

__version__ = "0.1.0"

__all__ = [
    "CADAM",
    "CubicDampedSGD",
    "DampingState",
    "FrictionStats",
    "PhysicsSGD",
    "cadam_update",
    "classify_regime",
    "critical_momentum",
    "cubic_damped_update",
    "iKFAD",
    "ikfad_update",
    "physics_momentum",
]
