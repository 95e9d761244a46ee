"""`bench`: the bench.json schema, unavailable providers reported and never timed, bounded loops,
IO binding on the CPU, the torch baseline, and the dropout comparison (with negative controls).

No timing assertions: what is checked is structure, bounds and numerical agreement.
Fast tests use a tiny hand-built ONNX graph; the slow ones export a real DropoutCNN.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from pipeline import artifacts, bench
from pipeline.cli import app
from pipeline.config import BenchConfig, DataConfig, ModelConfig, TrainConfig, to_dict
from pipeline.errors import ModelIntegrityError

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
# Tiny settings: these tests check structure, not speed.
QUICK = {"batch_sizes": (1, 4), "warmup": 2, "warmup_seconds": 0.2, "duration": 0.03, "rounds": 2, "threads": (1,)}


def linear_model(path: Path, batch: str | int = "batch") -> Path:
    """input (batch, 1, 8, 8) -> Flatten -> MatMul -> Add -> logits (batch, 10): a real graph in microseconds."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 10], rng.standard_normal((64, 10)).astype(np.float32).ravel())
    bias = helper.make_tensor("b", TensorProto.FLOAT, [10], rng.standard_normal(10).astype(np.float32))
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save_model(model, str(path))
    return path


def write_run(folder: Path, model_config: ModelConfig | None = None, files: dict[str, Path] | None = None,
              epoch_seconds: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
    """A run folder with a manifest we write here (the contract of COMMON.md), metrics and artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    records = {}
    for name, path in (files or {}).items():
        if path.parent != folder:
            shutil.copy(path, folder / path.name)
        records[name] = {"file": path.name, "kind": name, "parent": None, "sha256": artifacts.sha256_file(folder / path.name),
                         "bytes": (folder / path.name).stat().st_size,
                         "runtime": {"graph_optimization_level": "all", "disabled_optimizers": []}}
    config = model_config or ModelConfig()
    history = [{"epoch": i + 1, "seconds": s} for i, s in enumerate(epoch_seconds)]
    artifacts.atomic_write_json(folder / artifacts.METRICS, {"history": history, "device": "cpu",
                                                            "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds)})
    manifest = {"schema": artifacts.MANIFEST_SCHEMA, "model": {"config": to_dict(config)},
                "training": {"checkpoint": artifacts.CHECKPOINT, "config": to_dict(TrainConfig())},
                "dataset": {"sizes": {"train": 100}}, "artifacts": records, "runtime": {}}
    artifacts.write_manifest(folder, manifest)
    return folder


def export_cnn(folder: Path, dropout: float, seed: int = 0) -> Path:
    """An (untrained) DropoutCNN with a checkpoint and its fp32 export, as export writes them."""
    import torch

    from pipeline.data import Preprocess
    from pipeline.model import DropoutCNN
    from pipeline.train import save_checkpoint

    torch.manual_seed(seed)
    config = ModelConfig(conv_channels=(4, 8), fc_units=(16,), dropout=dropout)
    model = DropoutCNN(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / artifacts.CHECKPOINT, model, Preprocess((8, 8), 1, 1 / 16, (0.0,), (1.0,)),
                    tuple("0123456789"), "test", DataConfig(), TrainConfig(), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (torch.zeros(2, 1, 8, 8),), dynamo=True, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                    external_data=False, verbose=False)
    onnx.save_model(program.model_proto, str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def cnn_runs(tmp_path_factory) -> dict[str, Path]:
    """Two runs of one architecture, dropout 0.5 and 0, exported once per module."""
    root = tmp_path_factory.mktemp("bench_runs")
    runs = {}
    for name, rate, seconds in (("with", 0.5, (3.0, 2.0, 2.0)), ("without", 0.0, (2.0, 1.0, 1.0))):
        folder = root / name
        path = export_cnn(folder, rate)
        runs[name] = write_run(folder, ModelConfig(conv_channels=(4, 8), fc_units=(16,), dropout=rate), {"fp32": path},
                               epoch_seconds=seconds)
    return runs


@pytest.fixture
def linear_run(tmp_path) -> Path:
    return write_run(tmp_path / "run", files={"fp32": linear_model(tmp_path / "model.onnx")})


# --- schema --------------------------------------------------------------------------------


def test_bench_json_conforms_to_schema_and_names_every_measurement(linear_run):
    result = bench.benchmark(bench.run_targets(linear_run), BenchConfig(**QUICK))
    _, path, _ = bench.publish(result, linear_run, "test")
    doc = json.loads(path.read_text())
    assert bench.schema_problems(doc) == []
    assert [(r["artifact"], r["provider"], r["batch"], r["threads"]) for r in doc["records"]] == \
        [("fp32", "cpu", 1, 1), ("fp32", "cpu", 4, 1)]
    for r in doc["records"]:
        assert r["status"] == "ok" and r["session_providers"] == ["CPUExecutionProvider"]
        lat = r["latency_ms"]
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["throughput_ips"] == pytest.approx(r["batch"] / (lat["mean"] / 1e3))
        assert r["optimization_level"] == "all" and r["threads_source"] == "option"
    env = doc["environment"]
    assert env["versions"]["onnxruntime"] == ort.__version__ and env["usable_cores"] >= 1
    assert not list(linear_run.glob(".bench.json.*"))  # the atomic writer left no temporary file


def test_schema_check_catches_a_broken_document(linear_run):
    """Negative control: the schema check must be able to fail."""
    doc = bench.benchmark(bench.run_targets(linear_run), BenchConfig(**{**QUICK, "batch_sizes": (1,)})).to_json()
    del doc["records"][0]["latency_ms"]["p99"]
    doc["records"].append({**doc["records"][0], "status": "unavailable", "reason": None})
    del doc["environment"]["cpu_model"]
    problems = bench.schema_problems(doc)
    assert any("p99" in p for p in problems)
    assert any("without a reason" in p for p in problems) and any("carries timings" in p for p in problems)
    assert any("cpu_model" in p for p in problems)


# --- providers -----------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime build has CUDA: the CPU-build path does not apply")
def test_cuda_on_the_cpu_build_is_reported_unavailable_and_never_timed(linear_run):
    config = BenchConfig(**{**QUICK, "providers": ("cpu", "cuda")})
    doc = bench.benchmark(bench.run_targets(linear_run), config).to_json()
    cuda = [r for r in doc["records"] if r["provider"] == "cuda"]
    cpu = [r for r in doc["records"] if r["provider"] == "cpu"]
    assert len(cuda) == 2 and all(r["status"] == "unavailable" for r in cuda)
    assert all("CUDAExecutionProvider" in r["reason"] and "latency_ms" not in r and "session_providers" not in r
               for r in cuda)
    assert all(r["status"] == "ok" for r in cpu)  # the control: the same targets do time on the CPU
    assert "cuda" in doc["summary"]["unavailable"]
    assert bench.schema_problems(doc) == []


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime build has CUDA: the CPU-build path does not apply")
def test_require_provider_is_a_one_line_error_and_writes_nothing(linear_run):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--run", str(linear_run), "--provider", "cuda", "--require-provider",
                                 "--duration", "0.02", "--batch-sizes", "1"])
    assert result.exit_code == 6
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --require-provider") and "CUDAExecutionProvider" in lines[0]
    assert not (linear_run / bench.BENCH_JSON).exists()
    # Control: without --require-provider the same request succeeds and reports cuda as unavailable.
    result = runner.invoke(app, ["bench", "--run", str(linear_run), "--provider", "cuda", "--provider", "cpu",
                                 "--duration", "0.02", "--batch-sizes", "1", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    doc = json.loads((linear_run / bench.BENCH_JSON).read_text())
    assert {r["provider"]: r["status"] for r in doc["records"]} == {"cuda": "unavailable", "cpu": "ok"}
    assert (linear_run / bench.BENCH_PNG).stat().st_size > 0


def test_bad_options_are_one_line_errors(linear_run):
    runner = CliRunner()
    for args, code in ((["--provider", "tpu"], 2), (["--batch-sizes", "0"], 2), (["--optimization-level", "max"], 2),
                       (["--threads", "x"], 2)):
        result = runner.invoke(app, ["bench", "--run", str(linear_run), *args])
        assert result.exit_code == code, (args, result.output)
        assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


# --- timing loops --------------------------------------------------------------------------


def test_runs_are_exact_and_loops_are_bounded(linear_run):
    targets = bench.run_targets(linear_run)
    doc = bench.benchmark(targets, BenchConfig(**{**QUICK, "runs": 7, "rounds": 3, "batch_sizes": (1,)})).to_json()
    (record,) = doc["records"]
    assert record["runs"] == 7 and record["stopped_by"] == "runs" and len(record["round_p50_ms"]) == 3
    # A time limit far below what 10^6 runs take stops the loop, and says so.
    limited = BenchConfig(**{**QUICK, "runs": 1_000_000, "rounds": 1, "time_limit": 0.05, "batch_sizes": (1,)})
    (record,) = bench.benchmark(targets, limited).records
    assert record["stopped_by"] == "time_limit" and 1 <= record["runs"] < 1_000_000


def test_io_binding_on_cpu_gives_the_plain_outputs(linear_run):
    doc = bench.benchmark(bench.run_targets(linear_run), BenchConfig(**{**QUICK, "io_binding": True})).to_json()
    assert all(r["status"] == "ok" and r["io_binding"] is True for r in doc["records"])
    assert all(r["io_binding_max_abs_diff"] == 0.0 for r in doc["records"])
    plain = bench.benchmark(bench.run_targets(linear_run), BenchConfig(**QUICK)).records
    assert all(r["io_binding"] is False and "io_binding_max_abs_diff" not in r for r in plain)


def test_a_model_that_cannot_take_the_batch_is_a_failed_record_not_a_crash(tmp_path):
    targets = bench.file_targets([linear_model(tmp_path / "fixed.onnx", batch=1)])
    records = bench.benchmark(targets, BenchConfig(**QUICK)).records
    assert [(r["batch"], r["status"]) for r in records] == [(1, "ok"), (4, "failed")]
    assert records[1]["reason"] and "latency_ms" not in records[1]


def test_a_file_changed_after_the_manifest_is_refused_with_exit_8(linear_run):
    path = linear_run / "model.onnx"
    model = onnx.load(str(path))
    model.graph.node[2].name = "edited"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        bench.run_targets(linear_run)
    result = CliRunner().invoke(app, ["bench", "--run", str(linear_run), "--duration", "0.02", "--batch-sizes", "1"])
    assert result.exit_code == 8, result.output  # the README's code for a changed model, as predict and pack
    assert len(result.output.strip().splitlines()) == 1 and "sha256" in result.output


# --- bench.json accumulates; nothing timed changes nothing; a read-only folder is refused first ----


def _bench(folder: Path, *args: str):
    return CliRunner().invoke(app, ["bench", "--run", str(folder), "--duration", "0.02", "--rounds", "1",
                                    "--warmup", "1", "--threads", "1", "--quiet", *args])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def distinct_times(monkeypatch):
    """Every benchmark gets its own `created` (real ones can fall in the same second)."""
    ticks = iter(f"2026-01-01T00:00:{i:02d}+00:00" for i in range(60))
    monkeypatch.setattr(artifacts, "now_iso", lambda: next(ticks))


def test_results_accumulate_and_retiming_replaces_only_that_combination(linear_run, distinct_times):
    assert _bench(linear_run, "--batch-sizes", "1,4").exit_code == 0
    first = json.loads((linear_run / bench.BENCH_JSON).read_text())
    png_before = (linear_run / bench.BENCH_PNG).read_bytes()
    assert _bench(linear_run, "--batch-sizes", "4,8").exit_code == 0
    doc = json.loads((linear_run / bench.BENCH_JSON).read_text())
    assert bench.schema_problems(doc) == []
    by_batch = {r["batch"]: r for r in doc["records"]}
    assert sorted(by_batch) == [1, 4, 8]  # batch 1 survived a benchmark that did not ask for it
    old = {r["batch"]: r for r in first["records"]}
    assert by_batch[1] == old[1]  # untouched, byte for byte
    assert by_batch[4]["created"] == doc["created"] != old[4]["created"]
    assert by_batch[4]["history"] == [{"created": old[4]["created"], "status": "ok",
                                       "p50_ms": old[4]["latency_ms"]["p50"], "runs": old[4]["runs"]}]
    assert "history" not in by_batch[8] and "history" not in by_batch[1]
    assert [i["created"] for i in doc["invocations"]] == [first["created"], doc["created"]]
    assert (linear_run / bench.BENCH_PNG).read_bytes() != png_before  # redrawn from the merged records


def test_an_attempt_that_times_nothing_never_replaces_a_timed_record():
    ok = {"artifact": "a", "engine": "onnxruntime", "provider": "cpu", "batch": 4, "threads": 1, "status": "ok",
          "reason": None, "created": "t0", "latency_ms": {"p50": 1.0}, "runs": 5}
    failed = {**ok, "status": "failed", "reason": "boom", "created": "t1"}
    del failed["latency_ms"]
    doc = {"schema": 2, "created": "t0", "config": {}, "environment": {}, "seconds": 1, "targets": [],
           "thread_choices": [], "records": [ok], "invocations": [{"created": "t0"}]}
    merged = bench.merge(doc, {**doc, "created": "t1", "records": [failed], "invocations": [{"created": "t1"}]})
    (record,) = merged["records"]
    assert record["status"] == "ok" and record["latency_ms"] == {"p50": 1.0}
    assert record["last_attempt"] == {"created": "t1", "status": "failed", "reason": "boom"}


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime build has CUDA: the CPU-build path does not apply")
def test_cuda_only_on_the_cpu_build_exits_6_and_leaves_every_file_byte_identical(linear_run):
    """The issue's acceptance line: bench, then `bench --provider cuda` on a CPU-only machine."""
    assert _bench(linear_run, "--batch-sizes", "1").exit_code == 0
    assert json.loads((linear_run / bench.BENCH_JSON).read_text())["records"][0]["latency_ms"]["p50"] > 0
    before = _snapshot(linear_run)
    result = _bench(linear_run, "--provider", "cuda", "--batch-sizes", "1")
    assert result.exit_code == 6, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: nothing was timed") and "CUDAExecutionProvider" in lines[0]
    assert _snapshot(linear_run) == before
    # Control: cuda listed beside cpu, which ran, is a success that keeps the CPU results.
    result = _bench(linear_run, "--provider", "cpu", "--provider", "cuda", "--batch-sizes", "1")
    assert result.exit_code == 0, result.output


def test_failed_targets_make_a_non_zero_exit_but_keep_what_ran(tmp_path):
    model = linear_model(tmp_path / "fixed.onnx", batch=1)  # cannot take batch 4
    result = CliRunner().invoke(app, ["bench", str(model), "--batch-sizes", "1,4", "--duration", "0.02", "--threads", "1",
                                      "--quiet"])
    assert result.exit_code == 13, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: 1 of 2 measurements failed (fixed@cpu/batch4")
    doc = json.loads((tmp_path / bench.BENCH_JSON).read_text())
    assert {r["batch"]: r["status"] for r in doc["records"]} == {1: "ok", 4: "failed"}
    # Nothing timed at all (every batch fails): exit 13, and no file is written.
    other = tmp_path / "other"
    other.mkdir()
    model = linear_model(other / "fixed.onnx", batch=1)
    result = CliRunner().invoke(app, ["bench", str(model), "--batch-sizes", "4", "--duration", "0.02", "--threads", "1"])
    assert result.exit_code == 13 and "nothing was timed" in result.output
    assert sorted(p.name for p in other.iterdir()) == ["fixed.onnx"]


def test_a_read_only_run_folder_is_refused_before_any_timing(linear_run, tmp_path, monkeypatch):
    """Read-only is simulated where the probe writes (the tests may run as root, which chmod does not stop)."""
    import errno

    real = artifacts.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) in (linear_run, linear_run.resolve()):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(artifacts.tempfile, "mkstemp", read_only)
    timed = []
    real_benchmark = bench.benchmark
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: timed.append(1) or real_benchmark(*a, **k))
    before = _snapshot(linear_run)
    result = _bench(linear_run, "--batch-sizes", "1")
    assert result.exit_code == 4 and timed == [], result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Read-only file system" in result.output and "--out DIR" in result.output
    assert _snapshot(linear_run) == before
    # What the hint says works: the same benchmark written elsewhere.
    result = _bench(linear_run, "--batch-sizes", "1", "--out", str(tmp_path / "elsewhere"))
    assert result.exit_code == 0 and timed == [1], result.output
    assert (tmp_path / "elsewhere" / bench.BENCH_JSON).is_file()


