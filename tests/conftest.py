"""Shared fixtures. Expensive things (a trained run) are made once per session, on tiny
configs, so the whole suite runs on 2 CPU cores in minutes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MNIST_TEST = REPO.parent / "shared" / "data" / "mnist-test"

# A small but real config: digits, narrow widths, few epochs. Enough to be well above chance.
TINY_MODEL = {"conv_channels": (8, 16), "fc_units": (32,), "dropout": 0.5}
TINY_TRAIN = {"epochs": 6, "batch_size": 64, "lr": 3e-3, "patience": 0, "seed": 0}
# Small and quick: a short speed check is still a real one (the ratios are recorded, never asserted). The recipe
# search is pinned to the configured recipe: these runs stand for "the default recipe" (tests/test_recipes.py searches).
QUICK_QUANTIZE = {"speed_seconds": 0.02, "speed_rounds": 1, "speed_batch": 32, "recipes": ("default",)}


# Fixtures that train (or train and export) a real model. Any test that uses one, directly or through
# another fixture, is marked slow here, so the fast suite (`make test-fast`) cannot grow a training by accident.
TRAINING_FIXTURES = {"tiny_run_master", "exported_run_master"}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def train_tiny_run(out: Path, **model_overrides):
    from pipeline.config import DataConfig, ModelConfig, TrainConfig
    from pipeline.workflow import train_run

    return train_run(DataConfig(), ModelConfig(**{**TINY_MODEL, **model_overrides}), TrainConfig(**TINY_TRAIN), out)


@pytest.fixture(scope="session")
def tiny_run_master(tmp_path_factory) -> Path:
    """A finished digits run (dropout 0.5), trained once per test session. Do not modify it."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    train_tiny_run(out)
    return out


@pytest.fixture
def tiny_run(tiny_run_master, tmp_path) -> Path:
    """A private copy of the trained run, free to modify."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run_master, copy)
    return copy


@pytest.fixture(scope="session")
def exported_run_master(tiny_run_master, tmp_path_factory) -> Path:
    """A copy of the tiny run with `export_run` applied (model.onnx + manifest artifacts["fp32"]).
    Made once per session. Do not modify it."""
    from pipeline.config import ExportConfig
    from pipeline.workflow import export_run

    out = tmp_path_factory.mktemp("exported") / "digits"
    shutil.copytree(tiny_run_master, out)
    export_run(out, ExportConfig())
    return out


@pytest.fixture
def exported_run(exported_run_master, tmp_path) -> Path:
    """A private copy of the exported run, free to modify."""
    copy = tmp_path / "exported"
    shutil.copytree(exported_run_master, copy)
    return copy


@pytest.fixture(scope="session")
def quantized_run_master(exported_run_master, tmp_path_factory) -> Path:
    """The exported tiny run, quantized once with the default recipe (+ fp16). Do not modify it."""
    from pipeline.config import Fp16Config, QuantizeConfig
    from pipeline.workflow import quantize_run

    out = tmp_path_factory.mktemp("quantized") / "digits"
    shutil.copytree(exported_run_master, out)
    quantize_run(out, QuantizeConfig(**QUICK_QUANTIZE), Fp16Config())
    return out
