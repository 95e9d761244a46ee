"""Every command a message suggests works when pasted: the hints printed in failure scenarios are
collected from the real output and parsed by the real Typer app (a wrong option or an unquoted
path with a space fails here), and the cheap ones are run.

The folders have spaces in their names on purpose: an unquoted path in a hint splits in two.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline import artifacts
from pipeline.cli import app
from tests.test_bench import linear_model, write_run

HINT = re.compile(r"`([^`]+)`")
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def hints(output: str) -> list[list[str]]:
    """Every backquoted `pipeline ...` command in `output`, split as a shell would split it."""
    found = [shlex.split(text) for text in HINT.findall(output) if text.startswith("pipeline ")]
    assert found, f"no hint in {output!r}"
    return found


def assert_accepted(argv: list[str]) -> None:
    """The real app parses `pipeline ARGV...` (options exist, arguments present, types convert) without running it."""
    assert argv[0] == "pipeline", argv
    group = typer.main.get_command(app)
    context = group.make_context("pipeline", list(argv[1:]))
    name = argv[1]
    command = group.get_command(context, name)
    assert command is not None, f"no command {name!r} in {argv}"
    command.make_context(name, list(argv[2:]), parent=context)


def test_the_parser_check_can_fail():
    """Negative control: the hints this issue found wrong are refused by the check."""
    for wrong in (["pipeline", "export", "models/digits"], ["pipeline", "train", "--resume"],
                  ["pipeline", "quantize", "--fp16"], ["pipeline", "pack", "my", "run", "x"]):
        with pytest.raises(Exception):  # noqa: B017 - click's UsageError family, whichever applies
            assert_accepted(wrong)


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "my runs"
    folder.mkdir()
    return folder


@pytest.fixture
def empty_run(root):
    """A finished run with no exported artifact yet."""
    return write_run(root / "no export")


def _interrupted(root):
    run = root / "cut short"
    artifacts.partial_dir(run).mkdir()
    (artifacts.partial_dir(run) / artifacts.TRAIN_STATE).write_bytes(b"state")
    return run


def _check(result, code: int, run) -> list[list[str]]:
    assert result.exit_code == code, result.output
    found = hints(result.output)
    for argv in found:
        assert_accepted(argv)
        assert str(run) in argv, (argv, run)  # the path comes through whole, spaces and all
    return found


def test_hints_for_an_interrupted_run_name_resume_with_the_run(root):
    run = _interrupted(root)
    for args in (["export", "--run", run], ["train", "--out", run, "--quiet"], ["bench", "--run", run]):
        found = _check(invoke(*args), 4, run)
        assert found == [["pipeline", "train", "--resume", str(run)]]


def test_hints_for_a_run_without_an_export_name_export_with_run(empty_run, tmp_path):
    image = tmp_path / "x.npy"
    image.write_bytes(b"")
    for args in (["bench", "--run", empty_run], ["quantize", empty_run], ["predict", empty_run, image],
                 ["pack", empty_run]):
        found = _check(invoke(*args), 4, empty_run)
        assert found == [["pipeline", "export", "--run", str(empty_run)]], args


def test_fp16_without_quantize_names_the_quantize_command(empty_run):
    found = _check(invoke("export", "--run", empty_run, "--fp16"), 2, empty_run)
    assert found == [["pipeline", "quantize", str(empty_run), "--fp16"]]


def test_ctrl_c_in_training_names_a_resume_that_parses(root, monkeypatch):
    from pipeline import workflow

    run = root / "r"

    def interrupted(data_config, model_config, train_config, out, **kwargs):
        artifacts.partial_dir(out).mkdir()
        (artifacts.partial_dir(out) / artifacts.TRAIN_STATE).write_bytes(b"state")
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "train_run", interrupted)
    assert _check(invoke("train", "--out", run, "--quiet"), 130, run) == [["pipeline", "train", "--resume", str(run)]]


@pytest.mark.parametrize("stage", ["train", "export", "quantize", "train dropout-0 twin", "export dropout-0 twin",
                                   "bench"])
def test_ctrl_c_in_each_stage_of_run_names_commands_that_parse(root, stage):
    from pipeline.commands.run import _after_interrupt

    run, twin = root / "d", root / "d-dropout0"
    for folder in (run, twin):
        artifacts.partial_dir(folder).mkdir()
        (artifacts.partial_dir(folder) / artifacts.TRAIN_STATE).write_bytes(b"state")
    for argv in hints(_after_interrupt(stage, run, twin)):
        assert_accepted(argv)
        assert str(twin if "twin" in stage else run) in argv


def test_the_pack_hint_unpacks_the_bundle_when_pasted(tmp_path):
    """Run for real, whole: `tar xzf '.../my photos.tar.gz' && cd 'my photos' && python device_runner.py --selftest`."""
    run = write_run(tmp_path / "my run", files={"fp32": linear_model(tmp_path / "model.onnx")})
    from pipeline.onnxfile import io_signature, load_model

    signature = io_signature(load_model(run / "model.onnx"))

    def as_exported(manifest):  # what export records and the device runner reads
        manifest.update(labels=list("0123456789"),
                        preprocess={"size": [8, 8], "channels": 1, "scale": 1 / 16, "mean": [0.0], "std": [1.0]})
        manifest["artifacts"]["fp32"].update(input=signature["inputs"][0], output=signature["outputs"][0])

    artifacts.update_manifest(run, as_exported)
    bundle = tmp_path / "my photos.tar.gz"
    result = invoke("pack", run, "--out", bundle, "--golden", "0")
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    command = line.split(": ", 1)[1]
    elsewhere = tmp_path / "device"
    elsewhere.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `python` = ours
    done = subprocess.run(["bash", "-c", command], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, (command, done.stderr)
    assert (elsewhere / "my photos" / "device_runner.py").is_file()


def test_ctrl_c_in_quantize_says_the_folder_is_unchanged_and_it_is(tmp_path, monkeypatch):
    """The interrupt message is a claim about the files: check it against the files."""
    from pipeline import workflow

    run = write_run(tmp_path / "r", files={"fp32": linear_model(tmp_path / "model.onnx")})
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def interrupted(stage, *args, **kwargs):
        (stage / "model.int8.onnx").write_bytes(b"half-written")
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "_quantize", interrupted)
    result = invoke("quantize", run, "--no-speed-check")
    assert result.exit_code == 130, result.output
    assert result.output.strip() == ("error: interrupted: the run folder is unchanged (quantize publishes its files "
                                     "and manifest together, when it completes)")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
