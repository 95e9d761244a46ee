"""Image-folder sources: the listing, and the decoded-image cache every command streams from.

A folder of photos is decoded once, in parallel worker processes, into a cache entry:

    <cache dir>/<key>/images.npy   uint8 (N, C, H, W), every listed file in listing order
    <cache dir>/<key>/moments.npy  float64 (N, 2, C) per-file channel sums and sums of squares
    <cache dir>/<key>/index.json   classes, files, labels, per-file status (None or why it is unreadable),
                                   the decode settings and `fingerprint`, the sha256 of the content

The cache dir is `DataConfig.cache_dir`, else $PIPELINE_CACHE_DIR, else ~/.cache/pipeline. The key
hashes the listing (relative path, size and mtime of every file) and the decode settings, so a
changed, added or removed file makes a new entry, and the second command on an unchanged folder
decodes nothing. The entry is written in a temporary folder renamed into place: a killed decode
leaves no half entry. Readers take rows with `pread` (`ImageStore.read`), not through a memory
map: mapped pages count towards the process's resident memory, read pages stay in the page
cache only, so memory stays bounded by the batch, whatever the number of images. The file is a
plain `.npy`; `np.load(path, mmap_mode="r")` opens it for anyone else.

`fingerprint` hashes the pixels, labels, class names and statuses, not paths or times: a copy of
the folder on another machine decodes to the same fingerprint, and a run made on one can be
exported on the other. Imports numpy and Pillow only.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import images
from pipeline.errors import DataError

log = logging.getLogger(__name__)
CACHE_FORMAT = "pipeline-image-cache-v1"
CACHE_ENV = "PIPELINE_CACHE_DIR"
WORKERS_ENV = "PIPELINE_DECODE_WORKERS"
IMAGES = "images.npy"
INDEX = "index.json"
MOMENTS = "moments.npy"
CHUNK = 256
"""Files per worker task: small enough for a smooth progress bar, large enough to amortize the pickling."""
PARALLEL_FROM = 512
"""Fewer files than this are decoded in this process: starting workers would cost more than it saves."""

Progress = Callable[[str, int, int], None]
"""on_progress(stage, done, total): stage is "probe" (reading headers) or "decode"."""


def cache_root(configured: Path | None) -> Path:
    """The cache folder: as configured, else $PIPELINE_CACHE_DIR, else ~/.cache/pipeline."""
    if configured is not None:
        return Path(configured)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pipeline").expanduser()


def default_workers() -> int:
    """$PIPELINE_DECODE_WORKERS, else every core this process may run on."""
    if os.environ.get(WORKERS_ENV):
        return max(1, int(os.environ[WORKERS_ENV]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --- the listing ---------------------------------------------------------------------------


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
    """(size in bytes, mtime in ns) of every file: what decides whether a cache entry is still current."""
    ignored: tuple[tuple[str, str], ...]
    """(relative path, reason) of files that are not read: not an image, not inside a class folder."""

    def key(self, size: tuple[int, int] | None, channels: int | None, resize: str) -> str:
        """The cache entry's name: the listing and the decode settings, hashed."""
        digest = hashlib.sha256(json.dumps([CACHE_FORMAT, list(size) if size else None, channels, resize,
                                            self.classes]).encode())
        for name, (size_bytes, mtime) in zip(self.files, self.stats, strict=True):
            digest.update(f"\0{name}\0{size_bytes}\0{mtime}".encode())
        return digest.hexdigest()[:32]


