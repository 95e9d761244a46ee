"""A battery of bad inputs across the commands (issue 7): every one exits non-zero with a one-line
message and no traceback, and no valid artifact in the run folder is changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from tests.fixtures import write_image_folder

runner = CliRunner()


def _digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".manifest.lock")}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, exported_run_master) -> dict[str, Path]:
    """Bad inputs of every kind, made once, beside a pristine copy of an exported run."""
    root = tmp_path_factory.mktemp("bad")
    model_bytes = (exported_run_master / "model.onnx").read_bytes()
    files = {
        "empty.onnx": b"",
        "truncated.onnx": model_bytes[: len(model_bytes) // 2],
        "text.onnx": b"name,label\n1,2\n",
        "notes.txt": b"not an image",
    }
    paths = {name: root / name for name in files}
    for name, content in files.items():
        paths[name].write_bytes(content)
    checkpoint = torch.load(exported_run_master / "checkpoint.pt", weights_only=True)
    checkpoint["model_config"]["conv_channels"] = [5, 7]
    torch.save(checkpoint, root / "other_arch.pt")
    paths["other_arch.pt"] = root / "other_arch.pt"
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 definitely not a zip")
    paths["corrupt.pt"] = root / "corrupt.pt"
    np.save(root / "wrong_size.npy", np.zeros((2, 1, 5, 5), np.float32))
    paths["wrong_size.npy"] = root / "wrong_size.npy"
    nan = np.zeros((1, 1, 8, 8), np.float32)
    nan[0, 0, 0, 0] = np.nan
    np.save(root / "nan.npy", nan)
    paths["nan.npy"] = root / "nan.npy"
    np.savez(root / "nan.npz", x_train=np.full((30, 8, 8), np.nan), y_train=np.repeat(np.arange(3), 10),
             x_test=np.zeros((6, 8, 8)), y_test=np.repeat(np.arange(3), 2))
    paths["nan.npz"] = root / "nan.npz"
    images = write_image_folder(root / "images")
    (images / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths["images"] = images
    return paths


def _cases(f: dict[str, Path], run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments, fragment the one-line error must contain)."""
    return [
        (["train", "--epochs", "-1", "--out", str(tmp / "t")], "epochs must be >= 1"),
        (["train", "--dropout", "1.5", "--out", str(tmp / "t")], "dropout must be in [0, 1)"),
        (["train", "--batch-size", "0", "--out", str(tmp / "t")], "batch size must be >= 1"),
        (["train", "--dataset", "imagenet", "--out", str(tmp / "t")], "unknown dataset"),
        (["train", "--dataset", "idx", "--data-dir", str(tmp / "missing"), "--out", str(tmp / "t")], "no such data folder"),
        (["train", "--dataset", "npz", "--data-dir", str(f["nan.npz"]), "--out", str(tmp / "t")], "NaN or infinite"),
        (["train", "--dataset", "folder", "--data-dir", str(f["images"]), "--image-size", "8", "--out", str(tmp / "t")],
         "unreadable image"),
        (["train", "--out", str(run)], "already exists"),
        (["export", "--run", str(tmp / "no-run")], "no such run folder"),
        (["export", "--checkpoint", str(f["corrupt.pt"]), "--out", str(tmp / "e")], "not a readable checkpoint"),
        (["export", "--checkpoint", str(f["other_arch.pt"]), "--out", str(tmp / "e2")], "do not match"),
        (["export", "--run", str(run), "--opset", "5"], "opset"),
        (["inspect", str(f["empty.onnx"])], "empty file"),
        (["inspect", str(f["truncated.onnx"])], "truncated.onnx"),
        (["inspect", str(f["text.onnx"])], "not an ONNX model"),
        (["inspect", str(tmp / "missing.onnx")], "missing.onnx"),
        (["bench", "--run", str(run), "--provider", "tpu"], "unknown provider"),
        (["bench", "--run", str(run), "--batch-sizes", "0"], "batch"),
        (["bench", str(f["truncated.onnx"])], "truncated.onnx"),
        (["quantize", str(run), "--quant-method", "magic"], "magic"),
        (["predict", str(run), str(f["wrong_size.npy"])], "shape"),
        (["predict", str(run), str(f["notes.txt"])], "notes.txt"),
        (["predict", str(run), str(f["nan.npy"])], "NaN"),
        (["predict", str(run), str(tmp / "missing.png")], "missing.png"),
        (["pack", str(run), "--variant", "int4"], "int4"),
    ]


def test_every_bad_input_is_one_line_and_changes_no_artifact(bad_files, exported_run, tmp_path):
    before = _digest_tree(exported_run)
    cases = _cases(bad_files, exported_run, tmp_path)
    assert len(cases) >= 20
    problems = []
    for args, fragment in cases:
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        ok = (result.exit_code not in (0, None) and len(lines) == 1 and lines[0].startswith("error: ")
              and fragment.lower() in lines[0].lower() and "Traceback" not in result.output
              and not isinstance(result.exception, (AssertionError, TypeError, AttributeError, KeyError)))
        if not ok:
            problems.append(f"{' '.join(args[:3])}... -> exit {result.exit_code}: {result.output.strip()[:300]!r}")
    assert not problems, "\n".join(problems)
    assert _digest_tree(exported_run) == before  # no valid artifact changed
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists() and not (tmp_path / "e2").exists()


def test_tampered_model_is_refused_by_every_consumer(exported_run):
    model = exported_run / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    for args in (["predict", str(exported_run), str(exported_run / "curves.png")], ["bench", "--run", str(exported_run)]):
        result = runner.invoke(app, args)
        assert result.exit_code != 0, (args, result.output)
        assert "sha256" in result.output.lower(), (args, result.output)
