"""Classify image files, IDX files and `.npy` arrays with an exported model, as the device will.

Imports onnxruntime, numpy and Pillow only (through `pipeline.data`, `pipeline.runtime` and
`pipeline.artifacts`, none of which import torch): `pipeline predict` must run where the
device runs, without PyTorch.

What a model needs besides its weights (labels, preprocessing, ORT session settings) comes
from the run folder's manifest. A bare `.onnx` with no manifest beside it is read through the
`labels` and `preprocess` metadata_props the export writes; a file without them is refused
unless the caller accepts the stated assumption (`assume=True`: 8-bit pixels / 255, mean 0,
std 1, labels 0..K-1).

How inputs become the model's input (the same rule in `tools/device_runner.py`):
- 8-bit images (PNG/JPEG of any size) and 8-bit arrays (IDX ubyte, uint8 `.npy`) are resized to
  the manifest's size with Pillow (bilinear), mapped to [0, 1] by / 255 (the range that
  `raw * scale` has for every training source) and normalized: (x - mean) / std.
- float arrays (`.npy`, float IDX) hold raw pixels in the training source's own range and go
  through `Preprocess.apply` unchanged: ((raw * scale) - mean) / std; their size must match.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import artifacts
from pipeline.config import PredictConfig
from pipeline.data import IMAGE_SUFFIXES, Preprocess, load_image, read_idx
from pipeline.errors import DataError, ModelIntegrityError, PipelineError, RunFolderError
from pipeline.images import fit, is_hidden, is_image_name

log = logging.getLogger(__name__)
METADATA_KEYS = ("labels", "preprocess")


@dataclass(frozen=True)
class LoadedModel:
    """An ONNX Runtime session with what it takes to feed it and read its output."""

    path: Path
    variant: str | None
    sha256: str
    labels: tuple[str, ...]
    preprocess: Preprocess
    runtime: dict
    source: str
    """Where labels and preprocessing came from: `manifest`, `metadata` or `assumed`."""
    session: object
    engine: str = "onnxruntime"
    note: str | None = None
    """One line when the manifest's deployment for this batch size could not be followed here."""

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    def describe(self) -> dict:
        return {"path": str(self.path), "variant": self.variant, "sha256": self.sha256, "labels_from": self.source,
                "preprocess": self.preprocess.to_dict(), "runtime": self.runtime, "engine": self.engine,
                "provider": self.session.get_providers()[0], **({"note": self.note} if self.note else {})}


@dataclass(frozen=True)
class Sample:
    """One input image, already normalized: float32 (C, H, W)."""

    name: str
    x: np.ndarray


@dataclass(frozen=True)
class Prediction:
    name: str
    top: tuple[tuple[int, str, float], ...]
    """(class index, label, probability), most probable first."""
    uncertainty: dict[str, float] | None = None
    """MC dropout models only: {"entropy", "mutual_info"} in nats (see `pipeline.mc.OUTPUT_MEANINGS`)."""

    def to_dict(self) -> dict:
        return {"input": self.name, "label": self.top[0][1], "probability": self.top[0][2],
                "top": [{"index": i, "label": label, "probability": p} for i, label, p in self.top],
                **({"uncertainty": self.uncertainty} if self.uncertainty else {})}


# --- the model ----------------------------------------------------------------------------


def choose_variant(manifest: dict, requested: str | None, run_dir: Path) -> str:
    """The requested variant, else the manifest's recommendation, else fp32."""
    available = manifest.get("artifacts") or {}
    if not available:
        raise RunFolderError(f"{run_dir}: the run has no exported model yet: run "
                             f"`pipeline export --run {shlex.quote(str(run_dir))}` first")
    variant = requested or manifest.get("recommended") or "fp32"
    if variant not in available:
        raise RunFolderError(f"no variant {variant!r} in the manifest: available {', '.join(sorted(available))}")
    return variant


def read_verified(path: Path, expected_sha256: str) -> tuple[bytes, str]:
    """The file's bytes, hashed as read (what is checked is what is loaded); refuses a mismatch."""
    import hashlib

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RunFolderError(f"{path}: cannot read the model file: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ModelIntegrityError(f"{path}: sha256 {digest[:16]}... does not match the manifest's {expected_sha256[:16]}... "
                                  f"({len(data)} bytes): the file was changed after export; refusing to load it")
    return data, digest