def list_folder(folder: Path) -> FolderListing:
    """Walk a class-per-folder source; `DataError` if it has fewer than 2 classes holding images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder")
    ignored: list[tuple[str, str]] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and not images.is_hidden(entry.name):
            reason = "an image outside any class folder" if images.is_image_name(entry.name) else "not a class folder"
            ignored.append((entry.name, reason))
    classes, files, labels, stats = [], [], [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not images.is_hidden(p.name)):
        found = []
        for top, dirs, names in os.walk(class_dir):
            dirs[:] = sorted(d for d in dirs if not images.is_hidden(d))
            for name in names:
                if images.is_hidden(name):
                    continue
                relative = Path(top, name).relative_to(folder).as_posix()
                if images.is_image_name(name):
                    found.append(relative)
                else:
                    ignored.append((relative, f"not an image ({', '.join(images.IMAGE_SUFFIXES)})"))
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
        raise DataError(f"{folder}: need at least 2 class sub-folders holding images ({', '.join(images.IMAGE_SUFFIXES)}), "
                        f"found {len(classes)}")
    return FolderListing(folder, tuple(classes), tuple(files), np.asarray(labels, dtype=np.int64), tuple(stats),
                         tuple(sorted(ignored)))


def decide_shape(root: Path, probes: list, image_size: tuple[int, int] | None,
                 channels: int | None) -> tuple[tuple[int, int], int]:
    """((H, W), channels) of the decoded images: as configured, else from the headers of the readable files.

    `probes` holds (mode, (H, W)) per file, or a reason string for a file whose header is unreadable.
    """
    readable = [p for p in probes if not isinstance(p, str)]
    if not readable:
        raise DataError(f"{root}: none of the {len(probes)} image files is readable")
    channels = channels or (1 if all(mode in images.GRAY_MODES for mode, _ in readable) else 3)
    if image_size is not None:
        return tuple(image_size), channels
    sizes: dict[tuple[int, int], int] = {}
    for _, size in readable:
        sizes[size] = sizes.get(size, 0) + 1
    if len(sizes) > 1:
        common = ", ".join(f"{h}x{w} ({n} images)" for (h, w), n in sorted(sizes.items(), key=lambda kv: -kv[1])[:5])
        raise DataError(f"{root}: the images have {len(sizes)} different sizes ({common}); "
                        "pass --image-size HxW, and --resize squash|pad|crop for other aspect ratios")
    return next(iter(sizes)), channels


# --- the store -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageStore:
    """One cache entry: uint8 (N, C, H, W) pixels on disk and what describes them."""

    folder: Path
    index: dict

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.index["classes"])

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(self.index["files"])

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.index["labels"], dtype=np.int64)

    @property
    def status(self) -> tuple[str | None, ...]:
        """None for a decoded file, else why it is unreadable (its row holds zeros)."""
        return tuple(self.index["status"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.index["channels"], *self.index["size"])

    def __len__(self) -> int:
        return len(self.index["files"])

    def mean_std(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of the 0-255 pixels of `rows`, from the moments recorded at decode time."""
        moments = np.load(self.folder / MOMENTS)[np.asarray(rows, dtype=np.int64)].sum(axis=0)
        count = float(len(rows) * self.shape[1] * self.shape[2])
        mean = moments[0] / count
        return mean, np.sqrt(np.maximum(moments[1] / count - mean * mean, 0.0))

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), C, H, W), in the order of `rows` (repeats allowed), read with pread."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        row_bytes = int(np.prod(self.shape))
        out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        flat = out.reshape(len(rows), row_bytes)
        offset = self.index["data_offset"]
        fd = os.open(self.folder / IMAGES, os.O_RDONLY)
        try:
            for i, row in enumerate(rows):
                data = os.pread(fd, row_bytes, offset + int(row) * row_bytes)
                if len(data) != row_bytes:
                    raise DataError(f"{self.folder / IMAGES}: truncated cache file (row {int(row)}); delete the folder")
                flat[i] = np.frombuffer(data, dtype=np.uint8)
        finally:
            os.close(fd)
        return out


def open_store(folder: Path) -> ImageStore | None:
    """The cache entry in `folder`, or None if there is none (or it is of another format)."""
    try:
        index = json.loads((Path(folder) / INDEX).read_text())
    except (OSError, ValueError):
        return None
    complete = all((Path(folder) / name).is_file() for name in (IMAGES, MOMENTS))
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT or not complete:
        return None
    return ImageStore(Path(folder), index)


def stores(root: Path) -> Iterator[ImageStore]:
    """Every complete cache entry under `root`, newest first."""
    if not Path(root).is_dir():
        return
    entries = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    for folder in sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True):
        store = open_store(folder)
        if store is not None:
            yield store


def _probe_chunk(root: str, files: list[str]) -> list:
    out = []
    for name in files:
        try:
            out.append(images.probe(Path(root) / name))
        except images.UnreadableImageError as exc:
            out.append(exc.reason)
    return out


def _decode_chunk(store_file: str, root: str, rows: list[int], files: list[str], size: tuple[int, int],
                  channels: int, resize: str) -> tuple[list, np.ndarray]:
    """Decode `files` into `rows` of the store file.

    Returns a status per file (None: decoded) and per-file channel sums and sums of squares
    (len(files), 2, C), from which the mean and std of any split follow without reading pixels again.
    """
    target = np.load(store_file, mmap_mode="r+")
    status = []
    moments = np.zeros((len(files), 2, channels), dtype=np.float64)
    for i, (row, name) in enumerate(zip(rows, files, strict=True)):
        try:
            pixels = images.decode(Path(root) / name, size, channels, resize)
        except images.UnreadableImageError as exc:
            status.append(exc.reason)
            continue
        target[row] = pixels
        wide = pixels.reshape(channels, -1).astype(np.int64)
        moments[i, 0], moments[i, 1] = wide.sum(axis=1), (wide * wide).sum(axis=1)
        status.append(None)
    target.flush()
    del target
    return status, moments


