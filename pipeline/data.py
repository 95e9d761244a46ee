"""Dataset sources -> raw pixel arrays, seeded stratified splits and the preprocessing contract.

Imports only numpy (and Pillow / scikit-learn inside the functions that need them), so that
`predict` and other torch-free consumers can reuse `Preprocess` and `load_image`.

Raw pixels are kept as float32 N x C x H x W in the source's own range (0-16 for digits,
0-255 for 8-bit images). The model sees `Preprocess.apply(raw)`:
    input = ((raw * scale) - mean[c]) / std[c]
with mean and std measured on the training split only.

Image folders are decoded once into the cache of `pipeline.folder` and their splits are
`LazyImages`: index arrays into the cache, read (uint8) and normalized batch by batch, so no
command holds a whole folder in memory. In-memory sources (digits, IDX, npz) stay numpy arrays.
Both index the same way (`x[i:j]`, `x[index_array]` -> numpy arrays).

`reading(...)` sets, for the commands inside it, a progress callback for decoding and where a
run's data is now (`data_dir`, `cache_dir`: they override the recorded locations in
`load_trained_on`; the fingerprint still decides whether it is the same data).
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline import folder
from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.images import (  # noqa: F401  (load_image, IMAGE_SUFFIXES: re-exported for readers of single files)
    IMAGE_SUFFIXES,
    fit,
    load_image,
)

# IDX element types (third byte of the magic number) -> numpy big-endian dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class LazyImages:
    """(N, C, H, W) images read on demand. Indexing with an int, a slice or an integer array returns a
    numpy array of just those images; `subset` and `map` return new lazy views. `np.asarray` reads all
    of them: fine for small sets, what batch-wise code avoids."""

    def __init__(self, read: Callable[[np.ndarray], np.ndarray], count: int, item_shape: tuple[int, ...],
                 dtype) -> None:
        self._read, self._count, self._item_shape, self.dtype = read, int(count), tuple(item_shape), np.dtype(dtype)

    @classmethod
    def of_store(cls, store: folder.ImageStore) -> LazyImages:
        return cls(store.read, len(store), store.shape, np.uint8)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._count, *self._item_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self._item_shape)

    def __len__(self) -> int:
        return self._count

    def _positions(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(self._count)[key]
        index = np.asarray(key)
        if index.dtype == bool:
            return np.flatnonzero(index)
        index = index.astype(np.int64).reshape(-1)
        if index.size and (index.min() < -self._count or index.max() >= self._count):
            raise IndexError(f"index out of range for {self._count} images")
        return np.where(index < 0, index + self._count, index)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(self._positions([key]))[0]
        return self._read(self._positions(key))

    def subset(self, index: np.ndarray) -> LazyImages:
        index = np.asarray(index, dtype=np.int64)
        return LazyImages(lambda i: self._read(index[i]), len(index), self._item_shape, self.dtype)

    def map(self, fn: Callable[[np.ndarray], np.ndarray], dtype) -> LazyImages:
        """A view whose batches are `fn(batch)`: normalization happens per batch."""
        return LazyImages(lambda i: fn(self._read(i)), self._count, self._item_shape, dtype)

    def astype(self, dtype) -> LazyImages:
        return self.map(lambda batch: batch.astype(dtype), dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._read(np.arange(self._count))
        return whole if dtype is None else whole.astype(dtype)


@dataclass(frozen=True)
class Reading:
    """What the commands inside `reading(...)` use when they read data."""

    on_progress: folder.Progress | None = None
    data_dir: Path | None = None
    cache_dir: Path | None = None


_READING: contextvars.ContextVar[Reading | None] = contextvars.ContextVar("pipeline_data_reading", default=None)


def _current_reading() -> Reading:
    return _READING.get() or Reading()


@contextlib.contextmanager
def reading(on_progress: folder.Progress | None = None, data_dir: Path | None = None,
            cache_dir: Path | None = None) -> Iterator[Reading]:
    """Decode progress and data locations for every read inside (the CLI sets them from its options)."""
    token = _READING.set(Reading(on_progress, Path(data_dir).resolve() if data_dir else None,
                                 Path(cache_dir).resolve() if cache_dir else None))
    try:
        yield _current_reading()
    finally:
        _READING.reset(token)


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

    def apply(self, raw):
        """Raw pixels (N, C, H, W) -> normalized float32 model input; `LazyImages` stay lazy (normalized per batch)."""
        if isinstance(raw, LazyImages):
            if raw.shape[1:] != (self.channels, *self.size):
                raise DataError(f"expected images of shape (N, {self.channels}, {self.size[0]}, {self.size[1]}), "
                                f"got {tuple(raw.shape)}")
            return raw.map(self.apply, np.float32)
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
    """Train / validation / test raw pixels and integer labels, with what describes them.

    The pixels are numpy arrays for in-memory sources and `LazyImages` (uint8, read from the
    decoded cache per batch) for image folders; both index the same way.
    """

    x_train: np.ndarray | LazyImages
    y_train: np.ndarray
    x_val: np.ndarray | LazyImages
    y_val: np.ndarray
    x_test: np.ndarray | LazyImages
    y_test: np.ndarray
    labels: tuple[str, ...]
    preprocess: Preprocess
    source: str
    fingerprint: str
    bad: tuple[tuple[str, str], ...] = ()
    """(file, reason) of unreadable images left out (`--on-bad-image skip`)."""
    ignored: tuple[tuple[str, str], ...] = ()
    """(file, reason) of files in the source that are not read as images (not an image, outside a class folder)."""
    cache: dict | None = None
    """Image folders: the decoded cache entry the splits read ({"fingerprint", "path", "images"})."""

    def sizes(self) -> dict:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def record(self, config: DataConfig) -> dict:
        """The manifest's "dataset" section: where the data came from, what was left out, how it was split."""
        from pipeline.config import to_dict

        return {"source": self.source, "fingerprint": self.fingerprint, "sizes": self.sizes(),
                "config": to_dict(config), "skipped_images": len(self.bad), "ignored_files": len(self.ignored),
                **({"cache": self.cache} if self.cache else {})}

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


