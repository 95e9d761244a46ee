"""The device bundle: a `.tar.gz` holding what a device needs to run the model, and nothing else.

    digits/
      manifest.json       trimmed to the shipped variants: labels, preprocess, artifacts, runtime
      model.onnx          each shipped variant, under its manifest file name
      labels.txt          one label per line, in class-index order
      device_runner.py    the standalone runner (onnxruntime, numpy, Pillow)
      README.md           what to install and how to run it on the device
      SHA256SUMS          `sha256sum -c SHA256SUMS` checks the bundle on the device

The archive is deterministic (sorted members, fixed mtimes, owner 0, gzip header without
name or time): the same run and variants give the same bytes. Every model's sha256 is checked
against the manifest before it is packed, and the archive is written atomically.
`extract` is the matching safe unpacker: it refuses absolute names, `..`, links that leave the
target and special files, before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline import artifacts
from pipeline.config import PackConfig
from pipeline.errors import PipelineError, RunFolderError
from pipeline.predict import choose_variant, read_verified

# The runner lives in the package so a wheel install can pack it; tools/device_runner.py links to it.
RUNNER = Path(__file__).resolve().parent / "device_runner.py"
RUNNER_NAME = "device_runner.py"
FIXED_MTIME = 946684800  # 2000-01-01: fixed so that packing twice gives the same bytes
# Top-level manifest keys a device needs; the rest (checkpoint, training config) stays home.
KEPT_KEYS = ("schema", "pipeline_version", "created", "labels", "preprocess", "model", "runtime", "versions")


class UnsafeArchiveError(PipelineError):
    """An archive member that would land outside the target folder, or is not a plain file or folder."""

    exit_code = 16


@dataclass(frozen=True)
class PackResult:
    path: Path
    variants: tuple[str, ...]
    files: dict
    """Member name -> bytes, in archive order."""
    bytes: int
    sha256: str


def default_bundle_path(run_dir: Path) -> Path:
    """models/digits -> models/digits.tar.gz."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + ".tar.gz")


def bundle_name(out: Path) -> str:
    """The top folder inside the archive: the file name without .tar.gz / .tgz."""
    name = Path(out).name
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)] or "bundle"
    return name


def bundle_manifest(manifest: dict, variants: tuple[str, ...], run_name: str) -> dict:
    """The run's manifest trimmed to what is shipped; `recommended` always names a shipped variant."""
    trimmed = {key: manifest[key] for key in KEPT_KEYS if key in manifest}
    trimmed["dataset"] = {k: v for k, v in (manifest.get("dataset") or {}).items() if k in ("source", "fingerprint")}
    trimmed["artifacts"] = {name: manifest["artifacts"][name] for name in variants}
    recommended = manifest.get("recommended")
    trimmed["recommended"] = recommended if recommended in variants else variants[0]
    trimmed["bundle"] = {"run": run_name, "variants": list(variants),
                         "training_test_accuracy": (manifest.get("training") or {}).get("test_accuracy")}
    return trimmed


def device_readme(manifest: dict, top: str) -> str:
    p = manifest["preprocess"]
    rows = []
    for name, record in manifest["artifacts"].items():
        accuracy = record.get("test_accuracy")
        shown = f"{100 * accuracy:.2f}%" if isinstance(accuracy, (int, float)) else "n/a"
        settings = json.dumps(record.get("runtime") or {})
        rows.append(f"| {name} | `{record['file']}` | {record.get('bytes', 0):,} | {shown} | `{settings}` |")
    mean = ", ".join(f"{m:.4f}" for m in p["mean"])
    std = ", ".join(f"{s:.4f}" for s in p["std"])
    return f"""# {top}: model bundle for a device

Needs Python 3.8+ with `onnxruntime`, `numpy` and `Pillow` (no PyTorch):

    pip install onnxruntime numpy pillow
    sha256sum -c SHA256SUMS            # optional: check the files arrived intact
    python device_runner.py IMAGE...   # prints "<label> <probability> <file>" per image

The runner checks the model's sha256 against `manifest.json` before loading it (a changed file
is refused, exit 3) and applies the ONNX Runtime settings recorded for it.
It runs `{manifest['recommended']}` unless `--variant` names another shipped one.

| variant | file | bytes | test accuracy | ONNX Runtime settings |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Input: float32 NCHW, {p['channels']} x {p['size'][0]} x {p['size'][1]}. An 8-bit image is converted to
{'grayscale' if p['channels'] == 1 else 'RGB'}, resized (bilinear) to {p['size'][1]}x{p['size'][0]}, divided by 255,
then normalized per channel: (x - mean) / std with mean [{mean}] and std [{std}].
Output: {len(manifest['labels'])} logits, in the order of `labels.txt`; softmax gives probabilities.
"""


