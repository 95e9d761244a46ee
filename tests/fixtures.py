"""Writers for small on-disk datasets that the tests make themselves (no downloads)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write an IDX file (uint8 payload) as MNIST does; gzip when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def synthetic_digits(n_per_class: int = 12, size: int = 8, classes: int = 3, seed: int = 0):
    """Separable toy images: class k lights up horizontal band k. uint8 0-255."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, size=(n_per_class * classes, size, size)).astype(np.uint8)
    y = np.repeat(np.arange(classes), n_per_class)
    band = size // classes
    for i, label in enumerate(y):
        x[i, label * band:(label + 1) * band, :] = 220
    return x, y.astype(np.uint8)


def write_idx_folder(folder: Path, splits=("train", "t10k"), gz: bool = True, n_per_class: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for i, split in enumerate(splits):
        x, y = synthetic_digits(n_per_class=n_per_class, seed=i)
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", y)
    return folder


def write_image_folder(folder: Path, mode: str = "L", size: int = 12, n_per_class: int = 6) -> Path:
    from PIL import Image

    x, y = synthetic_digits(n_per_class=n_per_class, size=size)
    for i, (pixels, label) in enumerate(zip(x, y, strict=True)):
        target = folder / f"class_{label}"
        target.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels, mode="L").convert(mode)
        image.save(target / f"{i}.{'png' if i % 2 else 'jpg'}")
    return folder
