"""dampopt's optimizers in timm's optimizer registry, so ``timm.optim.create_optimizer_v2``
(and timm's train.py ``--opt``) can build them by name.

    from dampopt.integrations.timm import register_optimizers
    register_optimizers()
    optimizer = timm.optim.create_optimizer_v2(model, opt="ikfad", lr=0.0973**2)

timm has no public function that adds to its default registry, so :func:`register_optimizers`
writes into ``timm.optim._optim_factory.default_registry`` (timm 1.0's) unless a registry is
given. The names: "physicssgd", "ikfad", "cubicdampedsgd", "cadam".
"""

from __future__ import annotations

try:
    from timm.optim import OptimInfo
except ImportError as error:  # pragma: no cover - exercised only without timm
    raise ImportError("dampopt.integrations.timm needs timm (pip install timm)") from error

from .. import CADAM, CubicDampedSGD, PhysicsSGD, iKFAD

__all__ = ["OPTIMIZERS", "register_optimizers"]

#: what each optimizer takes of timm's generic arguments: PhysicsSGD's ``momentum`` is its
#: post-switch constant (torch SGD's keyword, so timm's default 0.9 is the paper's); only
#: CADAM has an ``eps``; none takes ``betas``
OPTIMIZERS = (
    OptimInfo("physicssgd", PhysicsSGD, "SGD with critically damped, lr-driven momentum",
              has_eps=False, has_momentum=True),  # fmt: skip
    OptimInfo("ikfad", iKFAD, "iKFAD: per-element kinetic friction (Karoni et al.)",
              has_eps=False),  # fmt: skip
    OptimInfo("cubicdampedsgd", CubicDampedSGD, "SGD with cubic damping (Karoni et al.)",
              has_eps=False),  # fmt: skip
    OptimInfo("cadam", CADAM, "Adam-like preconditioning with cubic damping (Karoni et al.)",
              has_eps=True),  # fmt: skip
)


def register_optimizers(registry=None) -> list[str]:
    """Add dampopt's optimizers to ``registry`` (timm's default one when None); returns the
    names registered."""
    if registry is None:
        from timm.optim._optim_factory import default_registry as registry
    for info in OPTIMIZERS:
        registry.register(info)
    return [info.name for info in OPTIMIZERS]
