#!/usr/bin/env python3
"""Classify images on a device with the bundled ONNX model. Needs onnxruntime, numpy, Pillow only.

Run it inside an unpacked bundle (the folder holding manifest.json):

    python device_runner.py digit.png photo.jpg
    7 0.9931 digit.png
    3 0.8120 photo.jpg

Each line starts with the top label, then its probability, then the file. It:
  1. reads manifest.json (labels, preprocessing, the model record and its ONNX Runtime settings),
  2. checks the model file's sha256 against the manifest before loading it, and refuses a
     changed file (exit 3),
  3. creates the session with the manifest's settings (graph optimization level, disabled
     optimizers, threads): the model then runs as it was measured,
  4. converts each image as the manifest says: grayscale or RGB, resized (bilinear) to the
     model's size, pixels / 255, then (x - mean) / std, float32 NCHW.

This file is standalone on purpose (no `pipeline` import): copy it next to the model.
Exit codes: 0 ok, 2 bad usage or unreadable image, 3 model refused (hash, missing file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


class Refused(Exception):
    """The bundle cannot be trusted or used: missing file, changed model, unknown setting."""


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise Refused(f"{path}: cannot read the manifest: {exc}") from None


def choose_artifact(manifest: dict, variant: str | None) -> tuple[str, dict]:
    shipped = manifest.get("artifacts") or {}
    if not shipped:
        raise Refused("the manifest lists no model")
    name = variant or manifest.get("recommended")
    if name not in shipped:
        if variant is not None:
            raise Refused(f"no variant {variant!r} in this bundle: it holds {', '.join(sorted(shipped))}")
        name = "fp32" if "fp32" in shipped else sorted(shipped)[0]
    return name, shipped[name]


def read_checked_model(folder: str, record: dict) -> bytes:
    """The model's bytes, hashed as read, so that what was checked is exactly what is loaded."""
    path = os.path.join(folder, record["file"])
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise Refused(f"{path}: cannot read the model: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.get("sha256"):
        raise Refused(f"{path}: sha256 {digest} does not match the manifest's {record.get('sha256')}: "
                      "the model file was changed; refusing to run it")
    return data


def create_session(model: bytes, runtime: dict, threads: int | None):
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
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def load_image(path: str, preprocess: dict) -> np.ndarray:
    """One image file -> normalized float32 (C, H, W), exactly as the manifest says."""
    from PIL import Image

    height, width = preprocess["size"]
    channels = preprocess["channels"]
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            # Image.Resampling is Pillow >= 9.1; older device images have Image.BILINEAR.
            image = image.resize((width, height), getattr(Image, "Resampling", Image).BILINEAR)
        pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels[None] if channels == 1 else np.moveaxis(pixels, -1, 0)
    mean = np.asarray(preprocess["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preprocess["std"], dtype=np.float32).reshape(-1, 1, 1)
    return ((pixels / np.float32(255.0) - mean) / std).astype(np.float32)


def classify(session, images: np.ndarray) -> np.ndarray:
    """Softmax probabilities (N, K) of a batch of normalized images."""
    name = session.get_inputs()[0].name
    first = session.run(None, {name: images})[0].astype(np.float64)
    if session.get_outputs()[0].name == "probs":  # an MC dropout model (variant mc) averages probabilities itself
        return first
    e = np.exp(first - first.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def default_folder() -> str:
    """The folder holding this script if it is a bundle, else the current folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    return here if os.path.isfile(os.path.join(here, "manifest.json")) else os.getcwd()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with the bundled ONNX model.")
    parser.add_argument("images", nargs="+", help="PNG or JPEG files of any size")
    parser.add_argument("--bundle", default=None, help="folder holding manifest.json (default: this script's folder)")
    parser.add_argument("--variant", default=None, help="model variant to run (default: the manifest's recommended)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--top-k", type=int, default=1, help="labels to print per image")
    args = parser.parse_args(argv)

    folder = args.bundle or default_folder()
    try:
        manifest = read_manifest(folder)
        _, record = choose_artifact(manifest, args.variant)
        model = read_checked_model(folder, record)
        runtime = {**(manifest.get("runtime") or {}), **(record.get("runtime") or {})}
        session = create_session(model, runtime, args.threads)
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 3
    labels, preprocess = manifest["labels"], manifest["preprocess"]
    try:
        batch = np.stack([load_image(path, preprocess) for path in args.images])
    except OSError as exc:
        print(f"error: cannot read image: {exc}", file=sys.stderr)
        return 2
    probabilities = classify(session, batch)
    for path, row in zip(args.images, probabilities):  # noqa: B905 (zip(strict=) is Python 3.10+; devices may run 3.8)
        top = np.argsort(-row, kind="stable")[:max(args.top_k, 1)]
        ranked = " ".join(f"{labels[i]} {row[i]:.4f}" for i in top)
        print(f"{ranked} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