def open_model(target: Path, config: PredictConfig) -> LoadedModel:
    """A run folder, or an `.onnx` file (with or without a manifest beside it) -> a checked session."""
    target = Path(target)
    if target.is_dir():
        manifest = artifacts.read_manifest(target)
        return _from_manifest(target, manifest, choose_variant(manifest, config.variant, target), config)
    if not target.is_file():
        raise RunFolderError(f"{target}: no such run folder or model file")
    if (target.parent / artifacts.MANIFEST).is_file():
        manifest = artifacts.read_manifest(target.parent)
        matches = [name for name, record in (manifest.get("artifacts") or {}).items()
                   if (target.parent / record.get("file", "")).resolve() == target.resolve()]
        if matches:
            if config.variant is not None and config.variant not in matches:
                raise RunFolderError(f"{target} is variant {matches[0]!r} in its manifest, not {config.variant!r}")
            return _from_manifest(target.parent, manifest, matches[0], config)
        log.info("%s is not recorded in the manifest beside it; reading its metadata instead", target)
    return _from_metadata(target, config)


def _from_manifest(run_dir: Path, manifest: dict, variant: str, config: PredictConfig, engine: str = "onnxruntime",
                   threads: int | None = None, note: str | None = None) -> LoadedModel:
    from pipeline.runtime import create_session

    record = manifest["artifacts"][variant]
    try:
        path, expected = run_dir / record["file"], record["sha256"]
    except KeyError as exc:
        raise RunFolderError(f"{run_dir}: artifact {variant!r} has no {exc.args[0]!r} in the manifest") from None
    data, digest = read_verified(path, expected)
    runtime = {**(manifest.get("runtime") or {}), **(record.get("runtime") or {})}
    threads = config.threads or threads
    if engine == "onnxruntime":
        session = create_session(data, runtime, threads=threads)
    else:
        from pipeline.engines import OpenVinoSession

        session = OpenVinoSession(data, threads, engine)
    labels = tuple(str(label) for label in manifest["labels"])
    model = LoadedModel(path, variant, digest, labels, Preprocess.from_dict(manifest["preprocess"]), runtime,
                        "manifest", session, engine, note)
    _check_signature(model)
    return model


def _from_metadata(path: Path, config: PredictConfig) -> LoadedModel:
    import hashlib

    from pipeline.runtime import create_session

    data = path.read_bytes()
    try:
        session = create_session(data, None, threads=config.threads)
    except PipelineError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunFolderError(f"{path}: onnxruntime cannot load it: {first}") from None
    props = session.get_modelmeta().custom_metadata_map
    shape = session.get_inputs()[0].shape
    if all(key in props for key in METADATA_KEYS):
        try:
            labels = tuple(str(label) for label in json.loads(props["labels"]))
            preprocess = Preprocess.from_dict(json.loads(props["preprocess"]))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: unreadable labels/preprocess metadata: {exc}") from None
        source = "metadata"
    elif config.assume:
        preprocess, labels = _assumed(path, session)
        source = "assumed"
    else:
        missing = [key for key in METADATA_KEYS if key not in props]
        raise RunFolderError(f"{path}: no manifest.json beside it and no {' / '.join(missing)} metadata in the file, "
                             f"so its preprocessing is unknown (input {shape}); pass the run folder, or --assume to use "
                             "pixels / 255 with mean 0, std 1 and labels 0..K-1")
    model = LoadedModel(path, None, hashlib.sha256(data).hexdigest(), labels, preprocess, {}, source, session)
    _check_signature(model)
    return model


def _assumed(path: Path, session) -> tuple[Preprocess, tuple[str, ...]]:
    shape, out = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or not isinstance(out[-1], int):
        raise DataError(f"{path}: cannot assume a preprocessing for input {shape} -> output {out} "
                        "(need a fixed C x H x W input and a fixed class count)")
    channels = shape[1]
    preprocess = Preprocess(size=(shape[2], shape[3]), channels=channels, scale=1.0 / 255.0,
                            mean=(0.0,) * channels, std=(1.0,) * channels)
    return preprocess, tuple(str(i) for i in range(out[-1]))


def _check_signature(model: LoadedModel) -> None:
    """The session's input must take the manifest's C x H x W and its output give one logit per label."""
    shape, out = model.session.get_inputs()[0].shape, model.session.get_outputs()[0].shape
    p = model.preprocess
    fixed = [d for d in shape[1:] if isinstance(d, int)]
    if len(shape) != 4 or (len(fixed) == 3 and tuple(fixed) != (p.channels, *p.size)):
        raise DataError(f"{model.path}: model input {shape} does not take ({p.channels}, {p.size[0]}, {p.size[1]}) images")
    if isinstance(out[-1], int) and out[-1] != len(model.labels):
        raise DataError(f"{model.path}: model gives {out[-1]} outputs but there are {len(model.labels)} labels")


