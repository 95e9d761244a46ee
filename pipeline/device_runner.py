#!/usr/bin/env python3
"""Classify images on a device with the bundled ONNX model, and test the bundle on the device itself.

Needs Python 3.8+ with onnxruntime, numpy and Pillow only (and `cryptography` for --verify-key).
Run it inside an unpacked bundle (the folder holding manifest.json):

    python device_runner.py --selftest           # check, time and choose; writes device_report.json
    python device_runner.py digit.png photo.jpg  # "7<TAB>0.9931<TAB>digit.png" per image
    python device_runner.py --json *.png         # one JSON object for scripts

`--selftest`:
  1. checks every file's sha256 (SHA256SUMS, and the manifest's `files`; with --verify-key PUB
     first the Ed25519 signature over SHA256SUMS) and the installed onnxruntime against the
     oldest release the bundle's models need,
  2. runs every shipped variant on the golden set packed with it: fp32 within the export's
     tolerance of the recorded logits, every variant's top-1 labels agreeing with the recorded
     ones (>= 99%), each .ort file equal to its .onnx, and the PNG -> tensor path giving the
     recorded tensors,
  3. times every passing variant on every execution provider present, interleaved (the same
     harness `pipeline bench` uses on the build host), and chooses the fastest per batch size,
     saying when the variants are within noise of each other,
  4. writes device_report.json. Later runs use its choice unless --variant names one.
Any failed check exits non-zero with one line naming the file or variant.

Classification applies the manifest: the model's sha256 is checked before it is loaded, the
session gets the recorded ONNX Runtime settings, and each image is converted as recorded
(grayscale or RGB, bilinear resize, / 255, (x - mean) / std, float32 NCHW). An unreadable image is
reported and the others are still classified.

This file is standalone on purpose (no `pipeline` import in the bundled copy): `pipeline pack`
puts the project's timing harness (pipeline/timing.py) into it verbatim.
Exit codes: 0 ok; 2 bad usage, or no image could be read (any, with --strict);
3 bundle refused (changed file, signature, onnxruntime too old); 4 a self-test check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np


def _load_timing(source: str):
    """The bundled copy of pipeline/timing.py as a module (registered, so its dataclasses resolve)."""
    import types

    module = types.ModuleType("device_timing")
    module.__file__ = "pipeline/timing.py (bundled)"
    sys.modules[module.__name__] = module
    exec(compile(source, "pipeline/timing.py", "exec"), module.__dict__)  # noqa: S102 (our own source, hashed)
    return module


# --- timing harness: begin (`pipeline pack` replaces this block with pipeline/timing.py, verbatim) ---
from pipeline import timing  # noqa: E402, I001
# --- timing harness: end ---

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
             "coreml": "CoreMLExecutionProvider", "nnapi": "NnapiExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
             "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider", "qnn": "QNNExecutionProvider"}
REPORT = "device_report.json"
REPORT_SCHEMA = 1
SUMS = "SHA256SUMS"
SIGNATURE = "SIGNATURE"
TOP1_MIN_AGREEMENT = 0.99
ORT_TOLERANCE = 1e-6  # an .ort file against its .onnx: the same kernels, so the same numbers
EXIT_USAGE, EXIT_REFUSED, EXIT_CHECK = 2, 3, 4


class Refused(Exception):
    """The bundle cannot be trusted or used: missing file, changed file, signature, runtime too old."""


class CheckFailed(Exception):
    """A self-test check that did not pass: the message names the file or variant and the numbers."""


# --- the bundle -----------------------------------------------------------------------------


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise Refused(f"{path}: cannot read the manifest: {exc}") from None


def read_file(folder: str, name: str) -> bytes:
    path = os.path.join(folder, name)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise Refused(f"{name}: cannot read it: {exc.strerror}") from None


def read_checked(folder: str, name: str, expected: str | None) -> bytes:
    """The file's bytes, hashed as read, so that what was checked is exactly what is used."""
    data = read_file(folder, name)
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise Refused(f"{name}: sha256 {digest[:16]}... does not match the recorded {str(expected)[:16]}...: "
                      "the file was changed; refusing to use it")
    return data