def _member(name: str, size: int, mode: int = 0o644, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type, info.mtime = size, mode, kind, FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(run_dir: Path, config: PackConfig) -> PackResult:
    """Write the bundle of `run_dir` with the configured variants; returns what it holds."""
    run_dir = Path(run_dir)
    manifest = artifacts.read_manifest(run_dir)
    variants = config.variants or (choose_variant(manifest, None),)
    for variant in variants:
        choose_variant(manifest, variant)  # refuses an unknown one with the list of known ones
    if not RUNNER.is_file():
        raise RunFolderError(f"the device runner is missing at {RUNNER} (pack runs from a source checkout)")
    top = bundle_name(config.out)
    shipped = bundle_manifest(manifest, tuple(variants), run_dir.name)
    files: dict[str, bytes] = {}
    for variant in variants:
        record = manifest["artifacts"][variant]
        data, _ = read_verified(run_dir / record["file"], record["sha256"])
        name = PurePosixPath(record["file"]).name
        if name in files:
            raise RunFolderError(f"variants {', '.join(variants)} share the file name {name!r}")
        files[name] = data
        shipped["artifacts"][variant] = {**record, "file": name}
    files["manifest.json"] = (json.dumps(shipped, indent=2) + "\n").encode()
    files["labels.txt"] = "".join(f"{label}\n" for label in manifest["labels"]).encode()
    files[RUNNER_NAME] = RUNNER.read_bytes()
    files["README.md"] = device_readme(shipped, top).encode()
    files["SHA256SUMS"] = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n"
                                  for name, data in sorted(files.items())).encode()

    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_path(out) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_member(top, 0, 0o755, tarfile.DIRTYPE))
            for name in sorted(files):
                mode = 0o755 if name == RUNNER_NAME else 0o644
                tar.addfile(_member(f"{top}/{name}", len(files[name]), mode), io.BytesIO(files[name]))
    data = out.read_bytes()
    members = {f"{top}/{name}": len(files[name]) for name in sorted(files)}
    return PackResult(out, tuple(variants), members, len(data), hashlib.sha256(data).hexdigest())


# --- safe extraction ------------------------------------------------------------------------


def check_members(tar: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    """Every member, if all of them stay inside `dest`; `UnsafeArchiveError` naming the first that does not."""
    root = Path(os.path.realpath(dest))
    members = tar.getmembers()
    for member in members:
        name = member.name
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
            raise UnsafeArchiveError(f"refusing archive member {name!r}: absolute path")
        if ".." in parts:
            raise UnsafeArchiveError(f"refusing archive member {name!r}: '..' leaves the target folder")
        target = Path(os.path.realpath(root / name))
        if target != root and root not in target.parents:
            raise UnsafeArchiveError(f"refusing archive member {name!r}: resolves outside {dest}")
        if member.issym() or member.islnk():
            base = (root / name).parent if member.issym() else root
            link = Path(os.path.realpath(base / member.linkname))
            if member.linkname.startswith("/") or (link != root and root not in link.parents):
                raise UnsafeArchiveError(f"refusing archive member {name!r}: link to {member.linkname!r} "
                                         "leaves the target folder")
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"refusing archive member {name!r}: not a regular file or folder")
    return members


def extract(archive: Path, dest: Path) -> Path:
    """Unpack `archive` into the new folder `dest`, all or nothing; refuses members that escape it."""
    dest = Path(dest)
    if dest.exists():
        raise RunFolderError(f"{dest} already exists: extract into a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = check_members(tar, staging)
                # The "data" filter (Python 3.11.4+, 3.10.12+) re-checks the same rules inside tarfile.
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, members=members, **extra)
        except (tarfile.TarError, OSError, EOFError) as exc:
            if isinstance(exc, getattr(tarfile, "FilterError", ())):
                raise UnsafeArchiveError(f"{archive}: {exc}") from None
            raise RunFolderError(f"{archive}: not a readable .tar.gz: {exc}") from None
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
