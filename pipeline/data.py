"""Dataset sources -> raw pixel arrays, seeded stratified splits and the preprocessing contract.

Imports only numpy (and Pillow / scikit-learn inside the functions that need them), so that
`predict` and other torch-free consumers can reuse `Preprocess` and `load_image`.

Raw pixels are kept as float32 N x C x H x W in the source's own range (0-16 for digits,
0-255 for 8-bit images). The model sees `Preprocess.apply(raw)`:
    input = ((raw * scale) - mean[c]) / std[c]
with mean and std measured on the training split only.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# IDX element types (third byte of the magic number) -> numpy big-endian dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Preprocess:
    """How raw pixels become the model's float32 NCHW input; written into the manifest."""

    size: tuple[int, int]
    channels: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw pixels (N, C, H, W) -> normalized float32 model input."""
        if raw.ndim != 4 or raw.shape[1:] != (self.channels, *self.size):
            raise DataError(f"expected images of shape (N, {self.channels}, {self.size[0]}, {self.size[1]}), got {tuple(raw.shape)}")
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return ((raw.astype(np.float32) * np.float32(self.scale) - mean) / std).astype(np.float32)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "channels": self.channels, "scale": self.scale,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        try:
            return cls(size=(int(data["size"][0]), int(data["size"][1])), channels=int(data["channels"]),
                       scale=float(data["scale"]), mean=tuple(float(m) for m in data["mean"]),
                       std=tuple(float(s) for s in data["std"]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DataError(f"invalid preprocess record {data!r}: {exc}") from None


@dataclass(frozen=True)
class Splits:
    """Train / validation / test raw pixels and integer labels, with what describes them."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: tuple[str, ...]
    preprocess: Preprocess
    source: str
    fingerprint: str

    def sizes(self) -> dict:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


@dataclass(frozen=True)
class _Raw:
    """What a source yields before splitting; `x_test` is None when it has no test split."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    labels: tuple[str, ...]
    scale: float
    source: str


def load(config: DataConfig) -> Splits:
    """Read the configured source and split it; raises `DataError` on anything unreadable."""
    readers = {"digits": _read_digits, "idx": _read_idx_dir, "folder": _read_image_folder, "npz": _read_npz}
    raw = readers[config.dataset](config)
    _check_finite(raw)
    if config.image_size is not None and raw.x.shape[2:] != tuple(config.image_size):
        raw = _resized(raw, config.image_size)  # a folder's images were resized as they were read
    return _split(raw, config)


def _resized(raw: _Raw, size: tuple[int, int]) -> _Raw:
    """Every image resized to `size` (H, W) with the bilinear filter `load_image` uses, in the source's own range."""
    from PIL import Image

    def resize(x: np.ndarray) -> np.ndarray:
        out = np.empty((*x.shape[:2], *size), dtype=np.float32)
        for i, image in enumerate(x):
            for c, plane in enumerate(image):  # mode "F": 32-bit float planes, no rounding to 8 bits
                resized = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
                out[i, c] = np.asarray(resized.resize((size[1], size[0]), Image.Resampling.BILINEAR))
        return out

    return replace(raw, x=resize(raw.x), x_test=None if raw.x_test is None else resize(raw.x_test),
                   source=f"{raw.source}, resized to {size[0]}x{size[1]}")


def load_trained_on(config: DataConfig, fingerprint: str | None, what: str) -> Splits:
    """`load`, refusing data that is not what `what` (a run or checkpoint) was trained on.

    Test accuracy, calibration and parity are only comparable on the same splits.
    """
    splits = load(config)
    if splits.fingerprint != fingerprint:
        raise DataError(f"{what}: the data at {config.data_dir or splits.source} is not the data it was trained on "
                        "(fingerprint mismatch): test accuracy and calibration would not be comparable")
    return splits


# --- sources ---------------------------------------------------------------------------


