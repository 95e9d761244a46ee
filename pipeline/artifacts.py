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
import ctypes
import datetime as _dt
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from pipeline import __version__
from pipeline import manifest as schema
from pipeline.errors import PipelineError, RunFolderError

MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CURVES = "curves.png"
TRAIN_STATE = "train_state.pt"
CONFUSION = "confusion_matrix.png"  # test split, rows = true class
SKIPPED_IMAGES = "skipped_images.json"  # files of an image folder that are not in the splits, and why
PARTIAL_SUFFIX = ".partial"
# An artifact's `runtime` when it needs no session option of its own: ORT's defaults, spelled out.
# Read-only: copy it (dict(...)) before recording or changing it.
DEFAULT_RUNTIME = {"graph_optimization_level": "all", "disabled_optimizers": []}
MANIFEST_SCHEMA = schema.SCHEMA
log = logging.getLogger(__name__)


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
    """The manifest of a finished run, checked against the schema (`pipeline.manifest`); `RunFolderError`
    when the folder is not one, `ManifestError` (exit 4) naming the field that breaks the schema."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        partial = run_dir.with_name(run_dir.name + PARTIAL_SUFFIX)
        hint = (f" (an interrupted run is at {partial}: `pipeline train --resume {shlex.quote(str(run_dir))}`)"
                if partial.is_dir() else "")
        raise RunFolderError(f"{run_dir}: no such run folder{hint}")
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: not a finished run (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path}: unreadable manifest: {exc}") from None
    schema.validate(manifest, str(path))
    return manifest


def load_manifest(run_dir: Path) -> schema.Manifest:
    """The manifest of a finished run as typed records."""
    return schema.Manifest.from_dict(read_manifest(run_dir))


def write_manifest(run_dir: Path, manifest: dict) -> None:
    schema.validate(manifest, "the manifest to write")  # a stage cannot write a field the schema does not know
    with _manifest_lock(run_dir):
        atomic_write_json(Path(run_dir) / MANIFEST, manifest)


def update_manifest(run_dir: Path, change: Callable[[dict], None]) -> dict:
    """Read, change and rewrite the manifest under the lock; returns the new manifest."""
    with _manifest_lock(run_dir):
        manifest = read_manifest(run_dir)
        change(manifest)
        manifest["updated"] = now_iso()
        manifest["schema"] = MANIFEST_SCHEMA  # a schema-1 manifest is upgraded when a stage rewrites it
        manifest.setdefault("split_rule", dict(schema.SPLIT_RULE))
        schema.validate(manifest, "the changed manifest")
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
            raise RunFolderError(f"an interrupted run is at {staging}: `pipeline train --resume {shlex.quote(str(run_dir))}` "
                                 "continues it, --force discards it")
        shutil.rmtree(staging)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create {staging}: {exc.strerror}") from None
    return staging


def final_dir(path: Path) -> Path:
    """The run folder a path names: `models/r.partial` (what an interrupted run shows on disk) is `models/r`."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(PARTIAL_SUFFIX)) if path.name.endswith(PARTIAL_SUFFIX) else path


def after_interrupted_training(run_dir: Path) -> str:
    """What an interrupted training left, and the command that continues it (pasteable)."""
    run_dir = final_dir(run_dir)
    staging = partial_dir(run_dir)
    if (staging / TRAIN_STATE).is_file():
        return (f"the completed epochs are kept in {staging}; "
                f"`pipeline train --resume {shlex.quote(str(run_dir))}` continues from the last one")
    return f"no epoch had completed, so there is nothing to resume ({staging} can go; --force starts over)"


def resume_run(run_dir: Path) -> Path:
    """The staging folder of an interrupted run, which must hold a training state."""
    staging = partial_dir(final_dir(run_dir))
    if not (staging / TRAIN_STATE).is_file():
        raise RunFolderError(f"nothing to resume: {staging} holds no {TRAIN_STATE} (no epoch of that run completed)")
    return staging


