"""The regularizer study: its config, its variants, and one tiny end-to-end study through the CLI."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from pipeline.config import STUDY_VARIANTS, StudyConfig

# Smaller than --quick: one seed, two sizes, a few epochs of a very narrow CNN on the bundled digits.
TINY_ARGS = ["--seeds", "0", "--train-sizes", "60,300", "--epochs", "10", "--conv-channels", "8,16", "--fc-units", "32"]


def _cli(args: list[str]):
    from pipeline.cli import app

    return CliRunner().invoke(app, args)


# --- config and variants (fast) -----------------------------------------------------------------


@pytest.mark.parametrize("bad, field", [
    ({"variants": ()}, "variant"),
    ({"variants": ("none", "dropconnect")}, "dropconnect"),
    ({"variants": ("none", "none")}, "twice"),
    ({"seeds": ()}, "seed"),
    ({"seeds": (0, 0)}, "twice"),
    ({"train_sizes": (5,)}, "sizes"),
    ({"epochs": 0}, "epochs"),
    ({"dropout_low": 1.0}, "dropout low"),
    ({"spatial_dropout": 0.0}, "spatial dropout"),
    ({"weight_decay": 0.0}, "weight decay"),
    ({"l1": 0.0}, "l1"),
    ({"latency_runs": 0}, "latency runs"),
])
def test_study_config_rejects_bad_values(bad, field):
    StudyConfig()  # negative control: the defaults are valid
    with pytest.raises(ValueError, match=field):
        StudyConfig(**bad)


def test_each_variant_changes_only_its_regularizer():
    from torch import nn

    from pipeline.model import DropoutCNN
    from pipeline.study import variant_configs, variants

    config = StudyConfig(conv_channels=(4, 8), fc_units=(16,))
    chosen = variants(config)
    assert [v.name for v in chosen] == list(STUDY_VARIANTS)
    seen = {}
    for variant in chosen:
        model_config, train_config = variant_configs(variant, config, seed=3)
        model = DropoutCNN(model_config)
        dropouts = [m.p for m in model.modules() if type(m) is nn.Dropout]
        spatial = [m.p for m in model.modules() if type(m) is nn.Dropout2d]
        seen[variant.name] = (dropouts, spatial, train_config.weight_decay, train_config.l1)
        assert train_config.seed == 3 and train_config.patience == 0 and train_config.epochs == config.epochs
    # One fully connected hidden layer + the classifier: two nn.Dropout when dropout is on.
    assert seen["none"] == ([], [], 0.0, 0.0)
    assert seen["dropout_low"] == ([0.25, 0.25], [], 0.0, 0.0)
    assert seen["dropout_high"] == ([0.5, 0.5], [], 0.0, 0.0)
    assert seen["spatial_dropout"] == ([], [0.2, 0.2], 0.0, 0.0)
    assert seen["l2"] == ([], [], 0.5, 0.0)
    assert seen["l1"] == ([], [], 0.0, 1e-4)
    assert seen["dropout_l2"] == ([0.5, 0.5], [], 0.5, 0.0)


def test_variant_subset_keeps_the_requested_order():
    from pipeline.study import variants

    assert [v.name for v in variants(StudyConfig(variants=("l1", "none")))] == ["l1", "none"]


def test_cli_bad_options_are_one_line_errors(tmp_path):
    for args, needle in ((["--seeds", "a,b"], "--seeds"), (["--variants", "none,dropconnect"], "dropconnect"),
                         (["--train-sizes", "5"], "sizes")):
        result = _cli(["study", "--out", str(tmp_path / "s"), *args])
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_cli_refuses_to_overwrite_a_study(tmp_path):
    (tmp_path / "study.json").write_text("{}")
    result = _cli(["study", "--out", str(tmp_path), *TINY_ARGS])
    assert result.exit_code == 4 and "--force" in result.output
    assert (tmp_path / "study.json").read_text() == "{}"


# --- one tiny study, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "digits"
    result = _cli(["study", "--out", str(out), *TINY_ARGS])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "study.json").read_text())


@pytest.mark.slow
def test_study_json_holds_every_variant_with_its_numbers(tiny_study):
    out, report = tiny_study
    assert list(report["variants"]) == list(STUDY_VARIANTS)
    assert [block["train_size"] for block in report["by_size"]] == [60, 300]
    for block in report["by_size"]:
        assert list(block["variants"]) == list(STUDY_VARIANTS)
        assert len(block["runs"]) == len(STUDY_VARIANTS)  # one seed
        for row in block["variants"].values():
            for key in ("test_accuracy", "train_accuracy", "accuracy_gap", "loss_gap", "seconds_per_epoch"):
                assert row[key]["n"] == 1 and math.isfinite(row[key]["mean"]), key
            assert row["seconds_per_epoch"]["mean"] > 0
    for name, variant in report["variants"].items():
        assert variant["latency"]["p50_us"] > 0 and variant["latency"]["runs"] >= 1
        assert variant["latency"]["provider"] == "CPUExecutionProvider"
        assert variant["onnx"]["random_ops"] == 0, (name, variant["onnx"]["ops"])
        assert variant["onnx"]["audit"]["passed"], (name, variant["onnx"]["audit"])
        assert (out / variant["onnx"]["file"]).is_file()
    # Dropout and penalties add no parameters: every variant is the same architecture.
    assert len({v["parameters"] for v in report["variants"].values()}) == 1
    assert not (out / ".work").exists()


@pytest.mark.slow
def test_gap_and_paired_difference_follow_from_the_runs(tiny_study):
    _, report = tiny_study
    for block in report["by_size"]:
        runs = {r["variant"]: r for r in block["runs"]}
        for name, row in block["variants"].items():
            run = runs[name]
            assert run["accuracy_gap"] == pytest.approx(run["train_accuracy"] - run["test_accuracy"])
            assert run["loss_gap"] == pytest.approx(run["val_loss"] - run["train_loss"])
            assert row["test_accuracy"]["mean"] == pytest.approx(run["test_accuracy"])
            if name != "none":
                diff = run["test_accuracy"] - runs["none"]["test_accuracy"]
                assert row["test_accuracy_vs_none"]["mean"] == pytest.approx(diff)
                assert row["test_accuracy_vs_none"]["wins"] == int(diff > 0)


@pytest.mark.slow
def test_study_models_learn(tiny_study):
    _, report = tiny_study
    largest = report["by_size"][-1]["variants"]
    # Ten classes: chance is 10%. The unregularized model on 300 images must be well above it.
    assert largest["none"]["test_accuracy"]["mean"] > 0.5
    assert largest["none"]["train_accuracy"]["mean"] >= largest["none"]["test_accuracy"]["mean"] - 0.1


@pytest.mark.slow
def test_study_writes_plots(tiny_study):
    out, _ = tiny_study
    for name in ("curves.png", "accuracy_vs_size.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
