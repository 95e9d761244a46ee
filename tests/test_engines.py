"""Engines besides ONNX Runtime: the agreement check before timing, a broken pair refused, OpenVINO optional.

Structural: what is checked is which pairs are timed, refused or reported, and the numbers they
carry; never how fast anything ran. The fast tests use a tiny hand-built graph and a reference
made from it; the slow ones read a real exported run's test images.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import bench, engines, runtime
from pipeline.cli import app
from pipeline.config import BenchConfig
from tests.test_bench import QUICK, linear_model
from tests.test_predict import BLOCK_TORCH

REPO = Path(__file__).resolve().parent.parent
HAS_OPENVINO = engines.available("openvino")[0]


@dataclasses.dataclass(frozen=True)
class InputScaled:
    """A pair whose engine is fed `scale * x`: the deliberately broken pair (a wrong input scale), or a
    faithful stand-in for another engine at scale 1. It runs through ONNX Runtime so no extra engine is needed."""

    inner: bench.OnnxTarget
    scale: float
    kind: str = "fp32"
    engine: str = "openvino"

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def input_shape(self):
        return self.inner.input_shape

    def describe(self) -> dict:
        return {**self.inner.describe(), "engine": self.engine, "scale": self.scale}

    def open(self, provider, batch, threads, config, x):
        return self.inner.open(provider, batch, threads, config, (self.scale * x).astype(np.float32))

    def outputs(self, x: np.ndarray) -> np.ndarray:
        session = runtime.create_session(self.inner.path, {})
        return runtime.run_batched(session, (self.scale * x).astype(np.float32))


def reference_for(path: Path, n: int = 200, tolerance: float = 1e-4) -> engines.Reference:
    images = np.random.default_rng(1).standard_normal((n, 1, 8, 8)).astype(np.float32)
    logits = runtime.run_batched(runtime.create_session(path, {}), images)
    return engines.Reference(images, logits, tolerance, "test: seeded images through ORT fp32")


@pytest.fixture
def linear(tmp_path) -> tuple[bench.OnnxTarget, engines.Reference]:
    path = linear_model(tmp_path / "model.onnx")
    (target,) = bench.file_targets([path])
    return target, reference_for(path)


@pytest.fixture
def installed(monkeypatch):
    """Pretend the engine of the stand-in pair is installed (the pair itself runs through ORT)."""
    monkeypatch.setattr(engines, "available", lambda engine: (True, ""))


@pytest.mark.parametrize(("kind", "scale", "check", "words"), [
    ("fp32", 255.0, "max_abs_diff", "exceeds the export tolerance"),  # images fed 0-255 instead of normalised
    ("int8", -1.0, "top1_agreement", "top-1 agreement"),  # a sign error: the class order flips
])
def test_a_pair_with_a_wrong_input_scale_is_refused_and_never_timed(linear, installed, kind, scale, check, words):
    target, reference = linear
    broken = InputScaled(target, scale, kind=kind)
    result = bench.benchmark([target, broken], BenchConfig(**QUICK), reference=reference)
    refused = [r for r in result.records if r["engine"] == "openvino"]
    assert refused and all(r["status"] == "refused" and words in r["reason"] for r in refused)
    assert all("latency_ms" not in r and r["agreement"]["check"] == check and not r["agreement"]["passed"] for r in refused)
    assert {r["batch"] for r in refused} == set(QUICK["batch_sizes"])
    assert all(r["status"] == "ok" for r in result.records if r["engine"] == "onnxruntime")
    assert result.extra["agreement"][0]["passed"] is False
    assert bench.schema_problems(result.to_json()) == []
    assert all(f["engine"] != "openvino" for f in result.to_json()["summary"]["fastest"].values())


def test_a_faithful_pair_passes_the_check_and_is_timed_in_the_same_group(linear, installed):
    # Negative control of the refusal: the same wrapper at scale 1 agrees exactly, so it is timed.
    target, reference = linear
    faithful = InputScaled(target, 1.0)
    result = bench.benchmark([target, faithful], BenchConfig(**QUICK), reference=reference)
    timed = [r for r in result.records if r["engine"] == "openvino"]
    assert timed and all(r["status"] == "ok" and r["agreement"]["passed"] for r in timed)
    assert all(r["agreement"]["max_abs_diff"] == 0.0 and r["agreement"]["top1_agreement"] == 1.0 for r in timed)
    # One interleaved group per batch: both engines have samples in every round.
    assert all(r["round_p50_ms"] and len(r["round_p50_ms"]) == QUICK["rounds"] for r in result.records)


def test_tolerance_and_agreement_limits_are_the_boundaries(linear):
    target, reference = linear
    shifted = lambda x: reference.logits + 0.5 * reference.tolerance  # noqa: E731
    assert engines.check_agreement(target, reference, outputs=shifted)["passed"]
    over = lambda x: reference.logits + 2 * reference.tolerance  # noqa: E731
    assert not engines.check_agreement(target, reference, outputs=over)["passed"]
    int8 = dataclasses.replace(target, kind="int8")
    flipped = reference.logits.copy()
    flipped[0] = -flipped[0]  # 1 of 200 images disagrees: 99.5%, exactly the limit
    assert engines.check_agreement(int8, reference, outputs=lambda x: flipped)["passed"]
    flipped[1] = -flipped[1]  # 2 of 200: 99.0%
    record = engines.check_agreement(int8, reference, outputs=lambda x: flipped)
    assert not record["passed"] and record["top1_agreement"] == pytest.approx(0.99)


def test_other_engines_without_a_run_are_refused_for_want_of_real_images(linear, installed):
    target, _ = linear
    result = bench.benchmark([target, InputScaled(target, 1.0)], BenchConfig(**QUICK), reference=None)
    other = [r for r in result.records if r["engine"] == "openvino"]
    assert other and all(r["status"] == "refused" and "--run" in r["reason"] for r in other)


def test_engine_names_are_validated():
    with pytest.raises(ValueError, match="unknown engine"):
        BenchConfig(engines=("tensorflow",))
    assert BenchConfig().engines == ("onnxruntime",)


def test_without_openvino_one_line_says_so_and_everything_else_works(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    ok, reason = engines.available("openvino")
    assert not ok and "not installed" in reason and "pipeline[openvino]" in reason
    path = linear_model(tmp_path / "model.onnx")
    result = CliRunner().invoke(app, ["bench", str(path), "--engine", "onnxruntime,openvino", "--batch-sizes", "1,4",
                                      "--threads", "1", "--duration", "0.03", "--rounds", "2", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "not installed" in line]
    assert len(lines) == 1, result.output
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert {r["status"] for r in doc["records"] if r["engine"] == "onnxruntime"} == {"ok"}
    assert {r["status"] for r in doc["records"] if r["engine"] == "openvino"} == {"unavailable"}
    assert bench.schema_problems(doc) == []


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed (optional extra)")
def test_openvino_runs_the_same_file_with_the_settings_bench_chose(linear):
    target, reference = linear
    targets = bench.file_targets([target.path], ("onnxruntime", "openvino"))
    assert [t.engine for t in targets] == ["onnxruntime", "openvino"] and targets[1].path == target.path
    result = bench.benchmark(targets, BenchConfig(**{**QUICK, "threads": (2,)}), reference=reference)
    records = [r for r in result.records if r["engine"] == "openvino"]
    assert records and all(r["status"] == "ok" and r["agreement"]["check"] == "max_abs_diff" for r in records)
    assert all(r["openvino"]["inference_num_threads"] == 2 and r["openvino"]["precision_hint"] == "f32"
               and r["openvino"]["performance_hint"] == "LATENCY" for r in records)
    assert all(r["agreement"]["max_abs_diff"] <= reference.tolerance for r in records)


@pytest.mark.slow
def test_reference_is_the_runs_test_split_and_bench_stays_torch_free(exported_run_master):
    from pipeline import artifacts

    manifest = artifacts.read_manifest(exported_run_master)
    reference = engines.reference_for_run(exported_run_master)
    assert len(reference.images) == manifest["dataset"]["sizes"]["test"]
    assert reference.tolerance == manifest["artifacts"]["fp32"]["verification"]["tolerance"]
    code = BLOCK_TORCH + (
        "from pipeline import bench, engines\n"
        f"ref = engines.reference_for_run({str(exported_run_master)!r})\n"
        f"targets = bench.run_targets({str(exported_run_master)!r}, ['fp32'], ('onnxruntime', 'openvino'))\n"
        "kept, held, checks = bench.vet_engines(targets, ref)\n"
        "print('CHECKS=' + str(len(checks)) + ' HELD=' + str(len(held)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "TORCH_ATTEMPTS=[]" in done.stderr
    assert ("CHECKS=1 HELD=0" if HAS_OPENVINO else "CHECKS=0 HELD=1") in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("blocked", [True, False])
def test_predict_follows_the_deployment_and_falls_back_with_one_note(exported_run_master, tmp_path, monkeypatch, blocked):
    import shutil

    from pipeline import artifacts
    from tests.test_deployments import entry
    from tests.test_predict import digits_test_split

    if not blocked and not HAS_OPENVINO:
        pytest.skip("openvino is not installed (optional extra)")
    if blocked:
        monkeypatch.setitem(sys.modules, "openvino", None)
    run = tmp_path / "run"
    shutil.copytree(exported_run_master, run)
    artifacts.update_manifest(run, lambda m: m.__setitem__("deployments", [entry(1, artifact="fp32", engine="openvino")]))
    x, _ = digits_test_split(run, 5)
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(app, ["predict", str(run), str(tmp_path / "x.npy"), "--json"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    model = json.loads(result.stdout)["model"]
    if blocked:
        assert len(notes) == 1 and "openvino" in notes[0] and "not installed" in notes[0]
        assert model["engine"] == "onnxruntime" and model["variant"] == artifacts.read_manifest(run)["recommended"]
    else:
        assert notes == [] and model["engine"] == "openvino" and model["variant"] == "fp32"