def test_an_unreadable_bench_json_is_refused_before_timing_and_kept(linear_run):
    (linear_run / bench.BENCH_JSON).write_text("{not json")
    result = _bench(linear_run, "--batch-sizes", "1")
    assert result.exit_code == 13 and "unreadable" in result.output and "--out DIR" in result.output
    assert (linear_run / bench.BENCH_JSON).read_text() == "{not json"


def test_auto_threads_are_probed_and_recorded(linear_run):
    config = BenchConfig(**{**QUICK, "threads": None, "batch_sizes": (1,)})
    result = bench.benchmark(bench.run_targets(linear_run), config)
    (record,) = result.records
    if bench.usable_cores() > 1:
        (choice,) = result.thread_choices
        assert set(choice["candidates_p50_ms"]) == {"1", str(bench.usable_cores())}
        assert record["threads"] == choice["chosen"] and record["threads_source"] == "auto (probe)"
    else:
        assert record["threads"] == 1 and record["threads_source"].startswith("auto")


# --- the torch baseline and the dropout question (real exports) -----------------------------


@pytest.mark.slow
def test_torch_baseline_runs_the_same_inputs_and_threads(cnn_runs):
    from pipeline.baseline import TorchTarget, run_baseline

    run = cnn_runs["with"]
    (onnx_target,) = bench.run_targets(run)
    torch_target = run_baseline(run)
    assert isinstance(torch_target, TorchTarget) and torch_target.input_shape == onnx_target.input_shape
    config = BenchConfig(**QUICK)
    x = bench.inputs_for(onnx_target.input_shape, 4, config.seed)
    torch_out = torch_target.open("cpu", 4, 1, config, x).run().numpy()
    onnx_out = onnx_target.open("cpu", 4, 1, config, x).run()[0]
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-5)  # same inputs, same model, eval mode

    doc = bench.benchmark([onnx_target, torch_target], config).to_json()
    assert bench.schema_problems(doc) == []
    by_key = {(r["engine"], r["batch"]): r for r in doc["records"]}
    for batch in (1, 4):
        ort_record, torch_record = by_key["onnxruntime", batch], by_key["torch", batch]
        assert torch_record["torch_threads"] == ort_record["threads"] == 1
        ratio = torch_record["latency_ms"]["p50"] / ort_record["latency_ms"]["p50"]
        assert ort_record["speedup_vs_torch"] == pytest.approx(ratio)
    assert "speedup_vs_torch" not in by_key["torch", 1]


