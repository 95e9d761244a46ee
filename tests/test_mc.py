"""Monte Carlo dropout export (issue 8): model.mc.onnx keeps dropout active under every ONNX
Runtime optimization level and onnxsim, its outputs are well-formed, and its uncertainty is
measured. Negative controls: a plain Dropout(training_mode=True) is deleted by ORT; a graph whose
random op was replaced is caught; a deterministic reference that beats MC trips the accuracy gate."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pipeline import artifacts, mc
from pipeline.config import MCConfig
from pipeline.mc_model import MCDropout2d, MCDropoutModel, dropout_layers
from pipeline.train import load_checkpoint

# Small and fast; the tiny run (6 epochs) is undertrained, and its MC mean at few samples is well
# below the deterministic accuracy, so the gate is loosened here and tested on its own below.
SMALL = {"samples": 8, "convergence_repeats": 4, "ood_samples": 120, "max_accuracy_drop": 0.5}


@pytest.fixture(scope="module")
def mc_run(exported_run_master, tmp_path_factory):
    """A copy of the exported tiny run with model.mc.onnx made by the workflow."""
    from pipeline.workflow import mc_export_run

    run = tmp_path_factory.mktemp("mc") / "run"
    shutil.copytree(exported_run_master, run)
    result = mc_export_run(run, MCConfig(**SMALL))
    return run, result


# --- the torch module -----------------------------------------------------------------------


def test_mc_module_outputs_are_distributions_and_vary(tiny_run_master):
    model, _ = load_checkpoint(tiny_run_master / "checkpoint.pt")
    mc_model = MCDropoutModel(model, samples=16)
    x = torch.randn(5, 1, 8, 8)
    probs, ent, mi = mc_model(x)
    assert probs.shape == (5, 10) and ent.shape == (5,) and mi.shape == (5,)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    assert torch.all(ent <= math.log(10) + 1e-5) and torch.all(mi >= 0) and torch.all(mi <= ent + 1e-5)
    again, _, _ = mc_model(x)
    assert not torch.equal(probs, again), "eval() must not switch MC dropout off"
    # Negative control: the deterministic model in eval() is repeatable.
    assert torch.equal(model(x), model(x))


def test_mc_module_shares_the_layers_before_the_first_dropout(tiny_run_master):
    model, _ = load_checkpoint(tiny_run_master / "checkpoint.pt")
    mc_model = MCDropoutModel(model, samples=4)
    assert not any(isinstance(m, nn.Dropout) for m in mc_model.modules())
    assert any(isinstance(m, nn.Conv2d) for m in mc_model.prefix) and not any(isinstance(m, nn.Conv2d) for m in mc_model.sampled)
    assert mc_model.rates == tuple(d["rate"] for d in dropout_layers(model)) == (0.5, 0.5)


def test_mc_dropout2d_drops_whole_channels():
    torch.manual_seed(0)
    out = MCDropout2d(0.5)(torch.ones(4, 6, 3, 3))
    per_channel = out.flatten(2)
    assert torch.all(per_channel.max(2).values == per_channel.min(2).values), "one draw per (image, channel)"
    assert set(per_channel.unique().tolist()) == {0.0, 2.0}


def test_no_dropout_means_nothing_to_sample():
    from pipeline.config import ModelConfig
    from pipeline.model import DropoutCNN

    with pytest.raises(ValueError, match="no dropout layer"):
        MCDropoutModel(DropoutCNN(ModelConfig(conv_channels=(4,), fc_units=(8,), dropout=0.0)), samples=4)


# --- pure functions ---------------------------------------------------------------------------


def test_rejection_curve_rises_when_uncertainty_finds_the_errors():
    correct = np.array([1] * 90 + [0] * 10, dtype=bool)
    good = np.where(correct, 0.1, 1.0)  # errors are the most uncertain
    curve = mc.rejection_curve(good, correct, fractions=(0.0, 0.05, 0.1, 0.2))
    assert curve == [0.9, pytest.approx(90 / 95), 1.0, 1.0]
    # Negative control: uncertainty that points at the correct ones makes rejection hurt.
    bad = mc.rejection_curve(-good, correct, fractions=(0.0, 0.1, 0.2))
    assert bad[0] == 0.9 and bad[1] < 0.9 and bad[2] < bad[1]


def test_ood_sets_keep_shape_and_pixel_range():
    from pipeline.data import Preprocess

    pre = Preprocess(size=(8, 8), channels=1, scale=1 / 16, mean=(0.3,), std=(0.4,))
    raw = np.random.default_rng(0).uniform(0, 16, size=(30, 1, 8, 8)).astype(np.float32)
    sets = mc.ood_sets(raw, pre, MCConfig(ood_samples=20))
    assert set(sets) == {"uniform_noise", "inverted", "rotated"}
    for images, description in sets.values():
        assert images.shape == (20, 1, 8, 8) and images.min() >= 0 and images.max() <= 16 and description
    np.testing.assert_allclose(16 - sets["inverted"][0], raw[:20], atol=1e-5)
    np.testing.assert_array_equal(np.rot90(sets["rotated"][0], -1, axes=(2, 3)), raw[:20])


def test_mc_module_is_importable_without_torch():
    code = "import sys, pipeline.mc; assert 'torch' not in sys.modules, 'pipeline.mc imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the exported file ------------------------------------------------------------------------


@pytest.mark.slow
def test_workflow_writes_an_active_mc_model_and_records_it(mc_run, exported_run_master):
    run, result = mc_run
    path = run / "model.mc.onnx"
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("RandomUniformLike") == 2 and "Dropout" not in ops
    assert not list(run.glob(".model.mc.onnx.*")), "no temporary file left"

    manifest = artifacts.read_manifest(run)
    record = manifest["artifacts"]["mc"]
    assert record == result.record
    assert record["kind"] == "mc" and record["file"] == "model.mc.onnx" and record["samples"] == SMALL["samples"]
    assert record["sha256"] == artifacts.sha256_file(path) and record["bytes"] == path.stat().st_size
    assert [o["name"] for o in record["outputs"]] == ["probs", "entropy", "mutual_info"]
    assert record["outputs"][0]["shape"] == ["batch", 10] and record["outputs"][1]["shape"] == ["batch"]
    assert all(o["meaning"] for o in record["outputs"])
    assert record["input"]["shape"] == ["batch", 1, 8, 8]

    check = record["verification"]
    for level in ("disable", "basic", "extended", "all"):
        assert check["ort_levels"][level]["random_ops"] == {"RandomUniformLike": 2}
        assert check["ort_levels"][level]["max_abs_diff_between_runs"] > 0
    assert check["onnxsim"]["random_ops"] == {"RandomUniformLike": 2} and check["onnxsim"]["max_abs_diff_between_runs"] > 0
    noise = [step["tv_between_independent_estimates"] for step in check["convergence"]]
    assert [step["samples"] for step in check["convergence"]] == [8, 16, 32] and noise[-1] < noise[0]

    # The fp32 model is untouched and still passes the deterministic audit; the MC model fails it, as it should.
    fp32 = exported_run_master / "model.onnx"
    assert check["fp32_untouched"] == {"sha256": artifacts.sha256_file(fp32), "matches_manifest": True, "audit_passed": True}
    assert manifest["artifacts"]["fp32"] == artifacts.read_manifest(exported_run_master)["artifacts"]["fp32"]
    assert check["deterministic_audit_on_mc"]["passed"] is False and check["deterministic_audit_on_mc"]["findings"] == 2

    evaluation = record["evaluation"]
    assert set(evaluation["ood"]) == {"uniform_noise", "inverted", "rotated"}
    assert evaluation["ood"]["uniform_noise"]["auroc"]["mc_entropy"] > 0.8
    assert len(evaluation["rejection"]["mc_entropy"]) == len(evaluation["rejection"]["fractions"])
    from PIL import Image

    with Image.open(run / evaluation["plot"]) as image:
        assert image.format == "PNG" and image.size[0] > 400


@pytest.mark.slow
def test_outputs_differ_between_runs_at_ort_enable_all_and_are_well_formed(mc_run):
    from pipeline.runtime import create_session

    run, result = mc_run
    session = create_session(run / "model.mc.onnx", result.record["runtime"])
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)
    first, second = mc.run_mc(session, x), mc.run_mc(session, x)
    assert np.abs(first["probs"] - second["probs"]).max() > 0
    for out in (first, second):
        np.testing.assert_allclose(out["probs"].sum(1), 1.0, atol=1e-5)
        assert np.all(out["mutual_info"] >= 0) and np.all(out["mutual_info"] <= out["entropy"] + 1e-5)
    # Batch 1 and an odd batch work (dynamic batch), and the seed makes a fresh session reproducible.
    assert mc.run_mc(session, x[:1])["probs"].shape == (1, 10)
    import onnxruntime as ort

    replay = []
    for _ in range(2):
        ort.set_seed(7)
        replay.append(mc.run_mc(create_session(run / "model.mc.onnx", result.record["runtime"]), x[:5])["probs"])
    np.testing.assert_array_equal(replay[0], replay[1])


@pytest.mark.slow
def test_plain_training_mode_dropout_is_deleted_by_ort_so_the_check_catches_it(tmp_path):
    """Why the masks are random ops: Dropout(training_mode=True) runs at ORT_DISABLE_ALL but is optimized away."""
    from pipeline import export

    module = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    path = tmp_path / "train_mode.onnx"
    export.save(export.export_module(module, (8,), 18), path)
    assert "Dropout" in [n.op_type for n in onnx.load(str(path)).graph.node]
    failures: list[str] = []
    levels = mc._check_levels(path, np.ones((4, 8), np.float32), {}, {}, MCConfig(), failures)
    assert levels["disable"]["max_abs_diff_between_runs"] > 0
    assert levels["all"]["max_abs_diff_between_runs"] == 0
    assert any("'all'" in f and "identical" in f for f in failures)
    assert not any("'disable'" in f for f in failures)


@pytest.mark.slow
def test_verification_catches_a_graph_whose_random_op_was_replaced(mc_run, tmp_path):
    run, _ = mc_run
    model = onnx.load(str(run / "model.mc.onnx"))
    for node in model.graph.node:
        if node.op_type == "RandomUniformLike":  # mask becomes a function of the input: deterministic
            node.op_type = "Sigmoid"
            del node.attribute[:]
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    reference = _reference(run)
    with pytest.raises(mc.MCVerificationError) as caught:
        mc.verify_mc(tampered, reference, MCConfig(**SMALL))
    message = str(caught.value)
    assert "random ops {}" in message and "identical outputs" in message


@pytest.mark.slow
def test_accuracy_gate_fails_against_a_better_deterministic_model(mc_run):
    """Negative control of the gate: a 'deterministic model' that is always right beats MC by > 0.5 points."""
    run, _ = mc_run
    reference = _reference(run)
    oracle = np.eye(10)[reference.y_val]
    perfect = mc.Reference(reference.raw, reference.x, reference.y, reference.x_val, reference.y_val, reference.labels,
                           reference.preprocess,
                           deterministic=lambda x: oracle if x is reference.x_val else np.full((len(x), 10), 0.1),
                           dropout_layers=reference.dropout_layers)
    with pytest.raises(mc.MCVerificationError, match=r"MC validation accuracy .* below the deterministic 100.00%"):
        mc.verify_mc(run / "model.mc.onnx", perfect, MCConfig(**{**SMALL, "max_accuracy_drop": 0.005}))


@pytest.mark.slow
def test_a_failed_check_leaves_no_file_and_no_record(exported_run, monkeypatch):
    from pipeline.workflow import mc_export_run

    before = (exported_run / "manifest.json").read_text()

    def fail(*args, **kwargs):
        raise mc.MCVerificationError("simulated failure after the export")

    monkeypatch.setattr(mc, "evaluate_uncertainty", fail)
    with pytest.raises(mc.MCVerificationError, match="simulated"):
        mc_export_run(exported_run, MCConfig(**SMALL))
    assert not (exported_run / "model.mc.onnx").exists()
    assert not [p.name for p in exported_run.iterdir() if p.name.startswith(".model.mc")]
    assert (exported_run / "manifest.json").read_text() == before
    assert "mc" not in json.loads(before)["artifacts"]


def _reference(run: Path) -> mc.Reference:
    return mc.load_reference(run, artifacts.read_manifest(run))


# --- the command line -------------------------------------------------------------------------


def test_bad_mc_option_fails_before_any_work(tiny_run):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["export", "--run", str(tiny_run), "--mc-dropout", "--mc-samples", "1"])
    assert result.exit_code == 2 and "MC samples must be in [2, 4096], got 1" in result.output
    assert not (tiny_run / "model.onnx").exists() and not (tiny_run / "model.mc.onnx").exists()


@pytest.mark.slow
def test_export_mc_dropout_command_writes_both_models(tiny_run):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["export", "--run", str(tiny_run), "--mc-dropout", "--mc-samples", "8",
                                      "--mc-max-accuracy-drop", "50", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    manifest = artifacts.read_manifest(tiny_run)
    assert report["mc"]["record"] == manifest["artifacts"]["mc"] and manifest["artifacts"]["mc"]["samples"] == 8
    assert manifest["artifacts"]["fp32"]["verification"]["shipped"]["graph"]["passed"]
    assert (tiny_run / "model.mc.onnx").is_file() and (tiny_run / "mc_uncertainty.png").is_file()


@pytest.mark.slow
def test_predict_reads_mc_probabilities_and_uncertainty(mc_run):
    from pipeline.config import PredictConfig
    from pipeline.predict import Sample, classify, open_model

    run, _ = mc_run
    reference = _reference(run)
    mc_model = open_model(run, PredictConfig(variant="mc"))
    fp32_model = open_model(run, PredictConfig(variant="fp32"))
    samples = [Sample(f"test[{i}]", reference.x[i]) for i in range(20)]
    noisy = classify(mc_model, samples, top_k=10)
    for p in noisy:
        # Probabilities are used as they come (no second softmax, which would flatten them towards 1/K).
        assert sum(prob for _, _, prob in p.top) == pytest.approx(1.0, abs=1e-4)
        assert 0 <= p.uncertainty["mutual_info"] <= p.uncertainty["entropy"] + 1e-5 <= math.log(10) + 1e-4
        assert p.to_dict()["uncertainty"] == p.uncertainty
    # Negative control: the deterministic model carries no uncertainty field.
    plain = classify(fp32_model, samples)
    assert all(p.uncertainty is None and "uncertainty" not in p.to_dict() for p in plain)
    agreement = np.mean([a.top[0][0] == b.top[0][0] for a, b in zip(noisy, plain, strict=True)])
    assert agreement >= 0.6


# --- the onnxsim step of the MC verification runs onnxsim's check and reads its verdict --------------


def _random_mask_graph(path):
    """x -> x * (RandomUniformLike(x) >= 0.5): the shape of an MC dropout graph, in microseconds."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("RandomUniformLike", ["x"], ["u"], dtype=TensorProto.FLOAT),
             helper.make_node("GreaterOrEqual", ["u", "half"], ["keep"]),
             helper.make_node("Cast", ["keep"], ["mask"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "mask"], ["y"])]
    graph = helper.make_graph(nodes, "mc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
                              initializer=[helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("verdict", [True, False])
def test_the_recorded_onnxsim_check_ran_and_is_its_verdict(tmp_path, monkeypatch, verdict):
    import onnxsim

    real, calls = onnxsim.simplify, []

    def counting(model, *args, check_n=0, **kwargs):
        calls.append(check_n)
        simplified, ok = real(model, *args, check_n=check_n, **kwargs)
        return simplified, ok and verdict

    monkeypatch.setattr(onnxsim, "simplify", counting)
    x = np.ones((2, 16), dtype=np.float32)
    failures: list[str] = []
    record = mc._check_onnxsim(_random_mask_graph(tmp_path / "m.onnx"), x, {"RandomUniformLike": 1}, {}, MCConfig(),
                               failures)
    assert len(calls) == 1 and calls[0] >= 1  # onnxsim was asked to check (its default, 0, checks nothing)
    assert record["check"] is verdict
    if verdict:
        assert record["check_n"] == calls[0] and failures == [] and record["random_ops"] == {"RandomUniformLike": 1}
    else:
        assert failures and "own check failed" in failures[0]
