"""The golden set a bundle carries: real test images as the device reads them, and what each variant answered.

For `count` images of the run's TEST split (a seeded choice):
- `golden/NNN.png`: the image as an 8-bit PNG (what a camera or file gives a device);
- `golden/inputs.npy`: the model inputs those PNGs must become, computed here with
  `pipeline.data.Preprocess` (a second implementation of the manifest's preprocessing, so the
  device runner's own `load_image` is checked against it, not against itself);
- `golden/logits.<variant>.npy` and the top-1 labels of every shipped variant, run at pack time
  with the artifact's recorded ONNX Runtime settings.
The device runner's `--selftest` re-runs all of it and compares. Imports no torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np

from pipeline import data
from pipeline.config import DataConfig

FOLDER = "golden"
INPUTS = f"{FOLDER}/inputs.npy"
# Two implementations of "pixels / 255, then (x - mean) / std" in float32 may differ in the last bit.
TENSOR_TOLERANCE = 1e-5
MIN_AGREEMENT = 0.99


@dataclass(frozen=True)
class GoldenSet:
    files: dict
    """Bundle member name -> bytes."""
    record: dict
    """The manifest's `golden` section."""
    inputs: np.ndarray


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> PNG bytes (grayscale or RGB); Pillow's encoder is deterministic for the same input."""
    from PIL import Image

    image = Image.fromarray(pixels[0], mode="L") if pixels.shape[0] == 1 else Image.fromarray(np.moveaxis(pixels, 0, -1), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def to_8bit(raw: np.ndarray, scale: float) -> np.ndarray:
    """Raw pixels in the source's range -> uint8 0-255 (digits: 0-16 -> 0-255)."""
    return np.clip(np.rint(raw.astype(np.float64) * scale * 255.0), 0, 255).astype(np.uint8)


def choose(y_test: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` test indices, seeded, in ascending order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(y_test), size=min(count, len(y_test)), replace=False))


def load_test_split(manifest: dict, what: str) -> data.Splits:
    """The run's data, refused unless it is what the run was trained on (as quantize and export do)."""
    dataset = manifest.get("dataset") or {}
    return data.load_trained_on(DataConfig.from_dict(dataset["config"]), dataset.get("fingerprint"), what)


def build(manifest: dict, splits: data.Splits, count: int, seed: int = 0) -> GoldenSet:
    """PNG files and their model inputs; variants' outputs are added by `add_outputs`."""
    preprocess = data.Preprocess.from_dict(manifest["preprocess"])
    index = choose(splits.y_test, count, seed)
    pixels = to_8bit(splits.x_test[index], preprocess.scale)
    # The device reads 8-bit files: its scale is 1/255, whatever the source's range was.
    inputs = replace(preprocess, scale=1.0 / 255.0).apply(pixels.astype(np.float32))
    files = {f"{FOLDER}/{i:03d}.png": png_bytes(p) for i, p in enumerate(pixels)}
    files[INPUTS] = npy_bytes(inputs)
    labels = manifest["labels"]
    record = {"count": len(index), "seed": seed, "split": "test", "test_indices": [int(i) for i in index],
              "images": sorted(n for n in files if n.endswith(".png")), "inputs": INPUTS,
              "truth": [labels[int(y)] for y in splits.y_test[index]], "tensor_tolerance": TENSOR_TOLERANCE,
              "outputs": {}}
    return GoldenSet(files, record, inputs)


def add_outputs(golden: GoldenSet, variant: str, kind: str, outputs: np.ndarray, labels: list,
                tolerance: float | None) -> None:
    """Record a variant's answers: its logits file and top-1 labels; fp32 also gets a max-abs-diff bound."""
    name = f"{FOLDER}/logits.{variant}.npy"
    golden.files[name] = npy_bytes(outputs)
    top1 = [labels[int(i)] for i in np.argmax(outputs, axis=1)]
    # An MC dropout model samples its masks on every run: its top-1 may move on a near tie.
    entry = {"logits": name, "top1": top1, "min_agreement": MIN_AGREEMENT if kind != "mc" else 0.9,
             "accuracy": float(np.mean([a == b for a, b in zip(top1, golden.record["truth"], strict=True)]))}
    if kind == "fp32" and tolerance is not None:
        entry["max_abs_diff"] = tolerance
    golden.record["outputs"][variant] = entry
