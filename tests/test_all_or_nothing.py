"""All-or-nothing stages: export, quantize (with fp16 and the speed check) and the MC export change a run
folder completely or not at all. Faults are injected at every step, in-process (an exception) and as a
SIGKILL in a child process, and the folder's file hashes are compared before and after."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import artifacts
from pipeline.config import ExportConfig, Fp16Config, MCConfig, QuantizeConfig
from pipeline.errors import RunFolderError
from tests.conftest import QUICK_QUANTIZE

REPO = Path(__file__).resolve().parent.parent
# Two int8 recipes: the search's candidate files are staged and published like the rest, and each recipe is a
# step to fault (all five would add three more steps, each run twice, for no new path).
SEARCH_QUANTIZE = {**QUICK_QUANTIZE, "recipes": ("default", "ort-defaults")}
QUICK_MC = {"samples": 8, "convergence_repeats": 4, "ood_samples": 120, "max_accuracy_drop": 0.5}  # as tests/test_mc.py


class Injected(Exception):
    pass


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != f".{folder.name}.lock")


def stage_call(stage: str, run: Path, on_step):
    from pipeline import workflow

    if stage == "export":
        return workflow.export_run(run, ExportConfig(), on_step=on_step)
    if stage == "quantize":
        return workflow.quantize_run(run, QuantizeConfig(**SEARCH_QUANTIZE), Fp16Config(), on_step=on_step)
    return workflow.mc_export_run(run, MCConfig(**QUICK_MC), on_step=on_step)


def steps_of(stage: str, run: Path) -> list[str]:
    names: list[str] = []
    stage_call(stage, run, names.append)
    return names


@pytest.fixture
def quantized_master(quantized_run_master) -> Path:
    """An exported and quantized run: re-export and re-quantize then replace existing files and records."""
    return quantized_run_master


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["export", "quantize", "mc"])
def test_a_failure_at_any_step_leaves_the_folder_byte_identical(stage, quantized_master, tmp_path):
    probe = tmp_path / "probe" / "digits"
    shutil.copytree(quantized_master, probe)
    steps = steps_of(stage, probe)
    assert len(steps) >= 3
    for failing in steps:
        run = tmp_path / f"run-{steps.index(failing)}" / "digits"
        shutil.copytree(quantized_master, run)
        before, around = folder_hashes(run), siblings(run)

        def fail_at(name, failing=failing):
            if name == failing:
                raise Injected(name)

        with pytest.raises(Injected):
            stage_call(stage, run, fail_at)
        assert folder_hashes(run) == before, f"{stage} changed the run folder when failing at {failing!r}"
        assert siblings(run) == around  # no staging copy left beside it
    # Negative control: the same stage without a fault does change the folder.
    assert folder_hashes(probe) != folder_hashes(quantized_master)


@pytest.mark.slow
def test_a_failure_while_publishing_changes_nothing(quantized_master, tmp_path, monkeypatch):
    run = tmp_path / "digits"
    shutil.copytree(quantized_master, run)
    before = folder_hashes(run)

    def broken_swap(new, current):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts, "swap_folders", broken_swap)
    with pytest.raises(OSError):
        stage_call("quantize", run, None)
    assert folder_hashes(run) == before


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from pipeline import artifacts
    from tests.test_all_or_nothing import stage_call
    stage, run, when = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    real_swap = artifacts.swap_folders

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def swap(new, current):
        if when == "before-swap":
            kill()
        real_swap(new, current)
        if when == "after-swap":
            kill()

    artifacts.swap_folders = swap
    stage_call(stage, run, lambda name: kill() if name == when else None)
""")


def kill_stage(stage: str, run: Path, when: str) -> tuple[int, str]:
    script = KILLER
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script, stage, str(run), when], env=env, capture_output=True,
                          text=True, timeout=600)
    return done.returncode, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["export", "quantize"])
