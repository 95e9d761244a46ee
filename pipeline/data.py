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
from pipeline.images import (  # noqa: F401  (load_image, IMAGE_SUFFIXES: re-exported for readers of single files)
    GRAY_MODES,
    IMAGE_SUFFIXES,
    UnreadableImageError,
    decode,
    fit,
    is_hidden,
    is_image_name,
    load_image,
    probe,
)

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
    resize: str = "squash"
    """How an image of another size or aspect ratio becomes `size`: squash, crop or pad (`pipeline.images`)."""

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw pixels (N, C, H, W) -> normalized float32 model input."""
        if raw.ndim != 4 or raw.shape[1:] != (self.channels, *self.size):
            raise DataError(f"expected images of shape (N, {self.channels}, {self.size[0]}, {self.size[1]}), got {tuple(raw.shape)}")
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return ((raw.astype(np.float32) * np.float32(self.scale) - mean) / std).astype(np.float32)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "channels": self.channels, "scale": self.scale,
                "mean": list(self.mean), "std": list(self.std), "resize": self.resize}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        try:
            return cls(size=(int(data["size"][0]), int(data["size"][1])), channels=int(data["channels"]),
                       scale=float(data["scale"]), mean=tuple(float(m) for m in data["mean"]),
                       std=tuple(float(s) for s in data["std"]), resize=str(data.get("resize", "squash")))
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
    bad: tuple[tuple[str, str], ...] = ()
    """(file, reason) of unreadable images left out (`--on-bad-image skip`)."""
    ignored: tuple[tuple[str, str], ...] = ()
    """(file, reason) of files in the source that are not read as images (not an image, outside a class folder)."""

    def sizes(self) -> dict:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def record(self, config: DataConfig) -> dict:
        """The manifest's "dataset" section: where the data came from, what was left out, how it was split."""
        from pipeline.config import to_dict

        return {"source": self.source, "fingerprint": self.fingerprint, "sizes": self.sizes(),
                "config": to_dict(config), "skipped_images": len(self.bad), "ignored_files": len(self.ignored)}

    def skipped_record(self) -> dict:
        """`skipped_images.json`: every file of the source that is not in the splits, and why."""
        return {"source": self.source, "unreadable": [{"file": f, "reason": r} for f, r in self.bad],
                "ignored": [{"file": f, "reason": r} for f, r in self.ignored]}


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
    resize: str = "squash"
    bad: tuple[tuple[str, str], ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()


def load(config: DataConfig) -> Splits:
    """Read the configured source and split it; raises `DataError` on anything unreadable."""
    readers = {"digits": _read_digits, "idx": _read_idx_dir, "folder": _read_image_folder, "npz": _read_npz}
    raw = readers[config.dataset](config)
    _check_finite(raw)
    if config.image_size is not None and raw.x.shape[2:] != tuple(config.image_size):
        raw = _resized(raw, config.image_size, config.resize)  # a folder's images were resized as they were read
    return _split(raw, config)


def _resized(raw: _Raw, size: tuple[int, int], mode: str) -> _Raw:
    """Every image resized to `size` (H, W) as `images.fit` does for files, in the source's own range."""
    from PIL import Image

    def resize(x: np.ndarray) -> np.ndarray:
        out = np.empty((*x.shape[:2], *size), dtype=np.float32)
        for i, image in enumerate(x):
            for c, plane in enumerate(image):  # mode "F": 32-bit float planes, no rounding to 8 bits
                resized = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
                out[i, c] = np.asarray(fit(resized, size, mode))
        return out

    return replace(raw, x=resize(raw.x), x_test=None if raw.x_test is None else resize(raw.x_test), resize=mode,
                   source=f"{raw.source}, resized to {size[0]}x{size[1]}" + ("" if mode == "squash" else f" ({mode})"))


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


@dataclass(frozen=True)
class FolderListing:
    """The image files of a class-per-folder source, found but not decoded.

    A class is a top-level sub-folder; images in sub-folders below it (`cats/2019/a.jpg`) belong to
    that class. Hidden files and folders (`.DS_Store`, `._a.png` resource forks) are never images.
    Everything else that is not taken as an image is listed in `ignored`, with the reason.
    """

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    """Paths relative to `root`, POSIX style, sorted within each class."""
    labels: np.ndarray
    stats: tuple[tuple[int, int], ...]
    """(size in bytes, mtime in ns) of every file: what decides whether a decoded cache is still current."""
    ignored: tuple[tuple[str, str], ...]
    """(relative path, reason) of files that are not read: not an image, not inside a class folder."""


def list_folder(folder: Path) -> FolderListing:
    """Walk a class-per-folder source; `DataError` if it has fewer than 2 classes holding images."""
    import os

    folder = _existing_dir(folder)
    ignored: list[tuple[str, str]] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and not is_hidden(entry.name):
            reason = "an image outside any class folder" if is_image_name(entry.name) else "not a class folder"
            ignored.append((entry.name, reason))
    classes, files, labels, stats = [], [], [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name)):
        found = []
        for top, dirs, names in os.walk(class_dir):
            dirs[:] = sorted(d for d in dirs if not is_hidden(d))
            for name in names:
                if is_hidden(name):
                    continue
                relative = Path(top, name).relative_to(folder).as_posix()
                if is_image_name(name):
                    found.append(relative)
                else:
                    ignored.append((relative, f"not an image ({', '.join(IMAGE_SUFFIXES)})"))
        if not found:
            ignored.append((class_dir.name + "/", "a folder without images: not a class"))
            continue
        for relative in sorted(found):
            info = (folder / relative).stat()
            files.append(relative)
            labels.append(len(classes))
            stats.append((info.st_size, info.st_mtime_ns))
        classes.append(class_dir.name)
    if len(classes) < 2:
        raise DataError(f"{folder}: need at least 2 class sub-folders holding images ({', '.join(IMAGE_SUFFIXES)}), "
                        f"found {len(classes)}")
    return FolderListing(folder, tuple(classes), tuple(files), np.asarray(labels, dtype=np.int64), tuple(stats),
                         tuple(sorted(ignored)))


