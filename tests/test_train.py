"""Training: determinism, accuracy above chance, checkpoints, and --resume reaching the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import artifacts, data, train
from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.errors import CheckpointError, RunFolderError
from tests.conftest import TINY_MODEL, TINY_TRAIN

SMALL_DATA = DataConfig(max_train_samples=400)


def _train(tmp_path, name, resume=False, on_epoch=None, **train_overrides):
    splits = data.load(SMALL_DATA)
    model_config = train.model_config_for(splits, ModelConfig(**TINY_MODEL))
    run = tmp_path / name
    run.mkdir(exist_ok=True)
    config = TrainConfig(**{**TINY_TRAIN, "batch_size": 32, **train_overrides})
    return train.train(splits, SMALL_DATA, model_config, config, run, resume=resume, on_epoch=on_epoch)


def _weights(checkpoint):
    return torch.load(checkpoint, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_same_seed_same_weights_and_better_than_chance(tmp_path):
    first, second = _train(tmp_path, "a"), _train(tmp_path, "b")
    a, b = _weights(first.checkpoint), _weights(second.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.test_accuracy > 0.5  # 10 classes: chance is 0.1
    other = _weights(_train(tmp_path, "c", seed=1).checkpoint)
    assert not all(torch.equal(a[k], other[k]) for k in a)  # negative control: the seed matters


@pytest.mark.slow
def test_resume_after_interruption_reaches_the_same_weights(tmp_path):
    uninterrupted = _train(tmp_path, "full")

    def interrupt(result):
        if result.epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "cut", on_epoch=interrupt)
    assert (tmp_path / "cut" / artifacts.TRAIN_STATE).is_file()
    assert not (tmp_path / "cut" / artifacts.CHECKPOINT).exists()
    resumed = _train(tmp_path, "cut", resume=True)
    a, b = _weights(uninterrupted.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h.epoch for h in resumed.history] == list(range(1, TINY_TRAIN["epochs"] + 1))


@pytest.mark.slow
def test_early_stopping_stops_before_the_last_epoch(tmp_path):
    # lr so large that validation loss cannot improve for long: patience 1 must end the run early.
    result = _train(tmp_path, "es", epochs=20, patience=1, lr=0.5)
    assert result.stopped_early and len(result.history) < 20


def test_checkpoint_loads_with_weights_only_and_rejects_other_architectures(tiny_run):
    model, payload = train.load_checkpoint(tiny_run / artifacts.CHECKPOINT)
    assert not model.training and payload["labels"] == list("0123456789")
    assert payload["model_config"]["conv_channels"] == list(TINY_MODEL["conv_channels"])
    payload["model_config"]["conv_channels"] = [9, 16]
    torch.save(payload, tiny_run / "other.pt")
    with pytest.raises(CheckpointError, match="do not match the recorded architecture"):
        train.load_checkpoint(tiny_run / "other.pt")
    (tiny_run / "corrupt.pt").write_bytes((tiny_run / artifacts.CHECKPOINT).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train.load_checkpoint(tiny_run / "corrupt.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train.load_checkpoint(tiny_run / "missing.pt")


def test_run_folder_records(tiny_run):
    metrics = json.loads((tiny_run / artifacts.METRICS).read_text())
    assert {"test_accuracy", "train_seconds", "seconds_per_epoch", "history"} <= set(metrics)
    assert len(metrics["history"]) == TINY_TRAIN["epochs"]
    manifest = artifacts.read_manifest(tiny_run)
    assert manifest["training"]["checkpoint_sha256"] == artifacts.sha256_file(tiny_run / artifacts.CHECKPOINT)
    assert manifest["preprocess"]["size"] == [8, 8] and manifest["labels"] == list("0123456789")
    assert (tiny_run / artifacts.CURVES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tiny_run / artifacts.TRAIN_STATE).exists()


def test_manifest_is_required_for_a_finished_run(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(RunFolderError, match="not a finished run"):
        artifacts.read_manifest(tmp_path / "half")
    with pytest.raises(RunFolderError, match="no such run folder"):
        artifacts.read_manifest(tmp_path / "none")


@pytest.mark.slow
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_validation_loss_in_the_first_epoch_stops_with_no_run(tmp_path, monkeypatch, bad):
    from typer.testing import CliRunner

    from pipeline.cli import app

    real = train.evaluate_across
    monkeypatch.setattr(train, "evaluate_across", lambda *a, **k: (bad, real(*a, **k)[1]))
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--conv-channels", "4,8", "--fc-units", "16",
                                      "--epochs", "3", "--max-train-samples", "100", "--quiet"])
    assert result.exit_code == 18, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: training diverged at epoch 1: validation loss {bad}")
    assert not out.exists() and not artifacts.partial_dir(out).exists()  # no run, and nothing to resume
