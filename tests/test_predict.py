"""`pipeline predict`: torch-free, checks the model hash, converts every input kind as the manifest says.

The reference for "correct" is the exported model run directly under ONNX Runtime on the
dataset's raw test images through `Preprocess.apply`: predict must give the same answers
from PNG/JPEG/IDX/.npy files written from those images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import artifacts
from pipeline.cli import app

REPO = Path(__file__).resolve().parent.parent
N_IMAGES = 40

# Run in a fresh interpreter: any attempt to import torch is recorded and refused, and at exit
# the script prints what was attempted. A module that swallowed the ImportError would still show.
BLOCK_TORCH = """
import sys, json, atexit
attempts = []
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            attempts.append(name)
            raise ImportError(f"torch is blocked in this test ({name})")
        return None
sys.meta_path.insert(0, _BlockTorch())
def _report():
    loaded = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
    print("TORCH_ATTEMPTS=" + json.dumps(attempts + loaded), file=sys.stderr)
atexit.register(_report)
"""


@pytest.fixture
def exported(exported_run_master) -> Path:
    """The shared exported tiny run (issue 3's `export_run`): read it, never change it."""
    return exported_run_master


def digits_test_split(run: Path, n: int = N_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """The first n raw test images of the run's own dataset (digits: 0-16) and their labels."""
    from pipeline.config import DataConfig
    from pipeline.data import load

    saved = artifacts.read_manifest(run)["dataset"]["config"]
    splits = load(DataConfig(**{**saved, "data_dir": saved["data_dir"], "image_size": saved["image_size"]}))
    return splits.x_test[:n], splits.y_test[:n]


def reference_labels(run: Path, raw: np.ndarray) -> np.ndarray:
    """What the exported model answers on the raw images, straight through ORT and Preprocess.apply."""
    from pipeline.data import Preprocess
    from pipeline.runtime import create_session, run_batched

    manifest = artifacts.read_manifest(run)
    record = manifest["artifacts"]["fp32"]
    session = create_session(run / record["file"], record["runtime"])
    return run_batched(session, Preprocess.from_dict(manifest["preprocess"]).apply(raw)).argmax(1)


def to_8bit(raw: np.ndarray, scale: float) -> np.ndarray:
    """Raw pixels -> the 8-bit image a user would have: raw * scale in [0, 1], times 255."""
    return np.clip(np.round(raw * scale * 255.0), 0, 255).astype(np.uint8)


def write_pngs(folder: Path, images8: np.ndarray, size: int | None = None, suffix: str = ".png") -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images8):
        picture = Image.fromarray(image[0])
        if size is not None:
            picture = picture.resize((size, size), Image.Resampling.BILINEAR)
        path = folder / f"{i:03d}{suffix}"
        picture.save(path, quality=95) if suffix == ".jpg" else picture.save(path)
        paths.append(path)
    return paths


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def predict_json(*args: str) -> dict:
    result = cli("predict", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def top_labels(payload: dict) -> np.ndarray:
    return np.array([int(p["label"]) for p in payload["predictions"]])


# --- torch-free ---------------------------------------------------------------------------


def run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def torch_attempts(stderr: str) -> list[str]:
    line = next(line for line in stderr.splitlines() if line.startswith("TORCH_ATTEMPTS="))
    return json.loads(line.split("=", 1)[1])


def test_predict_does_not_import_torch(exported, tmp_path):
    raw, _ = digits_test_split(exported, 3)
    scale = artifacts.read_manifest(exported)["preprocess"]["scale"]
    pngs = write_pngs(tmp_path / "png", to_8bit(raw, scale))
    argv = ["pipeline", "predict", str(exported), *map(str, pngs), "--json"]
    result = run_blocked(f"import sys\nfrom pipeline.cli import main\nsys.argv = {argv!r}\nmain()", tmp_path)
    assert result.returncode == 0, result.stderr
    assert torch_attempts(result.stderr) == []
    assert len(json.loads(result.stdout)["predictions"]) == 3


def test_torch_blocker_catches_an_import_of_torch(tmp_path):
    """Negative control: the harness above would notice a command that imports torch."""
    result = run_blocked("import pipeline.train", tmp_path)
    assert result.returncode != 0
    assert "torch is blocked" in result.stderr
    assert torch_attempts(result.stderr)[0] == "torch"


# --- inputs converted as the manifest says --------------------------------------------------


def test_png_predictions_match_the_model_on_raw_pixels(exported, tmp_path):
    raw, truth = digits_test_split(exported)
    scale = artifacts.read_manifest(exported)["preprocess"]["scale"]
    expected = reference_labels(exported, raw)
    got = top_labels(predict_json(str(exported), *map(str, write_pngs(tmp_path, to_8bit(raw, scale)))))
    # PNG rounds raw * scale to 1/255 steps: a near-tie may flip, nothing more.
    assert np.mean(got == expected) >= 0.95
    assert abs(np.mean(got == truth) - np.mean(expected == truth)) <= 0.05


def test_inverted_images_are_a_negative_control(exported, tmp_path):
    """Converting the pixels wrongly (--invert on light-on-dark digits) must change the answers."""
    raw, _ = digits_test_split(exported)
    scale = artifacts.read_manifest(exported)["preprocess"]["scale"]
    pngs = list(map(str, write_pngs(tmp_path, to_8bit(raw, scale))))
    right = top_labels(predict_json(str(exported), *pngs))
    wrong = top_labels(predict_json(str(exported), *pngs, "--invert"))
    assert np.mean(right == wrong) < 0.6


def test_large_jpegs_are_resized_to_the_model_input(exported, tmp_path):
    raw, _ = digits_test_split(exported)
    scale = artifacts.read_manifest(exported)["preprocess"]["scale"]
    expected = reference_labels(exported, raw)
    jpegs = write_pngs(tmp_path, to_8bit(raw, scale), size=64, suffix=".jpg")
    got = top_labels(predict_json(str(exported), *map(str, jpegs)))
    # Up- then down-sampling and JPEG blur the 8x8 digits a little: most answers must survive.
    assert np.mean(got == expected) >= 0.8


def test_npy_and_idx_inputs(exported, tmp_path):
    raw, _ = digits_test_split(exported)
    manifest = artifacts.read_manifest(exported)
    expected = reference_labels(exported, raw)

    float_npy = tmp_path / "raw.npy"
    np.save(float_npy, raw)  # raw pixels in the source's own range: Preprocess.apply exactly
    payload = predict_json(str(exported), str(float_npy))
    assert [p["input"] for p in payload["predictions"][:2]] == [f"{float_npy}[0]", f"{float_npy}[1]"]
    assert np.array_equal(top_labels(payload), expected)

    single = tmp_path / "one.npy"
    np.save(single, raw[0, 0])  # one H x W image
    assert predict_json(str(exported), str(single))["predictions"][0]["input"] == str(single)

    images8 = to_8bit(raw, manifest["preprocess"]["scale"])[:, 0]
    idx = tmp_path / "t10k-images-idx3-ubyte"
    idx.write_bytes(bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images8.shape) + images8.tobytes())
    assert np.mean(top_labels(predict_json(str(exported), str(idx))) == expected) >= 0.95


def test_top_k_and_probabilities(exported, tmp_path):
    raw, _ = digits_test_split(exported, 2)
    path = tmp_path / "x.npy"
    np.save(path, raw)
    payload = predict_json(str(exported), str(path), "--top-k", "4")
    for p in payload["predictions"]:
        probabilities = [t["probability"] for t in p["top"]]
        assert len(probabilities) == 4
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-9
        assert p["label"] == p["top"][0]["label"]
    assert payload["model"]["variant"] == "fp32"
    assert payload["model"]["provider"] == "CPUExecutionProvider"


def test_table_output(exported, tmp_path):
    raw, _ = digits_test_split(exported, 1)
    path = tmp_path / "x.npy"
    np.save(path, raw)
    result = cli("predict", str(exported), str(path))
    assert result.exit_code == 0, result.output
    assert "fp32" in result.stdout and "x.npy" in result.stdout and "%" in result.stdout


# --- refusals -----------------------------------------------------------------------------


def test_tampered_model_is_refused(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported, run)
    path = run / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    raw, _ = digits_test_split(exported, 1)
    np.save(tmp_path / "x.npy", raw)
    result = cli("predict", str(run), str(tmp_path / "x.npy"))
    assert result.exit_code == 8
    assert "sha256" in result.output and "refusing" in result.output
    assert "Traceback" not in result.output
    # Negative control: the untouched run is accepted with the same input.
    assert cli("predict", str(exported), str(tmp_path / "x.npy")).exit_code == 0


def test_unknown_variant_and_unexported_run(exported, tiny_run, tmp_path):
    raw, _ = digits_test_split(exported, 1)
    np.save(tmp_path / "x.npy", raw)
    result = cli("predict", str(exported), str(tmp_path / "x.npy"), "--variant", "int4")
    assert result.exit_code == 4 and "int4" in result.output and "fp32" in result.output
    result = cli("predict", str(tiny_run), str(tmp_path / "x.npy"))
    assert result.exit_code == 4 and "pipeline export" in result.output


def test_bad_inputs_are_one_line_errors(exported, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    wrong_shape = tmp_path / "wrong.npy"
    np.save(wrong_shape, np.zeros((2, 3, 5, 5), dtype=np.float32))
    for path in (text, broken, wrong_shape, tmp_path / "missing.png"):
        result = cli("predict", str(exported), str(path))
        assert result.exit_code == 3, (path, result.output)
        assert result.output.startswith("error:") and str(path.name) in result.output


def test_files_folders_and_globs_report_every_readable_image_and_list_the_rest(exported, tmp_path):
    raw, _ = digits_test_split(exported, 5)
    scale = artifacts.read_manifest(exported)["preprocess"]["scale"]
    pngs = write_pngs(tmp_path / "shots" / "day1", to_8bit(raw, scale))
    expected = reference_labels(exported, raw)
    (tmp_path / "shots" / "day1" / "._000.png").write_bytes(b"resource fork")  # never an input
    (tmp_path / "shots" / "broken.png").write_bytes(b"\x89PNG not really")
    payload = predict_json(str(exported), str(tmp_path / "shots"), str(tmp_path / "missing.png"))
    assert [p["input"] for p in payload["predictions"]] == [str(p) for p in pngs]  # the folder, recursively
    assert np.array_equal(top_labels(payload), expected)
    assert {u["input"] for u in payload["unreadable"]} == {str(tmp_path / "shots" / "broken.png"),
                                                            str(tmp_path / "missing.png")}
    by_glob = predict_json(str(exported), str(tmp_path / "shots" / "**" / "00[12].png"))
    assert [p["input"] for p in by_glob["predictions"]] == [str(pngs[1]), str(pngs[2])]
    assert by_glob["unreadable"] == []
    # --strict: the same readable results, then a non-zero exit naming the unreadable ones.
    strict = cli("predict", str(exported), str(pngs[0]), str(tmp_path / "shots" / "broken.png"), "--strict")
    assert strict.exit_code == 3 and "broken.png" in strict.output and "1 unreadable input(s) beside 1" in strict.output
    # Nothing readable at all: an error, as before.
    nothing = cli("predict", str(exported), str(tmp_path / "nothing-*.png"))
    assert nothing.exit_code == 3 and "no input could be read" in nothing.output and "matches" in nothing.output


# --- a bare .onnx ---------------------------------------------------------------------------


def test_model_file_inside_its_run_uses_the_manifest(exported, tmp_path):
    raw, _ = digits_test_split(exported, 3)
    np.save(tmp_path / "x.npy", raw)
    by_file = predict_json(str(exported / "model.onnx"), str(tmp_path / "x.npy"))
    by_run = predict_json(str(exported), str(tmp_path / "x.npy"))
    assert by_file["model"]["labels_from"] == "manifest"
    assert by_file["predictions"] == by_run["predictions"]


def test_bare_onnx_needs_metadata_or_an_explicit_assumption(exported, tmp_path):
    import onnx

    raw, _ = digits_test_split(exported, 3)
    np.save(tmp_path / "x.npy", raw)
    manifest = artifacts.read_manifest(exported)
    reference = predict_json(str(exported), str(tmp_path / "x.npy"))["predictions"]

    proto = onnx.load(str(exported / "model.onnx"))
    with_metadata = tmp_path / "with" / "model.onnx"
    with_metadata.parent.mkdir()
    props = {p.key: p.value for p in proto.metadata_props}
    # The export stage writes these into the file itself; the test must not add them (that hid a regression).
    assert json.loads(props["labels"]) == manifest["labels"]
    assert json.loads(props["preprocess"]) == manifest["preprocess"]
    onnx.save(proto, str(with_metadata))
    payload = predict_json(str(with_metadata), str(tmp_path / "x.npy"))
    assert payload["model"]["labels_from"] == "metadata"
    assert [p["label"] for p in payload["predictions"]] == [p["label"] for p in reference]

    del proto.metadata_props[:]
    bare = tmp_path / "bare" / "model.onnx"
    bare.parent.mkdir()
    onnx.save(proto, str(bare))
    result = cli("predict", str(bare), str(tmp_path / "x.npy"))
    assert result.exit_code == 4 and "--assume" in result.output and "preprocess" in result.output
    assumed = predict_json(str(bare), str(tmp_path / "x.npy"), "--assume")
    assert assumed["model"]["labels_from"] == "assumed"
    assert assumed["model"]["preprocess"]["mean"] == [0.0]