def _read_digits(config: DataConfig) -> _Raw:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]
    return _Raw(x, digits.target.astype(np.int64), None, None, tuple(str(i) for i in range(10)),
                scale=1.0 / 16.0, source="scikit-learn digits (8x8, 0-16)")


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzip or raw) -> numpy array, validating the header against the payload."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read IDX file: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype = np.dtype(IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    """The IDX file of a split ('train' or 'test') and kind ('images' or 'labels'), if present."""
    prefixes = ("train",) if split == "train" else ("t10k", "test")
    ndim = "3" if kind == "images" else "1"
    matches = sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(prefixes)
                     and (f"idx{ndim}" in p.name or kind in p.name))
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise DataError(f"{folder}: several {split} {kind} files ({names}); keep one")
    return matches[0] if matches else None


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim not in (3, 4):
        raise DataError(f"{images_path}: expected N x H x W images, got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a vector of labels, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path.name} holds {len(images)} images but {labels_path.name} holds {len(labels)} labels")
    x = images.astype(np.float32)
    x = x[:, None] if x.ndim == 3 else np.moveaxis(x, -1, 1)
    return x, labels.astype(np.int64)


def _read_idx_dir(config: DataConfig) -> _Raw:
    folder = _existing_dir(config.data_dir)
    found = {(s, k): _find_idx(folder, s, k) for s in ("train", "test") for k in ("images", "labels")}
    splits = {}
    for split in ("train", "test"):
        images, labels = found[(split, "images")], found[(split, "labels")]
        if (images is None) != (labels is None):
            raise DataError(f"{folder}: {split} {'labels' if labels is None else 'images'} file is missing")
        if images is not None:
            splits[split] = _read_idx_pair(images, labels)
    if not splits:
        raise DataError(f"{folder}: no IDX files (expected names like train-images-idx3-ubyte[.gz] or t10k-labels-idx1-ubyte[.gz])")
    parts = list(splits.values())
    if len(parts) == 2 and parts[0][0].shape[1:] != parts[1][0].shape[1:]:
        raise DataError(f"{folder}: train images are {parts[0][0].shape[1:]} but test images are {parts[1][0].shape[1:]}")
    num_classes = int(max(y.max() for _, y in parts)) + 1
    _check_labels(np.concatenate([y for _, y in parts]), num_classes, str(folder))
    x, y = parts[0]
    x_test, y_test = (parts[1] if len(parts) == 2 else (None, None))
    source = f"IDX {folder} ({', '.join(splits)} split{'s' if len(splits) > 1 else ''})"
    return _Raw(x, y, x_test, y_test, tuple(str(i) for i in range(num_classes)), _scale_for(x), source)


def load_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """One PNG/JPEG -> raw pixels (channels, H, W) float32 in 0-255, resized to `size` (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image: {exc}") from None
    return pixels[None] if channels == 1 else np.moveaxis(pixels, -1, 0)


def _read_image_folder(config: DataConfig) -> _Raw:
    from PIL import Image, UnidentifiedImageError

    folder = _existing_dir(config.data_dir)
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    files = {name: paths for name, paths in files.items() if paths}
    if len(files) < 2:
        raise DataError(f"{folder}: need at least 2 class sub-folders holding PNG/JPEG images, found {len(files)}")
    channels = config.channels
    if channels is None:
        def is_gray(path: Path) -> bool:
            try:
                with Image.open(path) as image:
                    return image.mode in ("L", "1", "I", "I;16", "LA")
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"{path}: unreadable image: {exc}") from None
        channels = 1 if all(is_gray(p) for paths in files.values() for p in paths) else 3
    x, y = [], []
    for label, paths in enumerate(files.values()):
        for path in paths:
            x.append(load_image(path, config.image_size, channels))
            y.append(label)
    return _Raw(np.stack(x), np.asarray(y, dtype=np.int64), None, None, tuple(files), 1.0 / 255.0,
                f"image folder {folder} ({len(x)} images, {len(files)} classes)")


def _read_npz(config: DataConfig) -> _Raw:
    path = Path(config.data_dir)
    if not path.is_file():
        raise DataError(f"{path}: no such .npz file")
    try:
        # allow_pickle=False: a .npz from the internet must not run code when opened.
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in archive.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file: {exc}") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays)
    if missing:
        raise DataError(f"{path}: missing arrays {sorted(missing)} (expected x_train, y_train, x_test, y_test)")
    xs = [_npz_images(arrays[k], path, k) for k in ("x_train", "x_test")]
    ys = [_npz_labels(arrays[k], path, k) for k in ("y_train", "y_test")]
    for x, y, name in zip(xs, ys, ("train", "test"), strict=True):
        if len(x) != len(y):
            raise DataError(f"{path}: x_{name} holds {len(x)} images but y_{name} holds {len(y)} labels")
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise DataError(f"{path}: x_train images are {xs[0].shape[1:]} but x_test images are {xs[1].shape[1:]}")
    num_classes = int(max(ys[0].max(), ys[1].max())) + 1
    _check_labels(np.concatenate(ys), num_classes, str(path))
    scale = 1.0 / 255.0 if arrays["x_train"].dtype == np.uint8 else _scale_for(xs[0])
    return _Raw(xs[0], ys[0], xs[1], ys[1], tuple(str(i) for i in range(num_classes)), scale, f"npz {path}")


