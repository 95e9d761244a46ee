"""The device bundle: a `.tar.gz` holding what a device needs to run and test the model, and nothing else.

    digits/
      manifest.json       trimmed to the shipped variants: labels, preprocess, artifacts (+ compat,
                          ort_format, mobile_usability), golden, requires, files (name -> sha256)
      model.onnx          each shipped variant, under its manifest file name
      model.ort           with --ort-format: ONNX Runtime's mobile format of each, and
      required_operators.config   the operators a reduced-size ONNX Runtime build needs
      golden/             test images (NNN.png), their model inputs (inputs.npy), each variant's logits
      labels.txt          one label per line, in class-index order
      device_runner.py    the standalone runner (onnxruntime, numpy, Pillow), timing harness inlined
      README.md           what to install and how to run it on the device
      SHA256SUMS          every file above; `sha256sum -c SHA256SUMS` works on the device
      SIGNATURE           with --sign: Ed25519 over SHA256SUMS

The archive is deterministic (sorted members, fixed mtimes, owner 0, gzip header without
name or time): the same run and options give the same bytes (except with --ort-format: ORT's
converter is not byte-deterministic, see `pipeline.mobile`). Every model's sha256 is checked
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
TIMING = Path(__file__).resolve().parent / "timing.py"
RUNNER_NAME = "device_runner.py"
SUMS_NAME = "SHA256SUMS"
SIGNATURE_NAME = "SIGNATURE"
# The marked block of device_runner.py that `bundled_runner` replaces with timing.py's source.
HARNESS_BEGIN = "# --- timing harness: begin"
HARNESS_END = "# --- timing harness: end ---"
RAW_QUOTES = "'" * 3
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


def bundled_runner() -> bytes:
    """device_runner.py with its marked `from pipeline import timing` replaced by timing.py's source, verbatim.

    The source goes in as a raw string that the runner runs into a module of its own, so the bundled
    harness is byte-identical to pipeline/timing.py (a test compares them) and the runner stays one file.
    """
    runner, harness = RUNNER.read_text(), TIMING.read_text()
    begin, end = runner.find(HARNESS_BEGIN), runner.find(HARNESS_END)
    if begin < 0 or end < begin:
        raise RunFolderError(f"{RUNNER}: the marked timing-harness block is missing")
    if RAW_QUOTES in harness or harness.endswith("\\"):
        raise RunFolderError(f"{TIMING}: cannot be carried in a raw string (it holds {RAW_QUOTES} or ends in a backslash)")
    block = (f"{HARNESS_BEGIN} (pipeline/timing.py, inlined verbatim by `pipeline pack`) ---\n"
             f"_TIMING_SOURCE = r{RAW_QUOTES}{harness}{RAW_QUOTES}\n"
             "timing = _load_timing(_TIMING_SOURCE)\n")
    return (runner[:begin] + block + runner[end:]).encode()


def bundled_harness(runner: str) -> str:
    """The timing source carried by a bundled runner (what the byte-identity test compares)."""
    start = runner.index(f"_TIMING_SOURCE = r{RAW_QUOTES}") + len(f"_TIMING_SOURCE = r{RAW_QUOTES}")
    return runner[start:runner.index(f"{RAW_QUOTES}\ntiming = _load_timing", start)]


def bundle_manifest(manifest: dict, variants: tuple[str, ...], run_name: str) -> dict:
    """The run's manifest trimmed to what is shipped; `recommended` always names a shipped variant."""
    trimmed = {key: manifest[key] for key in KEPT_KEYS if key in manifest}
    trimmed["dataset"] = {k: v for k, v in (manifest.get("dataset") or {}).items() if k in ("source", "fingerprint")}
    trimmed["artifacts"] = {name: manifest["artifacts"][name] for name in variants}
    recommended = manifest.get("recommended")
    trimmed["recommended"] = recommended if recommended in variants else variants[0]
    deployments = [d for d in manifest.get("deployments") or [] if isinstance(d, dict) and d.get("artifact") in variants]
    if deployments:  # the build host's recommendation per batch size (issue 16), for the shipped variants only
        trimmed["deployments"] = deployments
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

Needs Python 3.8+ with `onnxruntime` >= {(manifest.get('requires') or {}).get('onnxruntime', '?')}, `numpy` and `Pillow` (no PyTorch):

    pip install onnxruntime numpy pillow
    python device_runner.py --selftest     # check every file, run the golden set, time, choose
    python device_runner.py IMAGE...       # "<label><TAB><probability><TAB><file>" per image
    python device_runner.py --json IMAGE...
    python device_runner.py --selftest --verify-key key.pub.pem   # signed bundles (needs cryptography)