def test_latency_verdict_tells_a_real_difference_from_one_noisy_round():
    from pipeline import dropout_cost

    def records(with_rounds, without_rounds):
        def one(name, rounds):
            return {"artifact": name, "batch": 1, "threads": 1, "status": "ok", "round_p50_ms": rounds,
                    "latency_ms": {"p50": float(np.median(rounds))}}
        return [one("a", with_rounds), one("b", without_rounds)]

    # One round hit by a neighbour's burst (x20) does not make everything "equal within noise" ...
    (burst,) = dropout_cost._latency_verdicts(records([1.0, 1.0, 20.0, 1.01, 0.99], [1.0] * 5), "a", "b")
    assert burst["equal_within_noise"] is True and burst["tolerance"] < 0.1
    # ... and a steady 30% difference is reported as one (the negative control).
    (slower,) = dropout_cost._latency_verdicts(records([1.3, 1.31, 1.29, 1.3, 1.32], [1.0] * 5), "a", "b")
    assert slower["equal_within_noise"] is False and slower["ratio"] == pytest.approx(1.3)
    assert (burst["verdict"], slower["verdict"]) == ("equal", "different")
    # Rounds all over the place answer nothing.
    (noisy,) = dropout_cost._latency_verdicts(records([0.1, 0.3, 1.0, 1.5, 2.0], [1.0] * 5), "a", "b")
    assert noisy["verdict"] == "inconclusive" and noisy["equal_within_noise"] is False
    text = dropout_cost.answer(True, [noisy], {"median_epoch_seconds": None}, {"median_epoch_seconds": None}, {"dropout": 0.5})
    assert "inconclusive" in text and "costs nothing" not in text


