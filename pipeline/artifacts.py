"""Run folders, the manifest, hashes and atomic writes.

A run folder is what `train` makes and every later stage reads:

    models/<name>/
      checkpoint.pt     the trained weights + model config + preprocessing + labels
      metrics.json      per-epoch history, test accuracy, timings
      curves.png        learning curves
      manifest.json     the device contract: artifacts, labels, preprocessing, versions

Nothing here writes in place: every file is written to a temporary name in the same folder
and renamed over the target, so an interruption leaves either the old file or the new one.
`manifest.json` is written last by `train`, so a folder without it is not a finished run.
Training happens in `<name>.partial/`, renamed to `<name>/` only when it completes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from pipeline import __version__
from pipeline.errors import RunFolderError

MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CURVES = "curves.png"
TRAIN_STATE = "train_state.pt"
PARTIAL_SUFFIX = ".partial"
# An artifact's `runtime` when it needs no session option of its own: ORT's defaults, spelled out.
# Read-only: copy it (dict(...)) before recording or changing it.
DEFAULT_RUNTIME = {"graph_optimization_level": "all", "disabled_optimizers": []}
MANIFEST_SCHEMA = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on failure it is removed.

    Use it for writers that want a path (torch.save, onnx.save, savefig).
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are shared files
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(target: Path, obj: object) -> None:
    atomic_write_bytes(target, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def versions() -> dict:
    """Versions of the packages that shape an artifact, read without importing them."""
    result = {"pipeline": __version__}
    for name in ("torch", "onnx", "onnxruntime", "onnxsim", "onnxscript", "numpy"):
        try:
            result[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            result[name] = None
    return result


# --- the manifest ------------------------------------------------------------------------


@contextlib.contextmanager
def _manifest_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock, so that two processes updating one manifest never lose an update."""
    with open(Path(run_dir) / ".manifest.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_manifest(run_dir: Path) -> dict:
    """The manifest of a finished run; `RunFolderError` when the folder is not one."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        partial = run_dir.with_name(run_dir.name + PARTIAL_SUFFIX)
        hint = f" (an interrupted run is at {partial}: `pipeline train --resume {run_dir}`)" if partial.is_dir() else ""
        raise RunFolderError(f"{run_dir}: no such run folder{hint}")
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: not a finished run (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        raise RunFolderError(f"{path}: not a pipeline manifest of schema {MANIFEST_SCHEMA}")
    return manifest


def write_manifest(run_dir: Path, manifest: dict) -> None:
    with _manifest_lock(run_dir):
        atomic_write_json(Path(run_dir) / MANIFEST, manifest)


def update_manifest(run_dir: Path, change: Callable[[dict], None]) -> dict:
    """Read, change and rewrite the manifest under the lock; returns the new manifest."""
    with _manifest_lock(run_dir):
        manifest = read_manifest(run_dir)
        change(manifest)
        manifest["updated"] = now_iso()
        atomic_write_json(Path(run_dir) / MANIFEST, manifest)
    return manifest


# --- run folder lifecycle ----------------------------------------------------------------


def partial_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + PARTIAL_SUFFIX)


def start_run(run_dir: Path, force: bool) -> Path:
    """Create the staging folder for a new training run and return it.

    Refuses to shadow a finished run or an interrupted one unless `force`; the finished run
    stays untouched until the new one completes (see `finish_run`).
    """
    run_dir, staging = Path(run_dir), partial_dir(run_dir)
    if run_dir.exists() and not force:
        raise RunFolderError(f"{run_dir} already exists: choose another --out or pass --force to replace it")
    if staging.exists():
        if not force:
            raise RunFolderError(f"an interrupted run is at {staging}: --resume {run_dir} continues it, --force discards it")
        shutil.rmtree(staging)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create {staging}: {exc.strerror}") from None
    return staging


def resume_run(run_dir: Path) -> Path:
    """The staging folder of an interrupted run, which must hold a training state."""
    staging = partial_dir(run_dir)
    if not (staging / TRAIN_STATE).is_file():
        raise RunFolderError(f"nothing to resume: {staging} holds no {TRAIN_STATE} (no epoch of that run completed)")
    return staging


def finish_run(staging: Path, run_dir: Path) -> None:
    """Swap the completed staging folder into place; the old run (if forced) goes only now."""
    run_dir = Path(run_dir)
    (staging / TRAIN_STATE).unlink(missing_ok=True)
    old = None
    if run_dir.exists():
        old = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
        os.replace(run_dir, old)
    os.replace(staging, run_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
