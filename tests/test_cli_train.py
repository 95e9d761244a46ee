"""`pipeline train` through the CLI: the run folder, refusals, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.fixtures import write_idx_folder

runner = CliRunner()
TINY = ["--conv-channels", "4,8", "--fc-units", "16", "--epochs", "2", "--quiet", "--max-train-samples", "200"]


def invoke(*args):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, fragment: str, code: int | None = None):
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_help_does_not_import_torch():
    code = "import sys; from pipeline.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout


def test_train_writes_a_run_folder_and_refuses_to_overwrite_it(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "metrics.json", "curves.png", "manifest.json"}
    before = (out / "checkpoint.pt").read_bytes()
    assert_one_line_error(invoke("train", "--out", str(out), *TINY), "already exists", code=4)
    assert (out / "checkpoint.pt").read_bytes() == before  # untouched
    result = invoke("train", "--out", str(out), "--force", "--seed", "1", *TINY)
    assert result.exit_code == 0, result.output
    assert (out / "checkpoint.pt").read_bytes() != before
    assert not (tmp_path / "run.partial").exists()


def test_train_on_an_idx_folder(tmp_path):
    folder = write_idx_folder(tmp_path / "idx", n_per_class=20)
    result = invoke("train", "--dataset", "idx", "--data-dir", str(folder), "--out", str(tmp_path / "r"), *TINY[:-2])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args,fragment", [
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--epochs", "-3"], "epochs must be >= 1"),
    (["--dropout", "1"], "dropout must be in [0, 1)"),
    (["--batch-size", "0"], "batch size must be >= 1"),
    (["--dataset", "cifar"], "unknown dataset 'cifar'"),
    (["--optimizer", "lbfgs"], "unknown optimizer"),
    (["--device", "tpu"], "unknown device"),
    (["--conv-channels", "a,b"], "comma-separated integers"),
    (["--dataset", "idx"], "--data-dir is required"),
    (["--dataset", "idx", "--data-dir", "/nonexistent/mnist"], "no such data folder"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/photos"], "no such data folder"),
    (["--resize", "stretch"], "unknown resize mode 'stretch'"),
    (["--on-bad-image", "ignore"], "unknown bad-image policy 'ignore'"),
])
def test_bad_options_are_one_line_errors_and_leave_no_folder(tmp_path, args, fragment):
    out = tmp_path / "run"
    result = invoke("train", "--out", str(out), *args)
    assert_one_line_error(result, fragment)
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_bad_idx_file_is_a_one_line_error(tmp_path):
    folder = write_idx_folder(tmp_path / "idx", splits=("t10k",))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    assert_one_line_error(invoke("train", "--dataset", "idx", "--data-dir", str(folder), "--out", str(tmp_path / "r")),
                          "cannot read IDX file", code=3)


def test_resume_without_an_interrupted_run_is_refused(tmp_path):
    assert_one_line_error(invoke("train", "--resume", str(tmp_path / "run")), "nothing to resume", code=4)


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "train", "--epochs", "0", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)
