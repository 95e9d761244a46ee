"""The regularizer study: its config, the settings it tries, a choice that never reads the test split,
and one tiny end-to-end study through the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.config import STUDY_TUNED, STUDY_VARIANTS, DataConfig, StudyConfig

# Smaller than --quick: two seeds, two sizes, a few epochs of a very narrow CNN on the bundled digits.
TINY_ARGS = ["--seeds", "0,1", "--train-sizes", "60,300", "--epochs", "8", "--patience", "2", "--conv-channels", "8,16",
             "--fc-units", "32", "--dropout-grid", "0.25,0.5", "--spatial-grid", "0.1", "--l2-grid", "0.5,8",
             "--l1-grid", "1e-4", "--mc-samples", "1,4"]
# The tuning tests: two grid values per regularizer, 3 epochs of a narrower CNN.
TUNE_CONFIG = {"seeds": (0,), "conv_channels": (4, 8), "fc_units": (16,), "patience": 2, "dropout_grid": (0.25, 0.5),
               "spatial_grid": (0.1, 0.2), "l2_grid": (0.5, 8.0), "l1_grid": (1e-4, 1e-3)}


def _cli(args: list[str]):
    from pipeline.cli import app

    return CliRunner().invoke(app, args)


# --- config and settings (fast) ---------------------------------------------------------------------


@pytest.mark.parametrize("bad, field", [
    ({"variants": ()}, "variant"),
    ({"variants": ("none", "dropconnect")}, "dropconnect"),
    ({"variants": ("none", "none")}, "twice"),
    ({"seeds": ()}, "seed"),
    ({"seeds": (0, 0)}, "twice"),
    ({"train_sizes": (5,)}, "sizes"),
    ({"epochs": (0,)}, "epochs"),
    ({"epochs": (10, 20)}, "one per training size"),
    ({"patience": 0}, "patience"),
    ({"dropout_grid": (0.5, 1.0)}, "dropout grid"),
    ({"spatial_grid": ()}, "spatial grid"),
    ({"l2_grid": (0.0,)}, "l2 grid"),
    ({"l1_grid": (-1e-4,)}, "l1 grid"),
    ({"mc_samples": (0, 4)}, "MC samples"),
    ({"bootstrap": 10}, "bootstrap"),
    ({"latency_runs": 0}, "latency runs"),
])
def test_study_config_rejects_bad_values(bad, field):
    StudyConfig()  # negative control: the defaults are valid
    with pytest.raises(ValueError, match=field):
        StudyConfig(**bad)


def test_grids_are_small_and_l1_l2_log_spaced():
    config = StudyConfig()
    for variant in STUDY_TUNED:
        assert 4 <= len(config.grid(variant, 200)) <= 6, variant
    for grid in (config.l2_grid, config.l1_grid):
        ratios = np.diff(np.log10(grid))
        assert np.allclose(ratios, ratios[0], atol=0.05) and ratios.min() > 0.4  # about a constant factor, >= 2.5
    thinned = replace(config, thin_grid_from=7200)
    assert thinned.grid("dropout", 1000) == config.dropout_grid
    assert thinned.grid("dropout", 7200) == config.dropout_grid[::2]
    assert [config.epochs_for(i) for i in range(3)] == list(config.epochs)
    assert replace(config, epochs=(7,)).epochs_for(2) == 7


def test_each_candidate_changes_only_its_regularizer():
    from torch import nn

    from pipeline.model import DropoutCNN
    from pipeline.study import Setting, candidates, run_configs

    config = StudyConfig(conv_channels=(4, 8), fc_units=(16,))
    seen = {}
    for variant in STUDY_TUNED:
        for setting in candidates(variant, config, 200, dropout_rate=0.25):
            model_config, train_config = run_configs(setting, config, seed=3, epochs=11)
            model = DropoutCNN(model_config)
            dropouts = [m.p for m in model.modules() if type(m) is nn.Dropout]
            spatial = [m.p for m in model.modules() if type(m) is nn.Dropout2d]
            seen.setdefault(variant, []).append((dropouts, spatial, train_config.weight_decay, train_config.l1))
            assert (train_config.seed, train_config.epochs, train_config.patience) == (3, 11, config.patience)
            assert train_config.schedule == "none"  # a constant rate: the best epoch is not forced to be the last
    # One fully connected hidden layer + the classifier: two nn.Dropout when dropout is on.
    assert seen["dropout"] == [([r, r], [], 0.0, 0.0) for r in config.dropout_grid]
    assert seen["spatial_dropout"] == [([], [r, r], 0.0, 0.0) for r in config.spatial_grid]
    assert seen["l2"] == [([], [], w, 0.0) for w in config.l2_grid]
    assert seen["l1"] == [([], [], 0.0, c) for c in config.l1_grid]
    # dropout + L2 keeps the rate chosen for dropout and tunes the L2 on top.
    assert seen["dropout_l2"] == [([0.25, 0.25], [], w, 0.0) for w in config.l2_grid]
    assert Setting().label() == "none" and Setting(dropout=0.5, weight_decay=2.0).label() == "dropout 0.5 + L2 2"


def test_final_variants_keep_the_config_order_with_none_first():
    from pipeline.study import Setting, variant_settings

    config = StudyConfig(variants=("l1", "dropout_article"))
    settings = variant_settings({"l1": Setting(l1=1e-3)}, config)
    assert list(settings) == ["none", "l1", "dropout_article"]
    assert settings["dropout_article"] == Setting(dropout=config.article_dropout)


def test_cli_bad_options_are_one_line_errors(tmp_path):
    for args, needle in ((["--seeds", "a,b"], "--seeds"), (["--variants", "none,dropconnect"], "dropconnect"),
                         (["--train-sizes", "5"], "sizes"), (["--l2-grid", "x"], "--l2-grid"),
                         (["--epochs", "5,6"], "epoch budget")):
        result = _cli(["study", "--out", str(tmp_path / "s"), *args])
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_cli_refuses_to_overwrite_a_study(tmp_path):
    (tmp_path / "study.json").write_text("{}")
    result = _cli(["study", "--out", str(tmp_path), *TINY_ARGS])
    assert result.exit_code == 4 and "--force" in result.output
    assert (tmp_path / "study.json").read_text() == "{}"


# --- the choice never reads the test split ----------------------------------------------------------


@pytest.fixture(scope="module")
def digits_splits():
    from pipeline import data

    return data.load(DataConfig(max_train_samples=100))


def _scrambled(splits):
    rng = np.random.default_rng(0)
    labels = splits.y_test.copy()
    while (labels == splits.y_test).mean() > 0.5:
        labels = rng.permutation(labels)
    return replace(splits, y_test=labels)


def _trainer(splits, tmp_path, name):
    from pipeline.study import Trainer

    config = StudyConfig(**TUNE_CONFIG)
    return Trainer(splits, DataConfig(max_train_samples=100), config, epochs=3, work=tmp_path / name, emit=lambda e: None), config


def _test_score(splits):
    """What the study must never do: score a candidate on the test split."""
    from pipeline import train

    data = train.feeds(splits, train.resolve_device("cpu"))
    return lambda run: train.evaluate(run.model, data["test"])[0]


def test_scrambled_test_labels_change_no_choice(digits_splits, tmp_path):
    from pipeline.study import tune

    real_trainer, config = _trainer(digits_splits, tmp_path, "real")
    scrambled = _scrambled(digits_splits)
    chosen, records = tune(real_trainer, config)
    chosen_scrambled, records_scrambled = tune(_trainer(scrambled, tmp_path, "scrambled")[0], config)
    assert chosen == chosen_scrambled
    assert [r["score"] for r in records] == [r["score"] for r in records_scrambled]
    assert set(chosen) == set(STUDY_TUNED) and sum(r["chosen"] for r in records) == len(STUDY_TUNED)

    # Negative control: point the choice at the test split and the same comparison catches it.
    _, pointed = tune(real_trainer, config, score=_test_score(digits_splits))
    _, pointed_scrambled = tune(real_trainer, config, score=_test_score(scrambled))  # same models (cached)
    assert [r["score"] for r in pointed] != [r["score"] for r in pointed_scrambled]


def test_every_training_sees_the_validation_split_in_place_of_the_test_split(digits_splits, tmp_path, monkeypatch):
    from pipeline import train
    from pipeline.study import Setting, tune

    seen = []
    real_train = train.train

    def spy(splits, *args, **kwargs):
        seen.append(np.array_equal(splits.y_test, splits.y_val) and np.array_equal(splits.x_test, splits.x_val))
        return real_train(splits, *args, **kwargs)

    monkeypatch.setattr(train, "train", spy)
    trainer, config = _trainer(digits_splits, tmp_path, "spy")
    tune(trainer, config)
    assert seen and all(seen)
    # A chosen setting's tuning run is its first-seed final run: asked again, it is not retrained.
    count = len(seen)
    trainer.run(Setting(dropout=0.25), config.seeds[0], phase="final")
    assert len(seen) == count


# --- one tiny study, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "digits"
    result = _cli(["study", "--out", str(out), *TINY_ARGS])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "study.json").read_text())


def _inside(stat: dict) -> bool:
    return stat["low"] - 1e-12 <= stat["value"] <= stat["high"] + 1e-12


@pytest.mark.slow
def test_study_json_holds_every_variant_with_intervals_and_verdicts(tiny_study):
    _, report = tiny_study
    assert [block["train_size"] for block in report["by_size"]] == [60, 300]
    config = report["config"]
    for block in report["by_size"]:
        assert list(block["variants"]) == list(STUDY_VARIANTS)
        assert block["chosen"]["dropout"]["dropout"] in config["dropout_grid"]
        assert block["chosen"]["l2"]["weight_decay"] in config["l2_grid"]
        assert block["chosen"]["dropout_l2"]["dropout"] == block["chosen"]["dropout"]["dropout"]
        assert block["chosen"]["dropout_article"]["dropout"] == 0.5
        for name, row in block["variants"].items():
            assert len(row["runs"]) == 2 and _inside(row["test_accuracy"]), name
            assert row["test_accuracy"]["value"] == pytest.approx(np.mean(row["test_accuracy_by_seed"]))
            if name != "none":
                assert row["vs_none"]["verdict"] in ("better", "worse", "not resolved")
                assert row["sentence"].endswith(row["vs_none"]["verdict"])
        from pipeline.study import PAIRS

        assert [(c["variant"], c["baseline"]) for c in block["comparisons"]] == list(PAIRS)
        assert all(c["verdict"] in ("better", "worse", "not resolved") and _inside(c) for c in block["comparisons"])
        mc = block["mc"]
        assert list(mc["methods"]) == ["deterministic", "temperature", "mc1", "mc4"]
        for method, row in mc["methods"].items():
            for metric in ("accuracy", "nll", "ece"):
                assert _inside(row[metric]) and math.isfinite(row[metric]["value"]), (method, metric)
        # Temperature scaling never changes the argmax: the same accuracy as deterministic.
        assert mc["methods"]["temperature"]["accuracy"]["value"] == mc["methods"]["deterministic"]["accuracy"]["value"]
        assert len(mc["temperatures"]) == 2 and all(t > 0 for t in mc["temperatures"])
    assert report["budget"]["runs"] > 0 and 0 <= report["budget"]["best_at_last_epoch"] <= report["budget"]["runs"]


@pytest.mark.slow
def test_intervals_recompute_from_the_saved_per_image_tables(tiny_study):
    out, report = tiny_study
    tables = np.load(out / "tables.npz")
    block = report["by_size"][-1]
    for name, row in block["variants"].items():
        correct = tables[f"n300/{name}/correct"]
        assert correct.shape == (2, report["dataset"]["sizes"]["test"])
        assert row["test_accuracy"]["value"] == pytest.approx(correct.mean())
    none = tables["n300/none/correct"]
    dropout = tables["n300/dropout/correct"]
    assert block["variants"]["dropout"]["vs_none"]["value"] == pytest.approx(dropout.mean() - none.mean())


@pytest.mark.slow
def test_inference_cost_models_have_no_dropout_and_mc_models_keep_it(tiny_study):
    out, report = tiny_study
    for name, record in report["inference"].items():
        assert record["onnx"]["random_ops"] == 0, (name, record["onnx"]["ops"])
        assert record["onnx"]["audit"]["passed"], name
        assert record["latency"]["provider"] == "CPUExecutionProvider" and record["latency"]["runs"] >= 1
        assert (out / record["onnx"]["file"]).is_file()
    assert len({r["onnx"]["bytes"] for r in report["inference"].values()}) == 1
    # The MC models are the negative control of the count: their random ops survive the export.
    for name, record in report["mc_latency"]["models"].items():
        assert record["random_ops"] > 0, name
    timings = report["mc_latency"]["timings"]
    assert {t["batch"] for t in timings.values()} == {1, 16}
    assert all(t["latency_ms"]["p50"] > 0 for t in timings.values())
    assert not (out / ".work").exists()


@pytest.mark.slow
def test_study_writes_plots(tiny_study):
    out, _ = tiny_study
    for name in ("curves.png", "accuracy_vs_size.png", "reliability.png", "mc_latency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_random_op_count_sees_dropout_exported_in_train_mode():
    """Negative control for the study's `random_ops == 0`: the same count is non-zero when dropout is live."""
    from pipeline import export, onnxfile
    from pipeline.config import ModelConfig
    from pipeline.model import DropoutCNN
    from pipeline.study import count_random_ops

    model = DropoutCNN(ModelConfig(conv_channels=(4,), fc_units=(8,), dropout=0.5, spatial_dropout=0.2))
    live = export.export_module(model.train(), (1, 8, 8), 18)
    assert count_random_ops(onnxfile.op_histogram(live)) > 0
    inert = export.export_module(model.eval(), (1, 8, 8), 18)
    assert count_random_ops(onnxfile.op_histogram(inert)) == 0


@pytest.mark.slow
def test_recompute_rebuilds_the_mc_block_from_the_saved_tables(tiny_study, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    out, report = tiny_study
    report = json.loads(json.dumps(report))  # a private copy: the fixture is shared
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    block = report["by_size"][-1]["mc"]
    block["methods"]["mc4"]["accuracy"]["value"] = -1.0  # tampered: the recomputation must not copy it
    (copy / "study.json").write_text(json.dumps(report))
    done = subprocess.run([sys.executable, str(REPO / "tools" / "study_recompute.py"), str(copy)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    again = json.loads((copy / "study.json").read_text())
    methods = again["by_size"][-1]["mc"]["methods"]
    assert methods["mc4"]["accuracy"]["value"] == pytest.approx(np.load(copy / "tables.npz")["n300/dropout.mc4/correct"].mean())
    assert all(_inside(row["ece"]) for row in methods.values()) and "recomputed" in again