def decide_shape(listing: FolderListing, probes: list, config: DataConfig) -> tuple[tuple[int, int], int]:
    """((H, W), channels) of the decoded images: as configured, else from the headers of the readable files.

    `probes` holds (mode, (H, W)) per file, or None for a file whose header is unreadable.
    """
    readable = [p for p in probes if p is not None]
    if not readable:
        raise DataError(f"{listing.root}: none of the {len(probes)} image files is readable")
    channels = config.channels or (1 if all(mode in GRAY_MODES for mode, _ in readable) else 3)
    if config.image_size is not None:
        return tuple(config.image_size), channels
    sizes: dict[tuple[int, int], int] = {}
    for _, size in readable:
        sizes[size] = sizes.get(size, 0) + 1
    if len(sizes) > 1:
        common = ", ".join(f"{h}x{w} ({n} images)" for (h, w), n in sorted(sizes.items(), key=lambda kv: -kv[1])[:5])
        raise DataError(f"{listing.root}: the images have {len(sizes)} different sizes ({common}); "
                        "pass --image-size HxW, and --resize squash|pad|crop for other aspect ratios")
    return next(iter(sizes)), channels


def bad_files_error(root: Path, bad: list[tuple[str, str]]) -> DataError:
    """One line naming every unreadable file, with what to do about it."""
    listed = "; ".join(f"{name} ({reason})" for name, reason in bad)
    return DataError(f"{root}: {len(bad)} unreadable image file{'s' if len(bad) > 1 else ''}: {listed}; "
                     "pass --on-bad-image skip to leave them out (they are then listed in the run folder)")


def _read_image_folder(config: DataConfig) -> _Raw:
    listing = list_folder(config.data_dir)
    probes, bad = [], []
    for relative in listing.files:
        try:
            probes.append(probe(listing.root / relative))
        except UnreadableImageError as exc:
            probes.append(None)
            bad.append((relative, exc.reason))
    size, channels = decide_shape(listing, probes, config)
    x = np.zeros((len(listing.files), channels, *size), dtype=np.uint8)
    for i, relative in enumerate(listing.files):
        if probes[i] is None:
            continue
        try:
            x[i] = decode(listing.root / relative, size, channels, config.resize)
        except UnreadableImageError as exc:
            bad.append((relative, exc.reason))
    return _folder_raw(listing, x, bad, config)


