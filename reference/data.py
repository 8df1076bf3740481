"""Datasets held as tensors on the training device, batched and augmented there.

Following airbench, a whole dataset lives on the device as one normalized float tensor; each
batch is gathered by index and augmented with tensor ops (random crop with zero padding and a
horizontal flip, the paper's Sec. 4.1 augmentation), so there is no per-batch CPU work.

Batch order comes from :class:`torch.utils.data.DistributedSampler` (in one process: one replica),
and the crop and flip draws from a generator on the data's device. Both are seeded per epoch by
:func:`epoch_seed`, a function of the run's seed and the epoch alone: an epoch's batches are
therefore a function of ``(seed, epoch)``, which is what makes ``--resume`` reproduce an
uninterrupted run exactly, and every torchrun rank draws the same permutation and takes its
shard of it. The sampler's own ``seed + epoch`` is not used (its epoch stays 0): with it, seed 42
epoch 1 was the permutation of seed 43 epoch 0. :func:`epoch_seed` packs ``(seed, epoch)``
into 32 bits and mixes them bijectively, so that distinct pairs with both in ``[0, 65536)`` get
distinct generator seeds (32 bits, because torch's CPU generator keeps only the low 32 bits of
a seed: seeds differing above bit 31 draw the same numbers).

Fashion-MNIST is read from its idx.gz files with numpy (Debian's ``dataset-fashion-mnist``
installs them under /usr/share/datasets/fashion-mnist); CIFAR-10 comes from torchvision.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from . import needs_extra

with needs_extra():
    import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_IDX_DTYPES = {0x08: np.uint8}

# Generator streams of :func:`epoch_seed`: the shuffle, and the crop and flip draws.
ORDER_STREAM, AUGMENT_STREAM = 0x0000_0000, 0x9E37_79B9


class DataUnavailable(RuntimeError):
    """The dataset is not on disk and cannot be fetched; the message says how to get it."""


# -- idx files (the MNIST / Fashion-MNIST format) ----------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An idx(.gz) file as a numpy array: magic ``0 0 dtype ndim``, big-endian dims, data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    except (OSError, EOFError, zlib.error, struct.error) as error:
        raise DataUnavailable(
            f"{path} cannot be read ({type(error).__name__}: {error}); it is damaged or "
            "truncated: reinstall it (e.g. apt-get install --reinstall dataset-fashion-mnist) "
            "or pass --data-dir with good copies"
        ) from None
    if zero != 0 or dtype_code not in _IDX_DTYPES:
        raise DataUnavailable(f"{path} is not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataUnavailable(
            f"{path}: header says {shape}, file holds {data.size} values (truncated?)"
        )
    return data.reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped idx file (the inverse of :func:`read_idx`)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def find_fashion_mnist(data_dir: str | None) -> Path | None:
    """``data_dir`` if given, else the Debian package's directory, when it holds all four files."""
    directory = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    if all((directory / name).is_file() for name in FASHION_MNIST_FILES.values()):
        return directory
    return None


