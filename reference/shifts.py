"""Distribution shifts for the surgical benchmark: corruptions of the images, or of the labels.

Lee et al. (2023, "Surgical fine-tuning improves adaptation to distribution shifts") find that
which block is best to fine-tune depends on the shift: early layers for input-level shifts
(image corruptions), the last layer for output-level shifts (labels changed). Each builder
here takes images in [0, 1] (``[N, C, H, W]``), their labels, a severity (1 or 2) and a seeded
``torch.Generator``, and returns the shifted images and labels; everything is generated
locally and is a function of the seed alone. The image corruptions use torchvision's
``transforms.v2.functional`` where it has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import needs_extra

with needs_extra():
    from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Shift:
    name: str  # e.g. "noise-2"
    kind: str  # "input" or "output"
    corruption: str  # the builder's name
    severity: int


def gaussian_noise(images, labels, severity, generator):
    sigma = (0.15, 0.3)[severity - 1]
    noise = torch.randn(images.shape, generator=generator, device=images.device) * sigma
    return (images + noise).clamp_(0, 1), labels


def gaussian_blur(images, labels, severity, generator):
    sigma = (0.7, 1.2)[severity - 1]
    return TF.gaussian_blur(images, kernel_size=[5, 5], sigma=[sigma, sigma]), labels


def contrast(images, labels, severity, generator):
    factor = (0.4, 0.2)[severity - 1]
    return TF.adjust_contrast(images, contrast_factor=factor), labels


def impulse_noise(images, labels, severity, generator):
    """Salt and pepper: a fraction of the pixels set to 0 or 1 at random."""
    fraction = (0.05, 0.15)[severity - 1]
    draw = torch.rand(images.shape, generator=generator, device=images.device)
    salt = torch.rand(images.shape, generator=generator, device=images.device) < 0.5
    hit = draw < fraction
    return torch.where(hit, salt.to(images.dtype), images), labels


def label_permutation(images, labels, severity, generator, num_classes=10):
    """A fixed cyclic permutation of the first ``2 + 2 * severity`` classes' labels.

    Severity 1 permutes 4 classes (0 -> 1 -> 2 -> 3 -> 0), severity 2 permutes 6. The images are
    unchanged: only the output mapping shifts (Lee et al.'s CIFAR-Flip is the extreme case).
    """
    count = min(num_classes, 2 + 2 * severity)
    mapping = torch.arange(num_classes, device=labels.device)
    mapping[:count] = torch.roll(mapping[:count], -1)
    return images, mapping[labels]


BUILDERS = {
    "noise": ("input", gaussian_noise),
    "blur": ("input", gaussian_blur),
    "contrast": ("input", contrast),
    "impulse": ("input", impulse_noise),
    "labels": ("output", label_permutation),
}


def all_shifts(severities=(1, 2)) -> list[Shift]:
    """Every corruption at every severity; the label shift at severity 1 only."""
    shifts = []
    for corruption, (kind, _) in BUILDERS.items():
        for severity in severities if kind == "input" else (1,):
            shifts.append(Shift(f"{corruption}-{severity}", kind, corruption, severity))
    return shifts


def apply(shift: Shift, images: torch.Tensor, labels: torch.Tensor, seed: int):
    """``shift`` applied to ``images`` in [0, 1] and ``labels``; reproducible from ``seed``."""
    generator = torch.Generator(images.device).manual_seed(seed)
    _, builder = BUILDERS[shift.corruption]
    return builder(images.clone(), labels.clone(), shift.severity, generator)
