"""The three presets: what data, what model size, how long.

``paper`` is the paper's protocol (Sec. 4.1, 6.1, 5.5): CIFAR-10, ResNet-18 (width 64), 200
epochs, batch 128, weight decay 5e-4, cosine lr 0.1 -> 1e-4, crop 32/4 + flip, Adam 1e-3 -> 1e-5,
corrections 30 epochs from lr 0.01 with physics momentum. Not the paper's: every correction is
verified on the half of the test set the localization did not see, and correction A is compared
with control arms (unflagged, random, all and largest groups) at the same budget over three
treatment seeds.

``quick`` (the default) and ``smoke`` keep every step of that protocol but shrink it to a 2-core
CPU: Fashion-MNIST averaged down to 14x14, a training subset, base width 8 instead of 64, a few
epochs. The correction keeps the paper's ratio of epochs (30 of 200 = 15%), rounded.
Accuracy thresholds of Tables 4 and 14 are the paper's (80/85/90/92/95% on CIFAR-10) moved to
what this model reaches on this data; the third is the "mid" threshold (the paper's 90%, used by
Hybrid-90 and the 1.9x claim) and the fifth the "top" one (the paper's 95%).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str  # "fashion-mnist" | "cifar10"
    train_size: int | None  # None: the whole training set
    test_size: int | None
    image_size: int  # pixels per side after area resizing
    width: int  # ResNet-18 base width (paper: 64)
    epochs: int
    batch_size: int
    crop_padding: int  # random-crop zero padding (paper: 4 of 32)
    weight_decay: float
    lr_max: float
    lr_min: float
    adam_lr_max: float
    adam_lr_min: float
    correction_epochs: int
    correction_lr: float
    control_seeds: tuple  # treatment seeds of the control arms (each: its own batch order)
    random_draws: int  # random sets of groups in the control arms
    thresholds: tuple  # accuracies (fractions) for Tables 4 and 14, ascending
    early_epochs: tuple  # epochs of Table 5 (paper: 1, 10, 50 of 200)
    description: str

    @property
    def mid_threshold(self) -> float:
        return self.thresholds[2]

    @property
    def top_threshold(self) -> float:
        return self.thresholds[4]

    def to_dict(self) -> dict:
        return asdict(self)


def _scaled_early_epochs(epochs: int) -> tuple:
    """The paper's epochs 1, 10, 50 of 200 at the same fractions of ``epochs`` (distinct)."""
    early = [1, max(2, math.ceil(epochs * 10 / 200)), max(3, math.ceil(epochs * 50 / 200))]
    return tuple(min(e, epochs) for e in early)


def _correction_epochs(epochs: int) -> int:
    """The paper's 30 correction epochs per 200 training epochs, to the nearest epoch (>= 1)."""
    return max(1, round(epochs * 30 / 200))


PAPER = Preset(
    name="paper",
    dataset="cifar10",
    train_size=None,
    test_size=None,
    image_size=32,
    width=64,
    epochs=200,
    batch_size=128,
    crop_padding=4,
    weight_decay=5e-4,
    lr_max=0.1,
    lr_min=1e-4,
    adam_lr_max=1e-3,
    adam_lr_min=1e-5,
    correction_epochs=30,
    correction_lr=0.01,
    control_seeds=(0, 1, 2),
    random_draws=3,
    thresholds=(0.80, 0.85, 0.90, 0.92, 0.95),
    early_epochs=(1, 10, 50),
    description="the paper's protocol: CIFAR-10, ResNet-18, 200 epochs (GPU)",
)

# The CPU presets keep the paper's optimizer protocol (batch 128, weight decay, lr ranges,
# correction lr) and shrink only the data, the model and the number of epochs.
QUICK = replace(
    PAPER,
    name="quick",
    dataset="fashion-mnist",
    train_size=4000,
    test_size=2000,
    image_size=14,
    width=8,
    epochs=8,
    crop_padding=1,
    correction_epochs=_correction_epochs(8),
    # The paper's thresholds as fractions of its best accuracy (95.5%), times the ~80% this
    # preset reaches (measured: 77-82% best accuracy over the eight methods, seed 42).
    thresholds=(0.67, 0.71, 0.75, 0.77, 0.79),
    early_epochs=_scaled_early_epochs(8),
    description="Fashion-MNIST 14x14, 4,000 training / 2,000 test images, width 8, 8 epochs (CPU)",
)

SMOKE = replace(
    QUICK,
    name="smoke",
    train_size=512,
    test_size=256,
    epochs=3,
    batch_size=64,
    correction_epochs=1,
    thresholds=(0.30, 0.40, 0.50, 0.55, 0.60),
    early_epochs=(1, 2, 3),
    description="Fashion-MNIST 14x14, 512 training / 256 test images, width 8, 3 epochs (tests)",
)

PRESETS = {preset.name: preset for preset in (QUICK, SMOKE, PAPER)}