def _folder_raw(listing: FolderListing, x, bad: list[tuple[str, str]], config: DataConfig) -> _Raw:
    """The readable images of a folder source, after the bad-image policy."""
    bad = sorted(bad)
    if bad and config.on_bad_image == "fail":
        raise bad_files_error(listing.root, bad)
    bad_names = {name for name, _ in bad}
    keep = np.asarray([i for i, name in enumerate(listing.files) if name not in bad_names], dtype=np.int64)
    y = listing.labels[keep]
    classes = [c for k, c in enumerate(listing.classes) if np.any(y == k)]
    if len(classes) < 2:
        raise DataError(f"{listing.root}: fewer than 2 classes hold readable images")
    if len(classes) < len(listing.classes):  # a class whose every image is bad: relabel the rest 0..K-1
        old_to_new = {listing.classes.index(c): k for k, c in enumerate(classes)}
        y = np.asarray([old_to_new[int(v)] for v in y], dtype=np.int64)
    text = (f"image folder {listing.root} ({len(keep)} images, {len(classes)} classes"
            + (f", {len(bad)} unreadable skipped" if bad else "") + ")")
    return _Raw(_take(x, keep), y, None, None, tuple(classes), 1.0 / 255.0, text,
                resize=config.resize, bad=tuple(bad), ignored=listing.ignored)


def _take(x, keep: np.ndarray):
    return x[keep].astype(np.float32) if len(keep) < len(x) else x.astype(np.float32)


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


def _check_class_sizes(y: np.ndarray, labels: tuple[str, ...], needed: int, what: str) -> None:
    """Every class must have `needed` images for the stratified splits; name the ones that do not."""
    counts = np.bincount(y, minlength=len(labels))
    short = [f"class {labels[k]!r} has {int(n)} image{'' if n == 1 else 's'}" for k, n in enumerate(counts) if 0 < n < needed]
    if short:
        raise DataError(f"{'; '.join(short)}; each class needs at least {needed} for a stratified split ({what})")


def _stratified(y: np.ndarray, index: np.ndarray, fraction: float, seed: int, what: str,
                labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) positions of `index`, stratified by the labels `y[index]`."""
    from sklearn.model_selection import train_test_split

    classes = len(np.unique(y[index]))
    # At least one image of each class on the held-out side, so tiny datasets still split.
    held_out = max(math.ceil(fraction * len(index)), classes)
    try:
        kept, out = train_test_split(index, test_size=held_out, stratify=y[index], random_state=seed)
    except ValueError as exc:
        counts = np.bincount(y[index], minlength=len(labels))
        smallest = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        raise DataError(f"cannot split off a stratified {what} set of {held_out} from {len(index)} images "
                        f"({classes} classes, the smallest {labels[smallest]!r} with {int(counts[smallest])}): "
                        f"{' '.join(str(exc).split())}") from None
    return kept, out


def split_indices(y: np.ndarray, y_test: np.ndarray | None, labels: tuple[str, ...],
                  config: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(train, validation, test) positions into `y` (test None: the source has its own test split)."""
    own_test = y_test is not None
    _check_class_sizes(y, labels, 2 if own_test else 3,
                       "training and validation" if own_test else "training, validation and test")
    index = np.arange(len(y))
    test = None
    if not own_test:
        index, test = _stratified(y, index, config.test_fraction, config.seed, "test", labels)
    train, val = _stratified(y, index, config.val_fraction, config.seed + 1, "validation", labels)
    if config.max_train_samples is not None and config.max_train_samples < len(train):
        train, _ = _stratified(y, train, 1 - config.max_train_samples / len(train), config.seed + 2,
                               "reduced training", labels)
    return train, val, test


def _split(raw: _Raw, config: DataConfig) -> Splits:
    train, val, test = split_indices(raw.y, raw.y_test, raw.labels, config)
    x_test, y_test = (raw.x[test], raw.y[test]) if test is not None else (raw.x_test, raw.y_test)
    x_train, y_train, x_val, y_val = raw.x[train], raw.y[train], raw.x[val], raw.y[val]
    preprocess = _measure_preprocess(x_train, raw.scale, raw.resize)
    arrays = [np.ascontiguousarray(a) for a in (x_train, y_train, x_val, y_val, x_test, y_test)]
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(array.tobytes())
    return Splits(*arrays, labels=raw.labels, preprocess=preprocess, source=raw.source, fingerprint=digest.hexdigest(),
                  bad=raw.bad, ignored=raw.ignored)


def _measure_preprocess(x_train: np.ndarray, scale: float, resize: str = "squash") -> Preprocess:
    scaled = x_train.astype(np.float64) * scale
    mean = scaled.mean(axis=(0, 2, 3))
    std = np.maximum(scaled.std(axis=(0, 2, 3)), 1e-6)  # a constant channel must not divide by 0
    return Preprocess(size=(int(x_train.shape[2]), int(x_train.shape[3])), channels=int(x_train.shape[1]),
                      scale=float(scale), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                      resize=resize)