def _npz_images(array: np.ndarray, path: Path, key: str) -> np.ndarray:
    if array.dtype.kind not in "uif":
        raise DataError(f"{path}: {key} has dtype {array.dtype}, expected numbers")
    if array.ndim == 3:  # N x H x W, as Keras' mnist.npz
        return array.astype(np.float32)[:, None]
    if array.ndim == 4 and array.shape[-1] in (1, 3):  # N x H x W x C, channels last
        return np.moveaxis(array.astype(np.float32), -1, 1)
    raise DataError(f"{path}: {key} has shape {array.shape}, expected N x H x W or N x H x W x C (C = 1 or 3)")


def _npz_labels(array: np.ndarray, path: Path, key: str) -> np.ndarray:
    if array.ndim != 1 or array.dtype.kind not in "ui" or len(array) == 0:
        raise DataError(f"{path}: {key} must be a non-empty vector of integer labels, got {array.dtype} {array.shape}")
    return array.astype(np.int64)


# --- checks and splitting ---------------------------------------------------------------


def _existing_dir(path: Path | None) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such data folder")
    return path


def _scale_for(x: np.ndarray) -> float:
    """8-bit pixels are scaled by 1/255; data already in [0, 1] is left as it is."""
    return 1.0 if float(np.max(x)) <= 1.0 else 1.0 / 255.0


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    if y.min() < 0:
        raise DataError(f"{where}: label {int(y.min())} is out of range (labels must be 0..K-1)")
    present = np.unique(y)
    if len(present) < 2:
        raise DataError(f"{where}: need at least 2 classes, found {len(present)}")
    if num_classes > 1000:
        raise DataError(f"{where}: label {num_classes - 1} is out of range (at most 1000 classes)")


def _check_finite(raw: _Raw) -> None:
    for name, x in (("images", raw.x), ("test images", raw.x_test)):
        if x is not None and not np.all(np.isfinite(x)):
            raise DataError(f"{raw.source}: {name} contain {int(np.sum(~np.isfinite(x)))} NaN or infinite values")


def _stratified(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, what: str):
    from sklearn.model_selection import train_test_split

    # At least one image of each class on the held-out side, so tiny datasets still split.
    held_out = max(math.ceil(fraction * len(y)), len(np.unique(y)))
    try:
        return train_test_split(x, y, test_size=held_out, stratify=y, random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot split off a stratified {what} set: {exc}") from None


def _split(raw: _Raw, config: DataConfig) -> Splits:
    if raw.x_test is None:
        x, x_test, y, y_test = _stratified(raw.x, raw.y, config.test_fraction, config.seed, "test")
    else:
        x, y, x_test, y_test = raw.x, raw.y, raw.x_test, raw.y_test
    x_train, x_val, y_train, y_val = _stratified(x, y, config.val_fraction, config.seed + 1, "validation")
    if config.max_train_samples is not None and config.max_train_samples < len(y_train):
        x_train, _, y_train, _ = _stratified(x_train, y_train, 1 - config.max_train_samples / len(y_train),
                                             config.seed + 2, "reduced training")
    preprocess = _measure_preprocess(x_train, raw.scale)
    arrays = [np.ascontiguousarray(a) for a in (x_train, y_train, x_val, y_val, x_test, y_test)]
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(array.tobytes())
    return Splits(*arrays, labels=raw.labels, preprocess=preprocess, source=raw.source, fingerprint=digest.hexdigest())


def _measure_preprocess(x_train: np.ndarray, scale: float) -> Preprocess:
    scaled = x_train.astype(np.float64) * scale
    mean = scaled.mean(axis=(0, 2, 3))
    std = np.maximum(scaled.std(axis=(0, 2, 3)), 1e-6)  # a constant channel must not divide by 0
    return Preprocess(size=(int(x_train.shape[2]), int(x_train.shape[3])), channels=int(x_train.shape[1]),
                      scale=float(scale), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
