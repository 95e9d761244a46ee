"""`pipeline train` through the CLI: the run folder, refusals, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ConfigError
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- honest exits: only a bad option is 2, anything unexpected is a bug (70) ---------------------


@pytest.mark.parametrize("raised, code, fragment", [
    (ValueError("internal"), 70, "unexpected ValueError: internal: a bug, please report it"),
    (json.JSONDecodeError("Expecting value", "x", 0), 70, "unexpected JSONDecodeError"),
    (ConfigError("--epochs must be >= 1"), 2, "--epochs must be >= 1"),
])
def test_only_option_validation_exits_2(tmp_path, monkeypatch, raised, code, fragment):
    from pipeline import workflow

    def broken(*args, **kwargs):
        raise raised

    monkeypatch.setattr(workflow, "train_run", broken)
    result = invoke("train", "--out", str(tmp_path / "r"), "--quiet")
    assert_one_line_error(result, fragment, code=code)
    if code == 70:
        assert "`pipeline --debug train ...`" in result.output


def test_config_validation_raises_config_error_which_is_a_value_error():
    from pipeline.config import TrainConfig

    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    assert issubclass(ConfigError, ValueError)  # `pytest.raises(ValueError)` around configs still holds


# --- resume as users try it ---------------------------------------------------------------------


def _fake_interrupted(tmp_path, monkeypatch):
    """An interrupted run on disk (a train state in r.partial) and a train_run that records what it was given."""
    from pipeline import artifacts, workflow

    run = tmp_path / "r"
    artifacts.partial_dir(run).mkdir(parents=True)
    (artifacts.partial_dir(run) / artifacts.TRAIN_STATE).write_bytes(b"state")
    calls = []

    def recording(data_config, model_config, train_config, out, **kwargs):
        calls.append((out, kwargs["resume"], artifacts.resume_run(out)))
        raise ConfigError("stop here")

    monkeypatch.setattr(workflow, "train_run", recording)
    return run, calls


def test_resume_accepts_the_partial_folder_the_user_sees(tmp_path, monkeypatch):
    run, calls = _fake_interrupted(tmp_path, monkeypatch)
    for given in (run, tmp_path / "r.partial"):
        invoke("train", "--resume", str(given), "--quiet")
    assert calls == [(run, True, tmp_path / "r.partial")] * 2


def test_resume_refuses_options_that_would_change_the_run(tmp_path, monkeypatch):
    run, calls = _fake_interrupted(tmp_path, monkeypatch)
    assert_one_line_error(invoke("train", "--resume", str(run), "--epochs", "50"),
                          "--resume continues the run with its saved settings; --epochs would change it", code=2)
    assert_one_line_error(invoke("train", "--resume", str(run), "--lr", "0.1", "--out", str(tmp_path / "x")),
                          "--out, --lr would change it", code=2)
    assert calls == []
    invoke("train", "--resume", str(run), "--quiet")  # control: --quiet changes nothing of the run
    assert len(calls) == 1


def test_ctrl_c_in_training_names_the_command_that_continues_it(tmp_path, monkeypatch):
    from pipeline import artifacts, workflow

    run = tmp_path / "my run"

    def interrupted(data_config, model_config, train_config, out, **kwargs):
        artifacts.partial_dir(out).mkdir()
        if epochs_done:
            (artifacts.partial_dir(out) / artifacts.TRAIN_STATE).write_bytes(b"state")
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "train_run", interrupted)
    epochs_done = False
    assert_one_line_error(invoke("train", "--out", str(run), "--quiet"), "nothing to resume", code=130)
    artifacts.partial_dir(run).rmdir()
    epochs_done = True
    result = invoke("train", "--out", str(run), "--quiet")
    assert_one_line_error(result, f"`pipeline train --resume '{run}'` continues", code=130)
