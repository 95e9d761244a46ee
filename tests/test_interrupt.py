"""A training process killed mid-run leaves nothing a later stage accepts, and --resume finishes it
with the same weights as an uninterrupted run (issue 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import artifacts

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
ARGS = ["--conv-channels", "8,16", "--fc-units", "32", "--epochs", "8", "--patience", "0", "--lr", "3e-3",
        "--threads", "1", "--quiet"]


def _pipeline(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


def _kill_after_first_epoch(run: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--out", str(run), *ARGS], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = artifacts.partial_dir(run) / artifacts.TRAIN_STATE
    deadline = time.monotonic() + 240
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: the worst case
    process.wait(30)
    assert state.exists(), "training ended before its first epoch was saved"


def test_killed_training_leaves_no_finished_run_and_resume_matches(tmp_path):
    run = tmp_path / "run"
    _kill_after_first_epoch(run)
    assert not run.exists()  # the later stages see no run at all...
    refused = _pipeline("export", "--run", str(run))
    assert refused.returncode != 0 and "--resume" in refused.stderr  # ...and are told how to continue it
    assert _pipeline("train", "--out", str(run), *ARGS).returncode != 0  # a new run would shadow it: refused

    # Resumed through the folder the user sees on disk, run.partial, which names the same run.
    resumed = _pipeline("train", "--resume", str(artifacts.partial_dir(run)), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert not artifacts.partial_dir(run).exists()
    reference = tmp_path / "reference"
    assert _pipeline("train", "--out", str(reference), *ARGS).returncode == 0
    a = torch.load(run / artifacts.CHECKPOINT, weights_only=True)["state_dict"]
    b = torch.load(reference / artifacts.CHECKPOINT, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    # The resumed run's manifest describes the whole run, as the uninterrupted one's does.
    training, expected = artifacts.read_manifest(run)["training"], artifacts.read_manifest(reference)["training"]
    assert training["epochs_run"] == expected["epochs_run"] == 8
    assert (training["best_epoch"], training["test_accuracy"]) == (expected["best_epoch"], expected["test_accuracy"])
    assert training["checkpoint_sha256"] == artifacts.sha256_file(run / artifacts.CHECKPOINT)