@pytest.mark.slow
def test_dropout_comparison_identical_graphs_and_training_cost(cnn_runs):
    from pipeline import dropout_cost

    config = BenchConfig(**{**QUICK, "rounds": 2})
    result = dropout_cost.compare(cnn_runs["with"], cnn_runs["without"], config)
    assert result["op_histograms_identical"] is True
    assert "Dropout" not in result["op_histogram_with"] and result["dropout_ops_in_exports"] == {"with": 0, "without": 0}
    assert [v["batch"] for v in result["latency"]] == [1, 4]
    assert all(v["tolerance"] >= dropout_cost.NOISE_FLOOR and len(v["round_ratios"]) == 5 for v in result["latency"])
    # Median epochs from metrics.json: 2.0 s with dropout, 1.0 s without.
    assert result["training_ratio"] == pytest.approx(2.0)
    assert "identical op histograms" in result["answer"] and "+100.0%" in result["answer"]


@pytest.mark.slow
def test_dropout_comparison_negative_controls(cnn_runs, tmp_path):
    from pipeline import dropout_cost

    config = BenchConfig(**{**QUICK, "batch_sizes": (1,), "rounds": 1})
    # A graph that keeps a Dropout node must make the histograms differ.
    kept = tmp_path / "kept"
    shutil.copytree(cnn_runs["without"], kept)
    model = onnx.load(str(kept / "model.onnx"))
    out = model.graph.output[0].name
    producer = next(n for n in model.graph.node if out in n.output)
    producer.output[list(producer.output).index(out)] = "before_dropout"
    model.graph.node.append(helper.make_node("Dropout", ["before_dropout"], [out]))
    onnx.save_model(model, str(kept / "model.onnx"))
    artifacts.update_manifest(kept, lambda m: m["artifacts"]["fp32"].update(sha256=artifacts.sha256_file(kept / "model.onnx")))
    result = dropout_cost.compare(cnn_runs["with"], kept, config)
    assert result["op_histograms_identical"] is False and result["dropout_ops_in_exports"]["without"] == 1
    assert "DIFFER" in result["answer"]
    # Another architecture is refused, and so is a run with the same dropout rate.
    other = write_run(tmp_path / "other", ModelConfig(conv_channels=(4, 8), fc_units=(32,), dropout=0.0),
                      {"fp32": cnn_runs["without"] / "model.onnx"})
    with pytest.raises(dropout_cost.ComparisonError, match="fc_units"):
        dropout_cost.compare(cnn_runs["with"], other, config)
    with pytest.raises(dropout_cost.ComparisonError, match="same dropout"):
        dropout_cost.compare(cnn_runs["with"], cnn_runs["with"], config)