`--selftest` checks every file's sha256 (SHA256SUMS, the manifest's `files`), the installed
onnxruntime, and every variant's answers on the {(manifest.get('golden') or {}).get('count', 0)} golden images,
then times the variants here and writes `device_report.json`; later runs use its choice per batch
size. Without it the runner runs `{manifest['recommended']}` unless `--variant` names another one.
A changed file or a too-old onnxruntime is refused (exit 3); a failed check exits 4.

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


def default_variants(manifest: dict, run_dir: Path) -> tuple[str, ...]:
    """The recommended artifact, then every other artifact the deployments name, their ONNX Runtime fallbacks
    included (so the bundle can follow them on a device with ONNX Runtime only)."""
    from pipeline import deployments

    recommended = choose_variant(manifest, None, run_dir)  # first: a run without artifacts is refused in one line
    named = [name for d in deployments.read(manifest) for name in (d.artifact, d.onnxruntime_artifact)
             if name in manifest["artifacts"]]
    return tuple(dict.fromkeys([recommended, *named]))


def pack(run_dir: Path, config: PackConfig, on_step=None) -> PackResult:
    """Write the bundle of `run_dir` with the configured variants; returns what it holds."""
    step = on_step or (lambda _: None)
    run_dir = Path(run_dir)
    manifest = artifacts.read_manifest(run_dir)
    _check_out_writable(Path(config.out))
    variants = config.variants or default_variants(manifest, run_dir)
    for variant in variants:
        choose_variant(manifest, variant, run_dir)  # refuses an unknown one with the list of known ones
    if not RUNNER.is_file():
        raise RunFolderError(f"the device runner is missing at {RUNNER} (pack runs from a source checkout)")
    top = bundle_name(config.out)
    shipped = bundle_manifest(manifest, tuple(variants), run_dir.name)
    files: dict[str, bytes] = {}
    models: dict[str, bytes] = {}
    for variant in variants:
        record = manifest["artifacts"][variant]
        data, _ = read_verified(run_dir / record["file"], record["sha256"])
        name = PurePosixPath(record["file"]).name
        if name in files:
            raise RunFolderError(f"variants {', '.join(variants)} share the file name {name!r}")
        files[name] = models[variant] = data
        shipped["artifacts"][variant] = {**record, "file": name, "compat": _compat(data)}
    if config.golden:
        step("golden set")
        files.update(_golden(run_dir, manifest, shipped, models, config))
    if config.ort_format:
        step("ORT format")
        files.update(_ort_format(shipped, models, files, config))
    _requires(shipped)
    files[RUNNER_NAME] = bundled_runner()
    files["labels.txt"] = "".join(f"{label}\n" for label in manifest["labels"]).encode()
    shipped["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    files["manifest.json"] = (json.dumps(shipped, indent=2) + "\n").encode()
    files["README.md"] = device_readme(shipped, top).encode()
    files[SUMS_NAME] = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n"
                               for name, data in sorted(files.items())).encode()
    if config.sign_key is not None:
        from pipeline.signing import sign

        files[SIGNATURE_NAME] = sign(files[SUMS_NAME], config.sign_key)

    step("archive")
    out = Path(config.out)
    with artifacts.atomic_path(out) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            folders = sorted({str(PurePosixPath(top, name).parent) for name in files} | {top})
            for folder in folders:
                tar.addfile(_member(folder, 0, 0o755, tarfile.DIRTYPE))
            for name in sorted(files):
                mode = 0o755 if name == RUNNER_NAME else 0o644
                tar.addfile(_member(f"{top}/{name}", len(files[name]), mode), io.BytesIO(files[name]))
    data = out.read_bytes()
    members = {f"{top}/{name}": len(files[name]) for name in sorted(files)}
    return PackResult(out, tuple(variants), members, len(data), hashlib.sha256(data).hexdigest())