def test_sigkill_at_any_point_leaves_the_old_folder_or_the_complete_new_one(stage, quantized_master, tmp_path):
    probe = tmp_path / "probe" / "digits"
    shutil.copytree(quantized_master, probe)
    steps = steps_of(stage, probe)
    completed = folder_hashes(probe)
    # The first, a middle and the last step, and both sides of the swap: every step before the swap writes
    # only into the private copy, so these stand for the others (the exception test covers every step).
    points = [steps[0], steps[len(steps) // 2], steps[-1], "before-swap", "after-swap"]
    for index, when in enumerate(points):
        run = tmp_path / f"kill-{index}" / "digits"
        shutil.copytree(quantized_master, run)
        before = folder_hashes(run)
        returncode, stderr = kill_stage(stage, run, when)
        assert returncode == -signal.SIGKILL, stderr
        after = folder_hashes(run)
        if when == "after-swap":
            # The swap happened: the new state, whole. Files that carry timestamps differ run to run, so
            # compare the names and the manifest's own records of the model files.
            assert after.keys() == completed.keys() and after != before
            manifest = artifacts.read_manifest(run)
            for record in manifest["artifacts"].values():
                assert after[record["file"]] == record["sha256"]
        else:
            assert after == before, f"SIGKILL at {when!r} changed {stage}'s run folder"
    # A killed stage neither keeps the lock nor blocks the next run; its leftover copy is cleared.
    stage_call(stage, run, None)
    assert [p.name for p in run.parent.iterdir() if ".stage-" in p.name] == []


@pytest.mark.slow
def test_a_second_writer_is_refused_with_one_line(exported_run):
    before = folder_hashes(exported_run)
    with artifacts.run_writer(exported_run):
        with pytest.raises(RunFolderError, match=r"is being changed by pid \d+"):
            stage_call("export", exported_run, None)
    assert folder_hashes(exported_run) == before
    stage_call("export", exported_run, None)  # the lock is free again


@pytest.mark.slow
def test_reexport_removes_the_files_of_the_records_it_drops(quantized_master, tmp_path):
    run = tmp_path / "digits"
    shutil.copytree(quantized_master, run)
    assert (run / "model.int8.onnx").is_file() and (run / "model.fp16.onnx").is_file()
    result = stage_call("export", run, None)
    assert set(result.dropped) == {"int8", "fp16"}
    assert not (run / "model.int8.onnx").exists() and not (run / "model.fp16.onnx").exists()
    assert set(artifacts.read_manifest(run)["artifacts"]) == {"fp32"}


def _read_only_bind_mount(folder: Path, view: Path) -> bool:
    """Mount `folder` read-only at `view` (root on Linux); False where this machine does not allow it."""
    view.mkdir()
    if shutil.which("mount") is None:
        return False
    ok = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True).returncode == 0:
        return True
    if ok:
        subprocess.run(["umount", str(view)], capture_output=True)
    return False


def test_a_read_only_run_folder_is_refused_before_any_work(tmp_path):
    source = tmp_path / "models" / "digits"
    source.mkdir(parents=True)
    (source / "manifest.json").write_text("{}")
    view = tmp_path / "ro"
    if not _read_only_bind_mount(source.parent, view):
        if os.geteuid() == 0:
            pytest.skip("needs a read-only mount, which this machine does not allow")
        os.chmod(source, 0o555)
        view = source.parent
    try:
        with pytest.raises(RunFolderError, match="not writable"):
            with artifacts.run_writer(view / "digits"):
                pytest.fail("the writer lock was granted on a read-only folder")
    finally:
        if view != source.parent:
            subprocess.run(["umount", str(view)], capture_output=True)
        os.chmod(source, 0o755)
    # Negative control: the same folder, writable, is accepted.
    with artifacts.run_writer(source):
        pass


def test_finish_run_exchanges_folders_without_a_gap(tmp_path):
    """The replaced run folder and the new one trade places in one step: the new contents appear, the old
    contents end in the staging name (then removed), and the run folder name never stops existing."""
    old, new = tmp_path / "run", tmp_path / "run.partial"
    old.mkdir()
    (old / "manifest.json").write_text("old")
    new.mkdir()
    (new / "manifest.json").write_text("new")
    artifacts.swap_folders(new, old)
    assert (old / "manifest.json").read_text() == "new" and (new / "manifest.json").read_text() == "old"
    assert artifacts._exchange(new, old), "renameat2(RENAME_EXCHANGE) is unavailable: the fallback has a gap"
    artifacts.finish_run(new, old)
    assert (old / "manifest.json").read_text() == "new" and not new.exists()