def load_fashion_mnist(data_dir: str | None, download: bool = True) -> dict:
    """Fashion-MNIST as uint8 arrays ``[N, 28, 28, 1]`` and int64 labels.

    Looks in ``data_dir`` when given (only there: an explicit directory is not second-guessed),
    else in /usr/share/datasets/fashion-mnist; then, if ``download``, tries torchvision's
    downloader into ``data_dir`` (or ~/.cache/dampopt). Raises :class:`DataUnavailable`.
    """
    directory = find_fashion_mnist(data_dir)
    if directory is None and not download:
        raise DataUnavailable(_HOW_TO_GET_FASHION_MNIST)
    if directory is None:
        directory = _download_fashion_mnist(data_dir)
    arrays = {key: read_idx(directory / name) for key, name in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataUnavailable(
                f"{directory}: the {split} images file holds {len(images)} images but its labels "
                f"file {len(labels)} labels; the files do not belong together"
            )
    return {
        "train_images": arrays["train_images"][..., None],
        "train_labels": arrays["train_labels"].astype(np.int64),
        "test_images": arrays["test_images"][..., None],
        "test_labels": arrays["test_labels"].astype(np.int64),
        "classes": FASHION_MNIST_CLASSES,
        "source": str(directory),
    }


_HOW_TO_GET_FASHION_MNIST = (
    "Fashion-MNIST not found: install it with `sudo apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu) or pass --data-dir DIR holding train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
)


def _download_fashion_mnist(data_dir: str | None) -> Path:
    how = _HOW_TO_GET_FASHION_MNIST
    if data_dir and Path(data_dir).exists() and not os.access(data_dir, os.W_OK):
        raise DataUnavailable(how)
    root = Path(data_dir) if data_dir else Path.home() / ".cache" / "dampopt"
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as error:  # no network, no torchvision: say how to get the files
        raise DataUnavailable(f"{how} (download failed: {type(error).__name__})") from None
    directory = root / "FashionMNIST" / "raw"
    if find_fashion_mnist(str(directory)) is None:
        raise DataUnavailable(how)
    return directory


def load_cifar10(data_dir: str | None, download: bool = True) -> dict:
    """CIFAR-10 through torchvision (downloaded once), as uint8 ``[N, 32, 32, 3]`` arrays."""
    root = Path(data_dir) if data_dir else Path.home() / ".cache" / "dampopt"
    try:
        from torchvision.datasets import CIFAR10

        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except Exception as error:
        raise DataUnavailable(
            f"CIFAR-10 not available under {root} and could not be downloaded "
            f"({type(error).__name__}): run once with network access or pass --data-dir DIR "
            "holding torchvision's cifar-10-batches-py"
        ) from None
    return {
        "train_images": train.data,
        "train_labels": np.asarray(train.targets, dtype=np.int64),
        "test_images": test.data,
        "test_labels": np.asarray(test.targets, dtype=np.int64),
        "classes": CIFAR10_CLASSES,
        "source": str(root),
    }


# -- tensors on the device ---------------------------------------------------------------------


@dataclass
class DeviceData:
    """Normalized images ``[N, C, H, W]`` (float32) and labels, on the training device."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple
    source: str
    mean: torch.Tensor | None = None  # per-channel [1, C, 1, 1]: images = (x01 - mean) / std
    std: torch.Tensor | None = None

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images back to [0, 1] pixel values."""
        return images * self.std + self.mean

    def from_unit(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixel values normalized as this data's images are."""
        return (images - self.mean) / self.std

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]


def prepare(
    arrays: dict,
    device: torch.device,
    train_size: int | None,
    test_size: int | None,
    image_size: int,
    seed: int,
) -> DeviceData:
    """Subset (a class-stratified-by-chance random subset, fixed by ``seed``), resize, normalize.

    Resizing is area averaging (``F.adaptive_avg_pool2d``); 28 -> 14 averages 2x2 pixels.
    The per-channel mean and std are those of the training subset.
    """
    generator = np.random.default_rng(seed)

    def subset(images, labels, size):
        if size is None or size >= len(labels):
            return images, labels
        index = np.sort(generator.choice(len(labels), size, replace=False))
        return images[index], labels[index]

    train_x, train_y = subset(arrays["train_images"], arrays["train_labels"], train_size)
    test_x, test_y = subset(arrays["test_images"], arrays["test_labels"], test_size)

    def to_tensor(images):
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        # NHWC -> NCHW in memory too: the permuted view has channels-last strides (with one
        # channel it even passes is_contiguous()), and torch 2.14's CPU convolution backward
        # then takes its channels-last path, which corrupts the heap for odd batch sizes.
        x = x.permute(0, 3, 1, 2).float().div_(255).clone(memory_format=torch.contiguous_format)
        if x.shape[-1] != image_size:
            x = F.adaptive_avg_pool2d(x, image_size)
        return x

    train_x, test_x = to_tensor(train_x), to_tensor(test_x)
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return DeviceData(
        train_images=(train_x - mean) / std,
        train_labels=torch.from_numpy(train_y).to(device),
        test_images=(test_x - mean) / std,
        test_labels=torch.from_numpy(test_y).to(device),
        classes=tuple(arrays["classes"]),
        source=arrays["source"],
        mean=mean,
        std=std,
    )


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer: a bijection of [0, 2**32) that spreads every input bit."""
    h ^= h >> 16
    h = (h * 0x85EB_CA6B) & 0xFFFF_FFFF
    h ^= h >> 13
    h = (h * 0xC2B2_AE35) & 0xFFFF_FFFF
    return h ^ (h >> 16)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """The 32-bit generator seed of ``stream`` for epoch ``epoch`` of the run with ``seed``.

    ``(seed mod 2**16, epoch mod 2**16)`` packed into 32 bits, xor'ed with the stream's constant
    and passed through :func:`_fmix32`: each step is a bijection, so within a stream two pairs
    with both numbers in ``[0, 65536)`` never share a seed (unlike ``seed + epoch``), while
    consecutive seeds or epochs still get unrelated generator states.
    """
    packed = ((seed & 0xFFFF) << 16) | (epoch & 0xFFFF)
    return _fmix32(packed ^ stream)


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Per-image random crop (zero padding ``padding``) and horizontal flip, as tensor ops."""
    batch, _, height, width = images.shape
    device = images.device
    if padding:
        padded = F.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
        dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
        rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
        images = padded[torch.arange(batch, device=device)[:, None, None, None],
                        torch.arange(images.shape[1], device=device)[None, :, None, None],
                        rows, cols]  # fmt: skip
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class TensorLoader:
    """Batches of ``(images, labels)`` from device tensors.

    ``epoch`` selects the shuffle and augmentation draws; each ``iter()`` uses the current
    ``epoch`` and then advances it, so a caller that never sets it (e.g. a correction loop)
    still sees a new order every pass. Under torch.distributed each rank gets its shard of
    the examples; a training loader's ``batch_size`` is the global batch, split evenly over
    the ranks, so N processes train with the paper's batch, not N times it.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        crop_padding: int = 0,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if train:
            if batch_size % world_size:
                raise ValueError(
                    f"the batch size {batch_size} must divide evenly over {world_size} processes"
                )
            batch_size //= world_size
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.crop_padding, self.channels_last = crop_padding, channels_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.sampler = self._sampler(0)

    def _sampler(self, epoch: int) -> DistributedSampler:
        """This rank's sampler for ``epoch``: the same permutation on every rank, then sharded.

        The epoch is folded into the sampler's seed by :func:`epoch_seed` and its own epoch
        left at 0, since DistributedSampler seeds with ``seed + epoch``.
        """
        return DistributedSampler(
            range(len(self.labels)), num_replicas=self.world_size, rank=self.rank,
            shuffle=self.train, seed=epoch_seed(self.seed, epoch, ORDER_STREAM), drop_last=False,
        )  # fmt: skip

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        self.sampler = self._sampler(epoch)
        order = torch.tensor(list(iter(self.sampler)), device=self.labels.device)
        # On the data's device, so that augmenting a CUDA batch needs nothing from the CPU.
        generator = torch.Generator(self.labels.device)
        generator.manual_seed(epoch_seed(self.seed, epoch, AUGMENT_STREAM))
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.images[index]
            if self.train:
                images = random_crop_flip(images, self.crop_padding, generator)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels[index]