@pytest.mark.slow
def test_cli_bench_with_baseline_and_compare(cnn_runs, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["bench", "--run", str(cnn_runs["with"]), "--compare", str(cnn_runs["without"]),
                                      "--batch-sizes", "1,4", "--threads", "1", "--duration", "0.03", "--rounds", "2",
                                      "--warmup", "2", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / bench.BENCH_JSON).read_text())
    assert bench.schema_problems(doc) == []
    assert {(r["artifact"], r["batch"]) for r in doc["records"]} == {("fp32", 1), ("fp32", 4), ("torch", 1), ("torch", 4)}
    assert doc["dropout"]["op_histograms_identical"] is True and doc["dropout"]["answer"]
    assert (out / bench.BENCH_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the GPU check script ------------------------------------------------------------------


def test_cuda_check_skips_cleanly_without_a_gpu():
    if HAS_CUDA_EP:
        pytest.skip("this machine has onnxruntime-gpu: run tools/cuda_check.py itself")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "cuda_check.py")], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("SKIP: ") and ("CUDA" in proc.stdout or "GPU" in proc.stdout)


@pytest.mark.slow
def test_bench_reads_the_manifest_export_run_writes(exported_run):
    """Integration with the export stage's manifest record (runtime settings, sha256) and the trained checkpoint."""
    from pipeline.baseline import run_baseline

    targets = bench.run_targets(exported_run)
    assert "fp32" in [t.name for t in targets]
    doc = bench.benchmark([*targets, run_baseline(exported_run)], BenchConfig(**QUICK)).to_json()
    assert bench.schema_problems(doc) == []
    fp32 = [r for r in doc["records"] if r["artifact"] == "fp32"]
    assert [r["batch"] for r in fp32] == [1, 4] and all("speedup_vs_torch" in r for r in fp32)
    manifest_runtime = artifacts.read_manifest(exported_run)["artifacts"]["fp32"].get("runtime", {})
    assert all(r["optimization_level"] == manifest_runtime.get("graph_optimization_level", "all") for r in fp32)


def test_a_bench_is_refused_while_another_writer_holds_the_folder(linear_run, tmp_path):
    """One writer per run folder: an export (or bench) in progress there makes bench refuse with one line."""
    before = _snapshot(linear_run)
    with artifacts.run_writer(linear_run):
        result = _bench(linear_run, "--batch-sizes", "1")
    assert result.exit_code == 4, result.output
    assert len(result.output.strip().splitlines()) == 1 and "is being changed by" in result.output
    assert _snapshot(linear_run) == before
    assert _bench(linear_run, "--batch-sizes", "1").exit_code == 0  # control: free again, it runs
