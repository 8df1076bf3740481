#!/usr/bin/env python
"""Training throughput of one preset's ResNet-18 and the projected time of the whole preset.

Trains the baseline recipe for ``--epochs`` epochs through the same loop as reproduce_paper.py
(device-resident data, on-device augmentation, bf16 autocast and channels_last on CUDA) and
reports training images/s of the last epoch (the first includes cuDNN autotuning and, with
``--compile``, compilation). ``--synthetic`` uses random images of the preset's shape, so no
dataset (and no network) is needed: throughput does not depend on the pixels.

Projection: the preset trains 8 models for ``epochs`` epochs and runs 5 corrections of
``correction_epochs`` epochs over the training set; a correction epoch is counted as a full
training epoch (an upper bound: frozen groups need no weight gradients). Per-epoch test-set
evaluations are included at the measured evaluation rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: the package runs it
    from dampopt.reference import run_file

    run_file(__file__)

import torch  # noqa: E402

from . import data as datasets  # noqa: E402
from . import needs_extra  # noqa: E402
from .experiments import recipes  # noqa: E402
from .models import build_model  # noqa: E402
from .presets import PRESETS  # noqa: E402
from .training import Settings, predict, train  # noqa: E402

with needs_extra():
    import numpy as np

TRAININGS, CORRECTIONS = 8, 5


def synthetic_arrays(preset) -> dict:
    """Random uint8 images and labels in the preset's dataset shape (CIFAR-10 or FMNIST)."""
    rng = np.random.default_rng(0)
    size, channels, n_train = (32, 3, 50_000) if preset.dataset == "cifar10" else (28, 1, 60_000)
    return {
        "train_images": rng.integers(0, 256, (n_train, size, size, channels), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train).astype(np.int64),
        "test_images": rng.integers(0, 256, (10_000, size, size, channels), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 10_000).astype(np.int64),
        "classes": tuple(str(i) for i in range(10)),
        "source": "synthetic",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    preset, device = PRESETS[args.preset], torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    arrays = synthetic_arrays(preset) if args.synthetic else (
        datasets.load_cifar10(args.data_dir) if preset.dataset == "cifar10"
        else datasets.load_fashion_mnist(args.data_dir))  # fmt: skip
    data = datasets.prepare(arrays, device, preset.train_size, preset.test_size,
                            preset.image_size, seed=0)  # fmt: skip
    with tempfile.TemporaryDirectory() as checkpoints:
        settings = Settings(
            epochs=args.epochs, batch_size=preset.batch_size, crop_padding=preset.crop_padding,
            seed=42, device=device, channels_last=device.type == "cuda" or preset.width % 8 == 0,
            bf16=device.type == "cuda", checkpoint_dir=Path(checkpoints), log_dir=None,
            resume=False, progress=False, compile=args.compile,
        )  # fmt: skip
        torch.manual_seed(42)
        model = build_model(data.in_channels, 10, preset.width, settings.channels_last)
        run = train(recipes(preset, 1, None)["baseline"], model, data, settings)
        start = time.perf_counter()
        predict(run.model, data, settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        eval_seconds = time.perf_counter() - start
    n_train, n_test = len(data.train_labels), len(data.test_labels)
    last = run.log[-1].seconds - eval_seconds  # the epoch row includes one evaluation
    rate = n_train / last
    epochs = TRAININGS * preset.epochs + CORRECTIONS * preset.correction_epochs
    projected = epochs * n_train / rate + TRAININGS * preset.epochs * eval_seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), "
          f"preset {preset.name}, {n_train} training images, width {preset.width}")
    for row in run.log:
        print(f"epoch {row.epoch}: {row.seconds:.1f} s (training + one evaluation)")
    print(f"training images/s (last epoch): {rate:,.0f}")
    print(f"test evaluation: {n_test / eval_seconds:,.0f} images/s")
    print(f"projected preset time: {projected / 3600:.2f} h ({epochs} epoch-equivalents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