def _run_chunks(fn, tasks: list[tuple], workers: int, stage: str, total: int, sizes: list[int],
                on_progress: Progress | None) -> list:
    """fn(*task) for every task, in worker processes when there are enough files, results in task order."""
    report = on_progress or (lambda stage, done, total: None)
    report(stage, 0, total)
    results: list = [None] * len(tasks)
    done = 0
    if workers <= 1 or total < PARALLEL_FROM:
        for i, task in enumerate(tasks):
            results[i] = fn(*task)
            done += sizes[i]
            report(stage, done, total)
        return results
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            done += sizes[i]
            report(stage, done, total)
    return results


def build(listing: FolderListing, image_size: tuple[int, int] | None, channels: int | None, resize: str,
          root: Path, on_progress: Progress | None = None, workers: int | None = None) -> ImageStore:
    """Decode every listed file into a new cache entry under `root` (or return the entry that is there)."""
    key = listing.key(image_size, channels, resize)
    final = Path(root) / key
    existing = open_store(final)
    if existing is not None:
        return existing
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        lock = open(Path(root) / f".{key}.lock", "w")  # noqa: SIM115 (held until the entry is in place)
    except OSError as exc:
        raise DataError(f"{root}: cannot write the image cache: {exc.strerror or exc} (choose another with --cache-dir)") from None
    with lock:
        import fcntl

        # Ranks of one torchrun (or two commands) reading the same new folder: one decodes, the others wait.
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = open_store(final)
        if existing is not None:
            return existing
        return _build(listing, key, image_size, channels, resize, Path(root), on_progress, workers)


def _build(listing: FolderListing, key: str, image_size: tuple[int, int] | None, channels: int | None, resize: str,
           root: Path, on_progress: Progress | None, workers: int | None) -> ImageStore:
    final = root / key
    workers = workers or default_workers()
    started = time.perf_counter()
    n = len(listing.files)
    chunks = [list(range(i, min(i + CHUNK, n))) for i in range(0, n, CHUNK)]
    sizes = [len(c) for c in chunks]
    if image_size is None or channels is None:
        probed = _run_chunks(_probe_chunk, [(str(listing.root), [listing.files[i] for i in c]) for c in chunks],
                             workers, "probe", n, sizes, on_progress)
        probes = [p for chunk in probed for p in chunk]
    else:
        probes = [("", tuple(image_size))] * n
    requested_channels = channels
    size, channels = decide_shape(listing.root, probes, image_size, channels)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    except OSError as exc:
        raise DataError(f"{root}: cannot write the image cache: {exc.strerror or exc} (choose another with --cache-dir)") from None
    try:
        store_file = staging / IMAGES
        array = np.lib.format.open_memmap(store_file, mode="w+", dtype=np.uint8, shape=(n, channels, *size))
        data_offset = int(array.offset)
        del array
        decoded = _run_chunks(_decode_chunk, [(str(store_file), str(listing.root), c, [listing.files[i] for i in c],
                                               size, channels, resize) for c in chunks],
                              workers, "decode", n, sizes, on_progress)
        decoded_status = (s for chunk_status, _ in decoded for s in chunk_status)
        status = [p if isinstance(p, str) else s for p, s in zip(probes, decoded_status, strict=True)]
        np.save(staging / MOMENTS, np.concatenate([m for _, m in decoded]) if decoded else np.zeros((0, 2, channels)))
        index = {
            "format": CACHE_FORMAT, "key": key, "source": str(listing.root), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "classes": list(listing.classes), "files": list(listing.files), "labels": listing.labels.tolist(),
            "status": status, "size": list(size), "channels": channels, "resize": resize,
            "requested": {"image_size": list(image_size) if image_size else None, "channels": requested_channels},
            "data_offset": data_offset, "ignored": [list(item) for item in listing.ignored],
            "decode": {"seconds": round(time.perf_counter() - started, 3), "workers": workers},
        }
        index["fingerprint"] = _content_fingerprint(store_file, data_offset, index)
        (staging / INDEX).write_text(json.dumps(index))
        try:
            staging.rename(final)
        except OSError:  # another process finished the same entry first: use theirs
            if open_store(final) is None:
                raise
    except DataError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except OSError as exc:
        raise DataError(f"{root}: cannot write the image cache: {exc.strerror or exc} (choose another with --cache-dir)") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("decoded %d images of %s into %s in %.1f s (%d workers)", n, listing.root, final,
             time.perf_counter() - started, workers)
    return open_store(final)


def _content_fingerprint(store_file: Path, offset: int, index: dict) -> str:
    """sha256 of what the data is (classes, labels, statuses, pixels), not of where it came from."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, index["classes"], index["labels"],
                                        [s is None for s in index["status"]], index["size"],
                                        index["channels"], index["resize"]]).encode())
    with open(store_file, "rb") as handle:
        handle.seek(offset)
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
