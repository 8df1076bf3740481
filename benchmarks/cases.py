"""What the step benchmarks time: parameter sets, optimizers, and the bytes each must move.

A *case* is one optimizer (one backend) on one parameter set. Every case times
``optimizer.step()`` alone, with the gradients already in place, fp32 parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dampopt import CADAM, CubicDampedSGD, PhysicsSGD, iKFAD
from dampopt._friction import resolve_backend

from .published import PublishedCADAM, PublishedCD, PublishedIKFAD

# ResNet-18 (torchvision topology, 10 classes: 11.18M parameters, 62 tensors). Hard-coded so
# no model code or download is needed; benchmarks/README.md says how it was produced.
_RESNET18 = (
    [(64, 3, 7, 7), (64,), (64,)]
    + [(64, 64, 3, 3), (64,), (64,)] * 4
    + [(128, 64, 3, 3), (128,), (128,), (128, 128, 3, 3), (128,), (128,),
       (128, 64, 1, 1), (128,), (128,), (128, 128, 3, 3), (128,), (128,),
       (128, 128, 3, 3), (128,), (128,)]
    + [(256, 128, 3, 3), (256,), (256,), (256, 256, 3, 3), (256,), (256,),
       (256, 128, 1, 1), (256,), (256,), (256, 256, 3, 3), (256,), (256,),
       (256, 256, 3, 3), (256,), (256,)]
    + [(512, 256, 3, 3), (512,), (512,), (512, 512, 3, 3), (512,), (512,),
       (512, 256, 1, 1), (512,), (512,), (512, 512, 3, 3), (512,), (512,),
       (512, 512, 3, 3), (512,), (512,)]
    + [(10, 512), (10,)]
)

#: parameter set name -> list of tensor shapes
PARAMETER_SETS = {
    "1M": [(1 << 20,)],
    "ResNet-18": _RESNET18,
    "64M": [(1 << 26,)],
}

#: arrays each kind of update must read or write once per step (fp32): the memory traffic
ARRAYS_MOVED = {"adam-like": 7, "sgd-like": 5}

# Hyperparameters: the authors' CIFAR-10 values (dampopt's defaults), fixed so runs compare.
IKFAD = dict(lr=0.0973**2, gamma=0.40, alpha=0.402, mu=1.87)
CD = dict(lr=0.0448**2, gamma=0.17, c=56814.47)
CADAM_HYPER = dict(lr=0.0037**2, gamma=3.55, c=82552.90, alpha=0.005, eps=1e-8)


@dataclass(frozen=True)
class Case:
    """One thing to time: ``build(params)`` returns an optimizer over ``params``."""

    label: str  # row name in the table
    rule: str  # "iKFAD" | "CD" | "CADAM" | "SGD" | "Adam" | "PhysicsSGD" | "copy"
    backend: str  # "triton", "torch", "compiled", "loop", "baseline", "fused", "foreach"
    traffic: str  # key of ARRAYS_MOVED
    build: Callable


def _dampopt(cls, hyper, backend):
    return lambda params: cls(params, backend=backend, **hyper)


def available_backends(device: torch.device, parameter_set: str) -> list[str]:
    """dampopt backends worth timing on ``device`` (loop only on the smallest set)."""
    backends = ["torch"]
    if device.type == "cuda":
        try:
            resolve_backend("triton", device)
            backends.insert(0, "triton")
        except RuntimeError:
            pass
    else:
        backends.append("compiled")
    if parameter_set == "1M":
        backends.append("loop")
    return backends


def cases(device: torch.device, parameter_set: str) -> list[Case]:
    """Every case for one parameter set on ``device``."""
    rules = [
        ("iKFAD", iKFAD, IKFAD, PublishedIKFAD, "adam-like"),
        ("CD", CubicDampedSGD, CD, PublishedCD, "sgd-like"),
        ("CADAM", CADAM, CADAM_HYPER, PublishedCADAM, "adam-like"),
    ]
    out = []
    for name, cls, hyper, published, traffic in rules:
        for backend in available_backends(device, parameter_set):
            out.append(Case(f"{name} [{backend}]", name, backend, traffic,
                            _dampopt(cls, hyper, backend)))
        out.append(Case(f"{name} published (baseline)", name, "baseline", traffic,
                        lambda params, p=published, h=hyper: p(params, **h)))
    out += [
        Case("torch Adam(fused)", "Adam", "fused", "adam-like",
             lambda params: torch.optim.Adam(params, lr=1e-3, fused=True)),
        Case("torch SGD(fused)", "SGD", "fused", "sgd-like",
             lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True)),
        Case("torch SGD(foreach)", "SGD", "foreach", "sgd-like",
             lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)),
        Case("PhysicsSGD(fused)", "PhysicsSGD", "fused", "sgd-like",
             lambda params: PhysicsSGD(params, lr=0.01, fused=True)),
        Case("PhysicsSGD(foreach)", "PhysicsSGD", "foreach", "sgd-like",
             lambda params: PhysicsSGD(params, lr=0.01, foreach=True)),
    ]
    return out


def make_parameters(parameter_set: str, device: torch.device, seed: int = 0):
    """fp32 parameters of the set, each with a gradient (small, so runs stay finite)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in PARAMETER_SETS[parameter_set]:
        param = torch.nn.Parameter(torch.randn(shape, device=device, generator=generator))
        param.grad = 0.01 * torch.randn(shape, device=device, generator=generator)
        params.append(param)
    return params


def numel(parameter_set: str) -> int:
    return sum(torch.Size(shape).numel() for shape in PARAMETER_SETS[parameter_set])


def bytes_moved(case: Case, parameter_set: str) -> int:
    """Bytes one step must read and write at least (fp32: 4 bytes per element per array)."""
    return ARRAYS_MOVED[case.traffic] * 4 * numel(parameter_set)