# --- inputs -------------------------------------------------------------------------------


GLOB_CHARACTERS = "*?["


def expand_inputs(inputs: list) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (every image file below them, hidden files excepted) and glob patterns -> (files, missing).

    `missing` holds (argument, reason) for an argument that names nothing: no such file, an empty
    folder, a pattern that matches no file.
    """
    import glob

    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    for argument in map(str, inputs):
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p.name)
                           and not any(is_hidden(part) for part in p.relative_to(path).parts))
            files.extend(found)
            if not found:
                missing.append((argument, "a folder without image files"))
        elif path.is_file():
            files.append(path)
        elif any(c in argument for c in GLOB_CHARACTERS):
            found = sorted(Path(p) for p in glob.glob(argument, recursive=True)
                           if Path(p).is_file() and not is_hidden(Path(p).name))
            files.extend(found)
            if not found:
                missing.append((argument, "no file matches the pattern"))
        else:
            missing.append((argument, "no such input file"))
    return files, missing


def read_inputs(paths: list[Path], preprocess: Preprocess, invert: bool = False,
                unreadable: list[tuple[str, str]] | None = None) -> list[Sample]:
    """Every input file -> normalized samples, in order (an IDX or .npy file may hold many).

    With `unreadable` (a list), a file that cannot be read is appended there as (path, reason) and
    the others are still read; without it, the first one raises its `DataError`.
    """
    samples: list[Sample] = []
    for path in map(Path, paths):
        try:
            samples.extend(_read_input(path, preprocess, invert))
        except DataError as exc:
            if unreadable is None:
                raise
            unreadable.append((str(path), str(exc).removeprefix(f"{path}: ")))
    return samples


def _read_input(path: Path, preprocess: Preprocess, invert: bool) -> list[Sample]:
    if not path.is_file():
        raise DataError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        pixels = load_image(path, preprocess.size, preprocess.channels, preprocess.resize)[None]
        return [Sample(str(path), _normalize_8bit(pixels, preprocess, invert)[0])]
    array = _read_npy(path) if suffix == ".npy" else _read_idx_input(path)
    batch = _as_batch(array, preprocess, path)
    if array.dtype == np.uint8:
        x = _normalize_8bit(_resize(batch, preprocess.size, preprocess.resize), preprocess, invert)
    else:
        if invert:
            raise DataError(f"{path}: --invert applies to 8-bit images only, this array is {array.dtype}")
        x = preprocess.apply(batch)
    names = [str(path)] if len(x) == 1 else [f"{path}[{i}]" for i in range(len(x))]
    return [Sample(name, row) for name, row in zip(names, x, strict=True)]


def _read_idx_input(path: Path) -> np.ndarray:
    try:
        return read_idx(path)
    except DataError:
        if "idx" in path.name.lower() or "ubyte" in path.name.lower():
            raise
        raise DataError(f"{path}: unsupported input (expected .png, .jpg, .jpeg, .npy or an IDX file)") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        # allow_pickle=False: an array file must not be able to run code when opened.
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array: {exc}") from None
    if array.dtype.kind not in "uif":
        raise DataError(f"{path}: array of dtype {array.dtype}, expected numbers")
    if not np.all(np.isfinite(array)):
        raise DataError(f"{path}: array holds NaN or infinite values")
    return array


def _as_batch(array: np.ndarray, p: Preprocess, path: Path) -> np.ndarray:
    """(H, W), (C, H, W), (N, H, W), (N, C, H, W) or channels-last (H, W, C), (N, H, W, C) -> (N, C, H, W)."""
    c = p.channels
    if array.ndim == 2 and c == 1:
        return array[None, None]
    if array.ndim == 3 and c == 1:
        return array[:, None]
    if array.ndim == 3 and array.shape[0] == c:
        return array[None]
    if array.ndim == 3 and array.shape[-1] == c:
        return np.moveaxis(array, -1, 0)[None]
    if array.ndim == 4 and array.shape[1] == c:
        return array
    if array.ndim == 4 and array.shape[-1] == c:  # as IDX and Keras store colour images
        return np.moveaxis(array, -1, 1)
    raise DataError(f"{path}: array of shape {array.shape} is not (H, W), (C, H, W), (N, H, W) or (N, C, H, W) "
                    f"images with {c} channel(s)")


def _resize(batch: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """8-bit (N, C, H, W) -> float32 (N, C, *size), resized like `load_image` resizes files (`images.fit`)."""
    if batch.shape[2:] == size:
        return batch.astype(np.float32)
    from PIL import Image

    out = np.empty((*batch.shape[:2], *size), dtype=np.float32)
    for i, image in enumerate(batch):
        for c, plane in enumerate(image):
            out[i, c] = np.asarray(fit(Image.fromarray(plane), size, mode), dtype=np.float32)
    return out


def _normalize_8bit(pixels: np.ndarray, p: Preprocess, invert: bool) -> np.ndarray:
    x = pixels.astype(np.float32) / np.float32(255.0)
    if invert:  # dark ink on light paper -> the light-on-dark of MNIST and digits
        x = 1.0 - x
    mean = np.asarray(p.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(p.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


# --- classification -----------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


MC_OUTPUT_NAMES = ("probs", "entropy", "mutual_info")  # = pipeline.mc.OUTPUT_NAMES


def classify(model: LoadedModel, samples: list[Sample], top_k: int = 3) -> list[Prediction]:
    """Top-k labels with probabilities for every sample."""
    from pipeline.runtime import run_batched

    if not samples:
        return []
    x = np.stack([s.x for s in samples]).astype(np.float32)
    uncertainty = [None] * len(samples)
    if tuple(o.name for o in model.session.get_outputs()) == MC_OUTPUT_NAMES:
        # model.mc.onnx gives probabilities already (the mean over its dropout samples), and uncertainty.
        from pipeline.mc import run_mc

        out = run_mc(model.session, x)
        probabilities = out["probs"].astype(np.float64)
        uncertainty = [{"entropy": float(e), "mutual_info": float(m)}
                       for e, m in zip(out["entropy"], out["mutual_info"], strict=True)]
    else:
        probabilities = softmax(run_batched(model.session, x).astype(np.float64))
    k = min(top_k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [Prediction(sample.name, tuple((int(i), model.labels[int(i)], float(row[i])) for i in top), u)
            for sample, row, top, u in zip(samples, probabilities, order, uncertainty, strict=True)]


@dataclass(frozen=True)
class PredictResult:
    model: LoadedModel
    predictions: list[Prediction]
    unreadable: list[tuple[str, str]]
    """(input, reason) of every argument or file that gave no prediction."""


def predict(target: Path, inputs: list, config: PredictConfig) -> PredictResult:
    """Open the model (checking it), expand the inputs (files, folders, globs), classify every readable one.

    Unreadable inputs are listed, not fatal: `DataError` only when none could be read (`config.strict`
    is the caller's to enforce on `unreadable`). A run folder without `--variant` follows the manifest's
    deployment for this many inputs (the nearest measured batch size at or below), on its engine, or
    ONNX Runtime with a note when the engine is not installed here.
    """
    target = Path(target)
    files, unreadable = expand_inputs(inputs)
    if target.is_dir() and config.variant is None:
        from pipeline import deployments, engines

        manifest = artifacts.read_manifest(target)
        choose_variant(manifest, None, target)  # a run without artifacts fails here, as before
        samples = _readable(files, Preprocess.from_dict(manifest["preprocess"]), config.invert, unreadable)
        choice = deployments.follow(manifest, max(len(samples), 1), engines.available)
        model = _from_manifest(target, manifest, choose_variant(manifest, choice.artifact, target), config, choice.engine,
                               choice.threads, choice.note)
    else:
        model = open_model(target, config)
        samples = _readable(files, model.preprocess, config.invert, unreadable)
    return PredictResult(model, classify(model, samples, config.top_k), unreadable)


def _readable(files: list[Path], preprocess: Preprocess, invert: bool, unreadable: list[tuple[str, str]]) -> list[Sample]:
    """The samples of every readable file (the others appended to `unreadable`); `DataError` if there is none."""
    samples = read_inputs(files, preprocess, invert=invert, unreadable=unreadable)
    if not samples:
        listed = "; ".join(f"{name}: {reason}" for name, reason in unreadable)
        raise DataError(f"no input could be read ({len(unreadable)} unreadable): {listed}")
    return samples