def load(config: DataConfig, on_progress: folder.Progress | None = None) -> Splits:
    """Read the configured source and split it; raises `DataError` on anything unreadable.

    An image folder is decoded into the cache first unless it is there already (`on_progress`,
    else the one of `reading(...)`, hears how far the decoding is).
    """
    if config.dataset == "folder":
        return _load_folder(config, on_progress or _current_reading().on_progress)
    readers = {"digits": _read_digits, "idx": _read_idx_dir, "npz": _read_npz}
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

    Test accuracy, calibration and parity are only comparable on the same splits. Inside
    `reading(data_dir=..., cache_dir=...)` those replace the recorded locations. An image folder
    that is no longer there is read from the cache entry with the recorded fingerprint.
    """
    where = _current_reading()
    if where.data_dir is not None:
        config = replace(config, data_dir=where.data_dir)
    if where.cache_dir is not None:
        config = replace(config, cache_dir=where.cache_dir)
    if config.dataset == "folder" and not Path(config.data_dir).is_dir():
        return _from_cache(config, fingerprint, what)
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


def bad_files_error(root: Path | str, bad: list[tuple[str, str]]) -> DataError:
    """One line naming every unreadable file, with what to do about it."""
    listed = "; ".join(f"{name} ({reason})" for name, reason in bad)
    return DataError(f"{root}: {len(bad)} unreadable image file{'s' if len(bad) > 1 else ''}: {listed}; "
                     "pass --on-bad-image skip to leave them out (they are then listed in the run folder)")


def _load_folder(config: DataConfig, on_progress) -> Splits:
    listing = folder.list_folder(config.data_dir)
    store = folder.build(listing, config.image_size, config.channels, config.resize,
                         folder.cache_root(config.cache_dir), on_progress)
    return _split_store(store, config, listing.root)


def _split_store(store: folder.ImageStore, config: DataConfig, root: Path | str) -> Splits:
    """Splits of a decoded folder: index arrays into the cache, read batch by batch, never all at once."""
    bad = sorted((name, reason) for name, reason in zip(store.files, store.status, strict=True) if reason is not None)
    if bad and config.on_bad_image == "fail":
        raise bad_files_error(root, bad)
    keep = np.asarray([i for i, reason in enumerate(store.status) if reason is None], dtype=np.int64)
    present = np.unique(store.labels[keep])
    if len(present) < 2:
        raise DataError(f"{root}: fewer than 2 classes hold readable images")
    classes = tuple(store.classes[k] for k in present)  # a class whose every image is bad is no class
    relabel = np.full(len(store.classes), -1, dtype=np.int64)
    relabel[present] = np.arange(len(present))
    y = relabel[store.labels[keep]]
    train, val, test = split_indices(y, None, classes, config)
    mean, std = store.mean_std(keep[train])
    scale = 1.0 / 255.0
    preprocess = Preprocess(size=tuple(store.shape[1:]), channels=store.shape[0], scale=scale,
                            mean=tuple(float(m * scale) for m in mean),
                            std=tuple(float(max(s * scale, 1e-6)) for s in std), resize=store.index["resize"])
    everything = LazyImages.of_store(store)
    digest = hashlib.sha256(store.fingerprint.encode())
    for part in (train, val, test):
        digest.update(keep[part].tobytes())
        digest.update(y[part].tobytes())
    source = (f"image folder {root} ({len(keep)} images, {len(classes)} classes"
              + (f", {len(bad)} unreadable skipped" if bad else "") + ")")
    ignored = tuple((str(name), str(reason)) for name, reason in store.index.get("ignored", []))
    return Splits(everything.subset(keep[train]), y[train], everything.subset(keep[val]), y[val],
                  everything.subset(keep[test]), y[test], labels=classes, preprocess=preprocess, source=source,
                  fingerprint=digest.hexdigest(), bad=tuple(bad), ignored=ignored,
                  cache={"fingerprint": store.fingerprint, "path": str(store.folder), "images": len(store)})


def _from_cache(config: DataConfig, fingerprint: str | None, what: str) -> Splits:
    """The splits of the cache entry that holds what `what` was trained on, when its source folder is gone."""
    root = folder.cache_root(config.cache_dir)
    for store in folder.stores(root):
        requested = store.index.get("requested", {})
        if store.index.get("resize") != config.resize or requested.get("channels") != config.channels or \
                (requested.get("image_size") or None) != (list(config.image_size) if config.image_size else None):
            continue
        try:
            splits = _split_store(store, config, store.index.get("source", store.folder))
        except DataError:
            continue
        if splits.fingerprint == fingerprint:
            return splits
    raise DataError(f"{what}: the image folder {config.data_dir} is not there and no entry of the image cache {root} "
                    "holds the data it was trained on: pass --data-dir (the folder, wherever it is now) "
                    "or --cache-dir (a cache that holds it)")


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
    return Splits(*arrays, labels=raw.labels, preprocess=preprocess, source=raw.source, fingerprint=digest.hexdigest())


def _measure_preprocess(x_train: np.ndarray, scale: float, resize: str = "squash") -> Preprocess:
    scaled = x_train.astype(np.float64) * scale
    mean = scaled.mean(axis=(0, 2, 3))
    std = np.maximum(scaled.std(axis=(0, 2, 3)), 1e-6)  # a constant channel must not divide by 0
    return Preprocess(size=(int(x_train.shape[2]), int(x_train.shape[3])), channels=int(x_train.shape[1]),
                      scale=float(scale), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                      resize=resize)