def _check_out_writable(out: Path) -> None:
    """Refuse (exit 4) before any work a bundle path that cannot be written, e.g. beside a read-only run folder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        reason = artifacts.unwritable_reason(out.parent)
    except OSError as exc:
        reason = exc.strerror or str(exc)
    if reason is not None:
        raise RunFolderError(f"{out.parent}: not writable ({reason}), so the bundle {out} cannot be written there; "
                             "give --out a writable path")


def _compat(model: bytes) -> dict:
    import onnx

    from pipeline.compat import requirements

    return requirements(onnx.load_from_string(model))


def _requires(shipped: dict) -> None:
    """The bundle's `requires.onnxruntime`: the strictest artifact's; beyond the table, the packing host's release."""
    import onnxruntime as ort

    from pipeline.compat import strictest

    records = [record["compat"] for record in shipped["artifacts"].values()]
    needed = strictest(records)
    if needed is None:
        # The table ends before this file's opset or IR version; the golden set just ran it on this
        # host's onnxruntime, which is therefore the oldest release known to run it.
        needed = ort.__version__
        basis = (f"beyond the documented table ({'; '.join(r['basis'] for r in records if r['onnxruntime_min'] is None)}): "
                 f"the oldest release known to run it is the packing host's {needed}")
        for record in records:
            if record["onnxruntime_min"] is None:
                record["onnxruntime_min"] = needed
    else:
        basis = "; ".join(f"{name}: {record['compat']['basis']}" for name, record in shipped["artifacts"].items())
    shipped["requires"] = {"onnxruntime": needed, "basis": basis, "table": records[0]["table"] if records else None}


def _sessions(shipped: dict, models: dict, portable: bool = False) -> dict:
    """A session per variant with its recorded runtime; `portable` also drops the x86-only NCHWc layout,
    as the .ort conversion does, so an .ort file is compared with its .onnx under the same optimizers."""
    from pipeline.mobile import PORTABLE_DISABLED
    from pipeline.runtime import create_session

    sessions = {}
    for variant, data in models.items():
        runtime = {**(shipped.get("runtime") or {}), **(shipped["artifacts"][variant].get("runtime") or {})}
        if portable:
            runtime["disabled_optimizers"] = sorted(set(runtime.get("disabled_optimizers") or []) | set(PORTABLE_DISABLED))
        sessions[variant] = create_session(data, runtime)
    return sessions


def _golden(run_dir: Path, manifest: dict, shipped: dict, models: dict, config: PackConfig) -> dict:
    """The golden files; their record goes into `shipped["golden"]`."""
    from pipeline import golden

    splits = golden.load_test_split(manifest, str(run_dir))
    built = golden.build(manifest, splits, config.golden, config.golden_seed)
    for variant, session in _sessions(shipped, models).items():
        record = shipped["artifacts"][variant]
        outputs = session.run(None, {session.get_inputs()[0].name: built.inputs})[0]
        tolerance = (record.get("verification") or {}).get("tolerance")
        golden.add_outputs(built, variant, record.get("kind", variant), outputs, manifest["labels"], tolerance)
    shipped["golden"] = built.record
    return built.files


def _ort_format(shipped: dict, models: dict, files: dict, config: PackConfig) -> dict:
    """`.ort` files checked against their `.onnx` on the golden inputs, required_operators.config, usability reports."""
    import numpy as np

    from pipeline import mobile
    from pipeline.golden import INPUTS

    inputs = np.load(io.BytesIO(files[INPUTS]), allow_pickle=False)
    sessions = _sessions(shipped, models, portable=True)
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        written = []
        for variant, data in models.items():
            record = shipped["artifacts"][variant]
            name = PurePosixPath(record["file"]).stem + ".ort"
            path = mobile.convert(data, record.get("runtime") or {}, Path(tmp) / name)
            ort_bytes = path.read_bytes()
            diff = mobile.max_abs_diff(ort_bytes, sessions[variant], inputs)
            if diff > mobile.ORT_TOLERANCE:
                raise mobile.OrtFormatError(f"{name}: max abs diff {diff:.3g} from {record['file']} on the golden set "
                                            f"(tolerance {mobile.ORT_TOLERANCE:g})")
            out[name] = ort_bytes
            written.append(path)
            record["ort_format"] = {"file": name, "sha256": hashlib.sha256(ort_bytes).hexdigest(), "bytes": len(ort_bytes),
                                    "max_abs_diff_vs_onnx": diff, "tolerance": mobile.ORT_TOLERANCE,
                                    "disabled_optimizers": sorted(set((record.get("runtime") or {}).get("disabled_optimizers") or [])
                                                                  | set(mobile.PORTABLE_DISABLED))}
            record["mobile_usability"] = mobile.mobile_usability(data)
        out[mobile.CONFIG_NAME] = mobile.required_operators(written, Path(tmp) / mobile.CONFIG_NAME).encode()
    shipped["ort_format"] = {"required_operators": mobile.CONFIG_NAME, "onnxruntime": _ort_version()}
    return out


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


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