def read_sums(folder: str) -> dict:
    """SHA256SUMS as {name: sha256}; {} when the bundle has none (an older bundle)."""
    if not os.path.isfile(os.path.join(folder, SUMS)):
        return {}
    sums = {}
    for line in read_file(folder, SUMS).decode("utf-8", "replace").splitlines():
        digest, _, name = line.partition("  ")
        if name:
            sums[name] = digest
    return sums


def check_sums(folder: str) -> dict:
    """Every file SHA256SUMS lists (the manifest included) has its recorded sha256; returns the list."""
    sums = read_sums(folder)
    for name, digest in sums.items():
        read_checked(folder, name, digest)
    return sums


def check_integrity(folder: str, manifest: dict, sums: dict | None = None) -> int:
    """SHA256SUMS, then every file in the manifest's `files`, match their recorded sha256; returns how many."""
    sums = check_sums(folder) if sums is None else sums
    listed = dict(manifest.get("files") or {})
    for name, digest in listed.items():
        read_checked(folder, name, digest)
    for name, digest in listed.items():
        if name in sums and sums[name] != digest:
            raise Refused(f"{name}: the manifest and SHA256SUMS record different sha256s")
    return len(set(sums) | set(listed))


def verify_signature(folder: str, public_key_path: str) -> str:
    """Ed25519 signature (file SIGNATURE) over SHA256SUMS, with the given PEM or raw 32-byte public key."""
    try:  # imported only here: a device that does not verify signatures needs no cryptography
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        raise Refused("--verify-key needs the `cryptography` package: pip install cryptography") from None
    try:
        with open(public_key_path, "rb") as handle:
            key_bytes = handle.read()
    except OSError as exc:
        raise Refused(f"{public_key_path}: cannot read the public key: {exc.strerror}") from None
    try:
        key = (Ed25519PublicKey.from_public_bytes(key_bytes) if len(key_bytes) == 32
               else load_pem_public_key(key_bytes))
    except ValueError as exc:
        raise Refused(f"{public_key_path}: not an Ed25519 public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise Refused(f"{public_key_path}: not an Ed25519 public key")
    if not os.path.isfile(os.path.join(folder, SIGNATURE)):
        raise Refused(f"the bundle is unsigned (no {SIGNATURE}) and --verify-key was given")
    if not os.path.isfile(os.path.join(folder, SUMS)):
        raise Refused(f"the bundle has no {SUMS}: nothing was signed")
    try:
        key.verify(read_file(folder, SIGNATURE), read_file(folder, SUMS))
    except InvalidSignature:
        raise Refused(f"{SIGNATURE}: the signature over {SUMS} does not verify with {public_key_path}") from None
    return hashlib.sha256(read_file(folder, SUMS)).hexdigest()


def version_tuple(text: str) -> tuple:
    """'1.18.0' -> (1, 18, 0); '1.19.0.dev2024' / '1.17.3+cu118' -> the leading numbers only."""
    parts = []
    for piece in str(text).replace("+", ".").replace("-", ".").split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def required_runtime(manifest: dict, names) -> str | None:
    """The newest onnxruntime the bundle (its `requires`) or the named artifacts (their `compat`) need."""
    artifacts = manifest.get("artifacts") or {}
    needed = [(manifest.get("requires") or {}).get("onnxruntime")]
    needed += [((artifacts.get(name) or {}).get("compat") or {}).get("onnxruntime_min") for name in names]
    needed = [str(v) for v in needed if v]
    return max(needed, key=version_tuple) if needed else None


def check_runtime(manifest: dict, names, installed: str) -> str | None:
    """Refuses before any model is loaded when the installed onnxruntime is older than needed."""
    needed = required_runtime(manifest, names)
    if needed and version_tuple(installed) < version_tuple(needed):
        raise Refused(f"this bundle needs onnxruntime >= {needed}, found {installed}")
    return needed


# --- sessions and images ----------------------------------------------------------------------


def create_session(model: bytes, runtime: dict, threads: int | None, provider: str = "cpu"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    level = runtime.get("graph_optimization_level", "all")
    if level not in LEVELS:
        raise Refused(f"unknown graph_optimization_level {level!r} in the manifest")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    threads = threads or runtime.get("intra_op_num_threads") or runtime.get("threads")
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    disabled = list(runtime.get("disabled_optimizers") or [])
    name = PROVIDERS.get(provider, provider)
    providers = [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
    return ort.InferenceSession(model, options, providers=providers, disabled_optimizers=disabled)


# The decoding rule training used (`pipeline.images` imports these from here: one definition that
# the bundle carries): EXIF orientation, 16-bit scaled not clipped, gray or RGB, the resize mode.
RESIZE_MODES = ("squash", "pad", "crop")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
EXIF_FORMATS = ("JPEG", "TIFF", "WEBP")


def to_8bit(image):
    """A Pillow image in a mode `convert("L"/"RGB")` handles without clipping: 16-bit gray scaled by 1/257."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":  # float images are taken as 0-255
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), mode="L")
    return image


def fit(image, size, resize: str):
    """`image` brought to (H, W) `size` by the `resize` mode (squash, crop, pad), bilinear; any Pillow mode."""
    from PIL import Image, ImageOps

    bilinear = getattr(Image, "Resampling", Image).BILINEAR  # Image.Resampling is Pillow >= 9.1
    target = (int(size[1]), int(size[0]))
    if image.size == target:
        return image
    if resize == "squash":
        return image.resize(target, bilinear)
    if resize == "crop":
        return ImageOps.fit(image, target, bilinear, centering=(0.5, 0.5))
    if resize == "pad":
        return ImageOps.pad(image, target, bilinear, color=0, centering=(0.5, 0.5))
    raise ValueError(f"unknown resize mode {resize!r}: choose one of {', '.join(RESIZE_MODES)}")


def load_image(path: str, preprocess: dict) -> np.ndarray:
    """One image file -> normalized float32 (C, H, W), exactly as the manifest says."""
    from PIL import Image, ImageOps

    height, width = preprocess["size"]
    channels = preprocess["channels"]
    resize = preprocess.get("resize", "squash")  # manifests before the resize option squashed
    if resize not in RESIZE_MODES:
        raise Refused(f"the manifest asks for resize mode {resize!r}, which this runner does not know "
                      f"({', '.join(RESIZE_MODES)}): use the runner shipped in the same bundle")
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image) if image.format in EXIF_FORMATS else image
        image = to_8bit(image).convert("L" if channels == 1 else "RGB")
        image = fit(image, (height, width), resize)
        pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels[None] if channels == 1 else np.moveaxis(pixels, -1, 0)
    mean = np.asarray(preprocess["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preprocess["std"], dtype=np.float32).reshape(-1, 1, 1)
    return ((pixels / np.float32(255.0) - mean) / std).astype(np.float32)


def run_model(session, images: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: images})[0]


def probabilities(session, outputs: np.ndarray) -> np.ndarray:
    """Softmax probabilities (N, K) of the model's first output."""
    first = outputs.astype(np.float64)
    if session.get_outputs()[0].name == "probs":  # an MC dropout model (variant mc) averages probabilities itself
        return first
    e = np.exp(first - first.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def available_providers() -> list:
    import onnxruntime as ort

    present = set(ort.get_available_providers())
    return [short for short, name in PROVIDERS.items() if name in present]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# --- which variant runs -----------------------------------------------------------------------


def read_report(folder: str, manifest_sha: str) -> dict | None:
    """device_report.json if it was written for this very manifest and its checks passed."""
    path = os.path.join(folder, REPORT)
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
    except (OSError, ValueError):
        return None
    if report.get("manifest_sha256") != manifest_sha or not report.get("passed"):
        return None
    return report


def _for_batch(entries: dict, batch: int):
    """The entry measured at `batch`, else at the largest measured batch below it, else the smallest one."""
    if not entries:
        return None
    sizes = sorted(entries)
    below = [b for b in sizes if b <= batch]
    return entries[below[-1] if below else sizes[0]]


def choose(folder: str, manifest: dict, manifest_sha: str, variant: str | None, batch: int) -> dict:
    """{"artifact", "provider", "threads", "engine", "by", "note"}: --variant, else this device's
    self-test choice, else the manifest's recommended deployment for the batch size, else `recommended`."""
    shipped = manifest.get("artifacts") or {}
    if not shipped:
        raise Refused("the manifest lists no model")
    plan = {"artifact": None, "provider": "cpu", "threads": None, "engine": "onnxruntime", "by": "", "note": None}
    if variant is not None:
        if variant not in shipped:
            raise Refused(f"no variant {variant!r} in this bundle: it holds {', '.join(sorted(shipped))}")
        return {**plan, "artifact": variant, "by": "--variant"}
    report = read_report(folder, manifest_sha)
    choices = {int(c["batch"]): c for c in (report or {}).get("choice", []) if c.get("artifact") in shipped}
    picked = _for_batch(choices, batch)
    if picked is not None:
        return {**plan, "artifact": picked["artifact"], "provider": picked.get("provider", "cpu"),
                "threads": picked.get("threads"), "by": f"{REPORT} (self-test choice at batch {picked['batch']})"}
    deployments = {}
    for entry in manifest.get("deployments") or []:  # written by the build host's bench; may be absent
        if isinstance(entry, dict) and entry.get("artifact") in shipped and isinstance(entry.get("batch"), int):
            deployments[entry["batch"]] = entry
    picked = _for_batch(deployments, batch)
    if picked is not None:
        chosen = {**plan, "artifact": picked["artifact"], "threads": picked.get("threads"),
                  "by": f"manifest deployments (build host's recommendation at batch {picked['batch']})"}
        engine, provider = picked.get("engine") or "onnxruntime", picked.get("provider") or "cpu"
        if engine != "onnxruntime":
            if picked.get("onnxruntime_artifact") in shipped:  # the file that measured fastest on onnxruntime there
                chosen["artifact"] = picked["onnxruntime_artifact"]
            chosen["note"] = (f"the recommended deployment at batch {picked['batch']} uses engine {engine!r}, "
                              f"which this runner does not drive: using {chosen['artifact']} on onnxruntime")
        elif provider not in available_providers():
            chosen["note"] = (f"the recommended deployment at batch {picked['batch']} uses provider {provider!r}, "
                              "not present in this onnxruntime: using cpu")
        else:
            chosen["provider"] = provider
        return chosen
    name = manifest.get("recommended")
    if name not in shipped:
        name = "fp32" if "fp32" in shipped else sorted(shipped)[0]
    return {**plan, "artifact": name, "by": "manifest recommended"}


# --- the self-test ------------------------------------------------------------------------------


def _check(checks: list, name: str, target: str, passed: bool, value=None, limit=None, detail: str = "") -> None:
    checks.append({"check": name, "target": target, "passed": bool(passed), "value": value, "limit": limit,
                   "detail": detail})


def _load_npy(folder: str, name: str, digest: str | None) -> np.ndarray:
    import io

    data = read_checked(folder, name, digest) if digest else read_file(folder, name)
    return np.load(io.BytesIO(data), allow_pickle=False)


def golden_checks(folder: str, manifest: dict, models: dict, checks: list) -> set:
    """Runs every variant (and .ort file) on the golden set; returns the variants that passed."""
    golden = manifest.get("golden")
    files = manifest.get("files") or {}
    artifacts = manifest["artifacts"]
    if not golden:
        _check(checks, "golden set", "bundle", True, detail="no golden set in this bundle: outputs not checked")
        return set(models)
    labels = manifest["labels"]
    inputs = _load_npy(folder, golden["inputs"], files.get(golden["inputs"]))
    tolerance = float(golden.get("tensor_tolerance", 1e-5))
    worst, worst_file = 0.0, None
    for index, name in enumerate(golden["images"]):
        read_checked(folder, name, files.get(name)) if name in files else None
        tensor = load_image(os.path.join(folder, name), manifest["preprocess"])
        diff = float(np.max(np.abs(tensor - inputs[index])))
        if diff >= worst:
            worst, worst_file = diff, name
    _check(checks, "png -> tensor", worst_file or "golden", worst <= tolerance, worst, tolerance,
           f"{len(golden['images'])} PNGs preprocessed here give their recorded tensors within {worst:.3g} "
           f"(worst {worst_file}, tolerance {tolerance:g})")
    passed = set()
    for variant, session in models.items():
        expected = (golden.get("outputs") or {}).get(variant)
        if not expected:
            _check(checks, "golden outputs", variant, False, detail=f"variant {variant}: no recorded golden outputs")
            continue
        outputs = run_model(session, inputs)
        ok = True
        if expected.get("logits") and expected.get("max_abs_diff") is not None:
            recorded = _load_npy(folder, expected["logits"], files.get(expected["logits"]))
            diff = float(np.max(np.abs(outputs.astype(np.float64) - recorded.astype(np.float64))))
            limit = float(expected["max_abs_diff"])
            _check(checks, "max abs diff", variant, diff <= limit, diff, limit,
                   f"variant {variant}: max abs diff {diff:.3g} from the recorded outputs (tolerance {limit:g})")
            ok &= diff <= limit
        if expected.get("top1") is not None:
            top1 = [labels[i] for i in np.argmax(outputs, axis=1)]
            agreement = float(np.mean([a == b for a, b in zip(top1, expected["top1"])]))  # noqa: B905 (3.8)
            limit = float(expected.get("min_agreement", TOP1_MIN_AGREEMENT))
            _check(checks, "top-1 agreement", variant, agreement >= limit, agreement, limit,
                   f"variant {variant}: top-1 labels agree with the recorded ones on {100 * agreement:.1f}% of "
                   f"{len(top1)} golden images (at least {100 * limit:g}% required)")
            ok &= agreement >= limit
        ort_record = (artifacts.get(variant) or {}).get("ort_format")
        if ort_record:
            # The .onnx with the optimizers the .ort was frozen with (its NCHWc layout off, as on ARM), so both run
            # the same kernels: then the outputs must agree to float precision.
            record = artifacts[variant]
            runtime = {**(record.get("runtime") or {}), "disabled_optimizers": ort_record.get("disabled_optimizers", [])}
            reference = run_model(create_session(read_file(folder, record["file"]), runtime, None), inputs)
            ort_session = create_session(read_checked(folder, ort_record["file"], ort_record["sha256"]), {}, None)
            diff = float(np.max(np.abs(run_model(ort_session, inputs).astype(np.float64) - reference.astype(np.float64))))
            _check(checks, ".ort = .onnx", ort_record["file"], diff <= ORT_TOLERANCE, diff, ORT_TOLERANCE,
                   f"{ort_record['file']}: max abs diff {diff:.3g} from {artifacts[variant]['file']}")
            ok &= diff <= ORT_TOLERANCE
        if ok:
            passed.add(variant)
    return passed


def _ratio_verdict(best: list, other: list) -> tuple[list, str]:
    """Paired per-round ratios best/other and the verdict: 'faster' unless their spread straddles 1."""
    ratios = [b / o for b, o in zip(best, other) if o > 0]  # noqa: B905 (3.8)
    if not ratios:
        return [], "faster"
    return ratios, ("within noise" if min(ratios) < 1.0 < max(ratios) else "faster")


def time_candidates(folder: str, manifest: dict, models: dict, batch_sizes, plan, threads_option) -> tuple[list, list]:
    """(timing records like `pipeline bench`'s, one choice per batch size)."""
    shape = tuple(manifest["artifacts"][next(iter(models))]["input"]["shape"][1:])
    providers = available_providers()
    records, choices = [], []
    cores = usable_cores()
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for batch in batch_sizes:
        threads = threads_option or (1 if batch == 1 else cores)  # pipeline bench's rule when it does not probe
        x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
        slots = []
        for provider in providers:
            for variant in models:
                record = manifest["artifacts"][variant]
                base = {"artifact": variant, "kind": record.get("kind", variant), "engine": "onnxruntime",
                        "provider": provider, "provider_name": PROVIDERS[provider], "batch": batch, "threads": threads,
                        "threads_source": "option" if threads_option else "auto (batch 1: one thread; else all usable cores)"}
                runtime = record.get("runtime") or {}
                try:
                    started = time.perf_counter()
                    session = create_session(read_file(folder, record["file"]), runtime, threads, provider)
                    create_ms = 1e3 * (time.perf_counter() - started)
                except Exception as exc:  # onnxruntime raises its own types; a provider may not take the model
                    records.append({**base, "status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:200]}"})
                    continue
                name = session.get_inputs()[0].name

                def run(session=session, name=name, x=x):
                    return session.run(None, {name: x})

                started = time.perf_counter()
                run()
                first = 1e3 * (time.perf_counter() - started)
                info = {"session_providers": session.get_providers(), "session_create_ms": create_ms, "first_run_ms": first,
                        "optimization_level": runtime.get("graph_optimization_level", "all"),
                        "disabled_optimizers": list(runtime.get("disabled_optimizers") or []), "io_binding": False}
                slots.append((base, timing.Slot(run=run, info=info)))
        if not slots:
            continue
        timing.time_interleaved([slot for _, slot in slots], plan)
        timed = []
        for base, slot in slots:
            stats = timing.summarize(slot.latencies_ns, batch)
            entry = {**base, "status": "ok", "reason": None, **slot.info, "warmup_runs": slot.warmup_runs,
                     "stopped_by": slot.stopped_by, "timed_seconds": slot.timed_seconds,
                     "round_p50_ms": timing.round_medians(slot), **stats}
            records.append(entry)
            timed.append((entry, slot))
        timed.sort(key=lambda item: item[0]["latency_ms"]["p50"])
        best, best_slot = timed[0]
        fp32 = next((s for e, s in timed if e["artifact"] == "fp32" and e["provider"] == best["provider"]), None)
        choice = {"batch": batch, "artifact": best["artifact"], "engine": "onnxruntime", "provider": best["provider"],
                  "threads": threads, "p50_ms": best["latency_ms"]["p50"],
                  "ratio_to_fp32": timing.ratio_of_medians(best_slot, fp32) if fp32 is not None else None,
                  "host": {"name": platform.node(), "machine": platform.machine()},
                  "measured": "device_runner.py --selftest", "created": created,
                  "candidates": len(timed), "verdict": "only candidate", "runner_up": None}
        if len(timed) > 1:
            second, second_slot = timed[1]
            ratios, verdict = _ratio_verdict(timing.round_medians(best_slot), timing.round_medians(second_slot))
            choice.update(runner_up=f"{second['artifact']}/{second['provider']}", verdict=verdict,
                          ratio_to_runner_up=timing.ratio_of_medians(best_slot, second_slot),
                          round_ratios_to_runner_up=ratios)
        choices.append(choice)
    return records, choices


def host_facts() -> dict:
    import onnxruntime as ort
    import PIL

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
                    model = value.strip()
                    break
    except OSError:
        pass
    return {"host": {"name": platform.node(), "cpu_model": model, "machine": platform.machine(),
                     "platform": platform.platform(), "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
                     "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            "versions": {"python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__,
                         "pillow": PIL.__version__},
            "onnxruntime_providers": ort.get_available_providers()}


def write_json(path: str, obj: dict) -> None:
    """Atomically: a temporary file beside the target, renamed over it. A read-only bundle folder is
    one line on stderr (use --report elsewhere), not a traceback; the verdict still sets the exit code."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        print(f"warning: cannot write {path} ({exc.strerror}): give --report PATH", file=sys.stderr)


def selftest(folder: str, args) -> int:
    import onnxruntime as ort

    started = time.perf_counter()
    checks: list = []
    report = {"schema": REPORT_SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "passed": False, **host_facts()}
    out = args.report or os.path.join(folder, REPORT)
    try:
        if args.verify_key:
            signed = verify_signature(folder, args.verify_key)
            _check(checks, "signature", SIGNATURE, True, detail=f"Ed25519 over {SUMS} (sha256 {signed[:16]}...)")
        sums = check_sums(folder)  # before the manifest is parsed: a changed manifest is named as such
        manifest = read_manifest(folder)
        count = check_integrity(folder, manifest, sums)
        _check(checks, "sha256", "bundle", True, count, detail=f"{count} files match their recorded sha256")
        report["manifest_sha256"] = hashlib.sha256(read_file(folder, "manifest.json")).hexdigest()
        report["bundle"] = manifest.get("bundle")
        names = list(manifest.get("artifacts") or {})
        needed = check_runtime(manifest, names, ort.__version__)
        _check(checks, "onnxruntime version", "bundle", True, ort.__version__, needed,
               f"needs >= {needed}, found {ort.__version__}")
    except Refused as exc:
        report.update(checks=checks, seconds=time.perf_counter() - started, failure=str(exc))
        write_json(out, report)
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    models = {}
    for variant in names:
        record = manifest["artifacts"][variant]
        try:
            models[variant] = create_session(read_file(folder, record["file"]), record.get("runtime") or {}, None)
        except Refused as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        except Exception as exc:  # onnxruntime's own error types (the bytes were hash-checked above)
            _check(checks, "loads", variant, False, detail=f"variant {variant}: onnxruntime cannot load "
                                                          f"{record['file']}: {' '.join(str(exc).split())[:200]}")
    try:
        passed = golden_checks(folder, manifest, models, checks) if models else set()
        plan = timing.TimingPlan(warmup=5, warmup_seconds=0.2, duration=args.budget / max(1, len(args.batch_sizes)) /
                                 max(1, len(passed) * len(available_providers())), rounds=args.rounds,
                                 time_limit=args.budget, settle_seconds=timing.SETTLE_SECONDS)
        timed = {v: s for v, s in models.items() if v in passed}
        records, choices = time_candidates(folder, manifest, timed, args.batch_sizes, plan, args.threads) if timed else ([], [])
    except Refused as exc:
        report.update(checks=checks, seconds=time.perf_counter() - started, failure=str(exc))
        write_json(out, report)
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:  # a model onnxruntime cannot run on the golden inputs, a malformed golden record
        report.update(checks=checks, seconds=time.perf_counter() - started, failure=f"{type(exc).__name__}: {exc}")
        write_json(out, report)
        print(f"selftest failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return EXIT_CHECK
    failed = [c for c in checks if not c["passed"]]
    report.update(passed=not failed, checks=checks, plan={k: getattr(plan, k) for k in
                                                          ("warmup", "warmup_seconds", "runs", "duration", "rounds",
                                                           "time_limit", "settle_seconds")},
                  timings=records, choice=choices, onnxruntime_required=needed,
                  bench_command=_bench_command(manifest, timed, args, plan, choices),
                  seconds=time.perf_counter() - started)
    write_json(out, report)
    if failed:
        more = f" (and {len(failed) - 1} more failed checks in {out})" if len(failed) > 1 else ""
        print(f"selftest failed: {failed[0]['detail'] or failed[0]['target']}{more}", file=sys.stderr)
        return EXIT_CHECK
    for line in summary_lines(report):
        print(line)
    return 0


def _bench_command(manifest: dict, models: dict, args, plan, choices) -> list:
    """The `pipeline bench` command lines that time the same candidates the same way on the build host."""
    run = (manifest.get("bundle") or {}).get("run", "RUN")  # the run folder's name on the build host
    return [f"pipeline bench --run {run} --variants {','.join(models)} --batch-sizes {c['batch']} "
            f"--threads {c['threads']} --warmup {plan.warmup} --duration {plan.duration:.3g} --rounds {plan.rounds} "
            "--no-baseline" for c in choices]


def summary_lines(report: dict) -> list:
    lines = [f"selftest passed in {report['seconds']:.1f} s on {report['host']['cpu_model']} "
             f"(onnxruntime {report['versions']['onnxruntime']}, providers "
             f"{','.join(p.replace('ExecutionProvider', '') for p in report['onnxruntime_providers'])})"]
    lines += [f"  {c['check']}: {c['detail'] or c['target']}" for c in report["checks"]]
    width = max([6] + [len(r["artifact"]) for r in report["timings"]])  # per-batch files have long names
    for r in report["timings"]:
        if r["status"] == "ok":
            lines.append(f"  time {r['artifact']:<{width}} {r['provider']:<5} batch {r['batch']:<4} threads {r['threads']:<2} "
                         f"p50 {r['latency_ms']['p50']:.4f} ms  p90 {r['latency_ms']['p90']:.4f} ms  runs {r['runs']}")
        else:
            lines.append(f"  time {r['artifact']} {r['provider']} batch {r['batch']}: {r['status']}: {r['reason']}")
    for c in report["choice"]:
        ratio = f", {c['ratio_to_fp32']:.2f}x fp32" if c.get("ratio_to_fp32") is not None else ""
        spread = c.get("round_ratios_to_runner_up") or []
        noise = (f" vs {c['runner_up']}: per-round ratios {min(spread):.2f}-{max(spread):.2f}" if spread else "")
        lines.append(f"  choice at batch {c['batch']}: {c['artifact']} on {c['provider']} ({c['p50_ms']:.4f} ms{ratio}); "
                     f"{c['verdict']}{noise}")
    return lines


# --- classification ---------------------------------------------------------------------------


def classify_files(folder: str, args) -> int:
    import onnxruntime as ort

    try:
        if args.verify_key:
            verify_signature(folder, args.verify_key)
        manifest = read_manifest(folder)
        if args.verify_key:  # the signature covers SHA256SUMS: every file must then match it
            check_integrity(folder, manifest)
        manifest_sha = hashlib.sha256(read_file(folder, "manifest.json")).hexdigest()
        plan = choose(folder, manifest, manifest_sha, args.variant, len(args.images))
        check_runtime(manifest, [plan["artifact"]], ort.__version__)
        record = manifest["artifacts"][plan["artifact"]]
        model = read_checked(folder, record["file"], record.get("sha256"))
        runtime = {**(manifest.get("runtime") or {}), **(record.get("runtime") or {})}
        started = time.perf_counter()
        session = create_session(model, runtime, args.threads or plan["threads"], plan["provider"])
        create_ms = 1e3 * (time.perf_counter() - started)
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if plan["note"]:
        print(f"note: {plan['note']}", file=sys.stderr)
    labels, preprocess = manifest["labels"], manifest["preprocess"]
    started = time.perf_counter()
    tensors, results = [], []
    for path in args.images:
        try:
            tensors.append(load_image(path, preprocess))
            results.append({"file": path})
        except Exception as exc:  # Pillow raises OSError, ValueError, DecompressionBombError, SyntaxError...
            results.append({"file": path, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"})
    preprocess_ms = 1e3 * (time.perf_counter() - started)
    inference_ms = 0.0
    if tensors:
        started = time.perf_counter()
        try:
            probs = probabilities(session, run_model(session, np.stack(tensors)))
        except Exception as exc:  # onnxruntime's own error types: a model that does not take these inputs
            print(f"error: {plan['artifact']} could not run: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
            return EXIT_CHECK
        inference_ms = 1e3 * (time.perf_counter() - started)
        rows = iter(probs)
        for result in results:
            if "error" not in result:
                row = next(rows)
                top = np.argsort(-row, kind="stable")[:max(args.top_k, 1)]
                result["top"] = [{"label": labels[i], "probability": float(row[i])} for i in top]
    failed = [r for r in results if "error" in r]
    if args.json:
        print(json.dumps({"variant": plan["artifact"], "engine": "onnxruntime", "provider": plan["provider"],
                          "session_providers": session.get_providers(), "chosen_by": plan["by"], "note": plan["note"],
                          "timings_ms": {"session_create": create_ms, "preprocess": preprocess_ms,
                                         "inference": inference_ms},
                          "images": results, "classified": len(results) - len(failed), "unreadable": len(failed)},
                         indent=2))
    else:
        for result in results:
            if "error" in result:
                print(f"error: cannot read {result['file']}: {result['error']}", file=sys.stderr)
            else:  # tab-separated, so a label with spaces stays one field
                ranked = "\t".join(f"{t['label']}\t{t['probability']:.4f}" for t in result["top"])
                print(f"{ranked}\t{result['file']}")
    if not tensors or (failed and args.strict):
        return EXIT_USAGE
    return 0


def default_folder() -> str:
    """The folder holding this script if it is a bundle, else the current folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    return here if os.path.isfile(os.path.join(here, "manifest.json")) else os.getcwd()


def _sizes(text: str) -> list:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with the bundled ONNX model, or self-test the bundle.")
    parser.add_argument("images", nargs="*", help="PNG or JPEG files of any size")
    parser.add_argument("--selftest", action="store_true", help="check, time and choose; write device_report.json")
    parser.add_argument("--bundle", default=None, help="folder holding manifest.json (default: this script's folder)")
    parser.add_argument("--variant", default=None, help="model variant to run (default: the self-test's choice, "
                                                        "else the manifest's recommendation)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--top-k", type=int, default=1, help="labels to print per image")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--strict", action="store_true", help="exit non-zero when any image cannot be read")
    parser.add_argument("--verify-key", default=None, help="Ed25519 public key (PEM): refuse an unsigned or altered bundle")
    parser.add_argument("--budget", type=float, default=2.0, help="self-test: seconds of timed runs in all")
    parser.add_argument("--rounds", type=int, default=6, help="self-test: interleaved timing rounds")
    parser.add_argument("--batch-sizes", type=_sizes, default=[1, 16], help="self-test: batch sizes to time (1,16)")
    parser.add_argument("--report", default=None, help=f"self-test: where to write the report (default: the bundle's {REPORT})")
    args = parser.parse_args(argv)
    if not args.selftest and not args.images:
        parser.error("give image files, or --selftest")
    if args.budget <= 0 or args.rounds < 1:
        parser.error("--budget must be > 0 and --rounds >= 1")
    folder = args.bundle or default_folder()
    if args.selftest:
        return selftest(folder, args)
    return classify_files(folder, args)


if __name__ == "__main__":
    sys.exit(main())