def finish_run(staging: Path, run_dir: Path) -> None:
    """Put the completed staging folder in place of `run_dir` in one step; the old run (if forced) goes only then.

    There is no moment without a run folder: an existing one is exchanged with the staging folder
    atomically (see `swap_folders`), so a reader sees the old run or the new one, never neither.
    """
    run_dir = Path(run_dir)
    (staging / TRAIN_STATE).unlink(missing_ok=True)
    if not run_dir.exists():
        os.replace(staging, run_dir)
        return
    swap_folders(staging, run_dir)
    shutil.rmtree(staging, ignore_errors=True)  # it holds the old run now


# --- all-or-nothing stages on a finished run folder ---------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with renameat2(RENAME_EXCHANGE); False where the OS or filesystem lacks it."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # not Linux, or a libc older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_folders(new: Path, current: Path) -> None:
    """Make `new` the folder at `current` in one atomic step; afterwards `new` holds the old contents.

    Where the filesystem cannot exchange two names atomically it falls back to two renames, with
    a moment (microseconds) in which `current` does not exist; that fallback is logged.
    """
    if _exchange(Path(new), Path(current)):
        return
    log.warning("%s: this filesystem cannot exchange folders atomically; replacing it in two renames", current)
    parked = Path(current).with_name(f".{Path(current).name}.parked-{os.getpid()}")
    os.replace(current, parked)
    os.replace(new, current)
    os.replace(parked, new)


def _lock_path(run_dir: Path) -> Path:
    # Beside the folder, not in it: the folder itself is swapped for a new one when a stage publishes.
    return run_dir.with_name(f".{run_dir.name}.lock")


def unwritable_reason(folder: Path) -> str | None:
    """None when a file can be created in `folder`, else the OS's reason.

    A real probe, not os.access: root passes os.access on a read-only filesystem."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".pipeline-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_writable(run_dir: Path, hint: str = "copy the run folder somewhere writable") -> None:
    """Refuse (exit 4) a run folder this process cannot change, before any work is done; `hint` says what to do."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir.parent):
        reason = unwritable_reason(folder)
        if reason is not None:
            raise RunFolderError(f"{folder}: not writable ({reason}), so {run_dir} cannot be changed; {hint}")


@contextlib.contextmanager
def run_writer(run_dir: Path, hint: str = "copy the run folder somewhere writable") -> Iterator[None]:
    """Hold the one-writer lock of a run folder; a second writer is refused at once with one line (exit 4)."""
    run_dir = Path(run_dir)
    check_writable(run_dir, hint)
    with open(_lock_path(run_dir), "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunFolderError(f"{run_dir} is being changed by {holder}: wait for it to finish, then run this again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({' '.join(os.path.basename(a) for a in sys.argv[:2])})")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def staged_update(run_dir: Path) -> Iterator[Path]:
    """Change a finished run folder all or nothing: yields a private copy to write into, then swaps it in.

    Everything a stage writes (files and manifest) goes into the copy; only when the block ends
    without an error does the copy replace the run folder, in one atomic exchange. An exception,
    Ctrl-C or SIGKILL anywhere before that leaves the run folder exactly as it was (a killed
    stage's copy is a hidden sibling, removed by the next stage on that folder). The one-writer
    lock is held throughout, so two stages never interleave.
    """
    run_dir = Path(run_dir)
    with run_writer(run_dir):
        for stale in run_dir.parent.glob(f".{glob.escape(run_dir.name)}.stage-*"):  # left by a killed stage
            shutil.rmtree(stale, ignore_errors=True)
        staging = run_dir.with_name(f".{run_dir.name}.stage-{os.getpid()}")
        try:
            shutil.copytree(run_dir, staging, symlinks=True)
            yield staging
            swap_folders(staging, run_dir)
        except PipelineError as exc:
            # Raised inside, the message names the private copy; the user knows (and pastes) the run folder.
            exc.args = tuple(a.replace(str(staging), str(run_dir)) if isinstance(a, str) else a for a in exc.args)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the failed copy, or the old run after the swap
