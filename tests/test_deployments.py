"""The manifest's per-batch `deployments`: their shape, which entry a reader follows, the fallback when an engine is missing."""

from __future__ import annotations

import pytest

from pipeline import deployments
from pipeline.manifest import Deployment, ManifestError

HOST = {"machine": "x86_64", "processor": None, "cpu_count": 2}


def entry(batch: int, artifact: str = "int8", engine: str = "onnxruntime", **rest) -> dict:
    return {"batch": batch, "artifact": artifact, "engine": engine, "provider": "cpu", "threads": 1, "p50_ms": 0.06,
            "ratio_to_fp32": 0.5, "host": HOST, "measured": "bench", "created": "2026-12-02T00:00:00+00:00", **rest}


def manifest(*entries: dict) -> dict:
    return {"recommended": "int8", "artifacts": {"fp32": {}, "int8": {}}, "deployments": list(entries)}


def installed(*names):
    return lambda engine: (engine in names, f"{engine}: not installed")


def test_the_record_has_exactly_the_documented_fields():
    record = Deployment.from_dict(entry(1)).to_dict()
    assert list(record) == ["batch", "artifact", "engine", "provider", "threads", "p50_ms", "ratio_to_fp32", "host",
                            "measured", "created"]
    with_fallback = Deployment.from_dict(entry(1, engine="openvino", onnxruntime_artifact="fp32")).to_dict()
    assert list(with_fallback)[-1] == "onnxruntime_artifact" and with_fallback["onnxruntime_artifact"] == "fp32"
    with pytest.raises(ManifestError, match="unknown field"):
        Deployment.from_dict({**entry(1), "latency": 1.0})
    with pytest.raises(ManifestError, match="expected int"):
        deployments.read(manifest({**entry(1), "batch": "one"}))


@pytest.mark.parametrize(("batch", "expected"), [(1, 1), (16, 1), (255, 32), (256, 256), (10_000, 256)])
def test_readers_follow_the_nearest_measured_batch_at_or_below(batch, expected):
    m = manifest(entry(256, engine="openvino"), entry(1), entry(32, artifact="fp32"))
    assert deployments.follow(m, batch, installed("openvino")).deployment.batch == expected


def test_below_every_measured_batch_the_smallest_entry_is_followed():
    assert deployments.follow(manifest(entry(8), entry(64)), 1, installed()).deployment.batch == 8


def test_a_missing_engine_falls_back_to_onnxruntime_with_one_line():
    m = manifest(entry(1), entry(256, artifact="fp32", engine="openvino"))
    choice = deployments.follow(m, 300, installed())
    assert (choice.artifact, choice.engine) == ("int8", "onnxruntime")
    assert choice.note and "\n" not in choice.note and "openvino" in choice.note and "not installed" in choice.note
    # Negative control: where the engine is installed, the deployment is followed as written, without a note.
    followed = deployments.follow(m, 300, installed("openvino"))
    assert (followed.artifact, followed.engine, followed.note) == ("fp32", "openvino", None)


def test_without_deployments_the_recommended_artifact_runs_on_onnxruntime():
    choice = deployments.follow({"recommended": "int8", "artifacts": {"int8": {}}}, 4, installed())
    assert (choice.artifact, choice.engine, choice.deployment, choice.note) == ("int8", "onnxruntime", None, None)


def test_a_new_measurement_replaces_only_its_batch_sizes():
    old = [entry(1, measured="export speed check"), entry(256, measured="export speed check")]
    new = [Deployment.from_dict(entry(256, engine="openvino")), Deployment.from_dict(entry(16))]
    merged = deployments.merged(old, new)
    assert [(d["batch"], d["engine"], d["measured"]) for d in merged] == [
        (1, "onnxruntime", "export speed check"), (16, "onnxruntime", "bench"), (256, "openvino", "bench")]


def record(artifact, engine, batch, p50, kind=None, status="ok", threads=1):
    return {"artifact": artifact, "kind": kind or artifact, "engine": engine, "provider": "cpu", "batch": batch,
            "threads": threads, "status": status, "latency_ms": {"p50": p50}}


def test_from_records_picks_the_fastest_timed_deployable_pair_per_batch():
    records = [record("fp32", "onnxruntime", 1, 0.12), record("int8", "onnxruntime", 1, 0.06),
               record("int8", "openvino", 1, 0.03, status="refused"),  # refused pairs never count
               record("torch", "torch", 1, 0.01, kind="torch"), record("mc", "onnxruntime", 1, 0.01),
               record("fp32", "onnxruntime", 256, 20.0), record("int8", "openvino", 256, 8.0)]
    out = deployments.from_records(records, "bench", "now", HOST)
    assert [(d.batch, d.artifact, d.engine, d.ratio_to_fp32) for d in out] == [
        (1, "int8", "onnxruntime", 0.5), (256, "int8", "openvino", 0.4)]


def test_the_export_speed_check_names_the_fastest_artifact_and_engine_per_batch():
    speed = {"threads": 2, "batch_1": {"fp32_ms": 0.12, "int8_ms": 0.06, "int8@openvino_ms": 0.07, "int8.default_ms": 0.01},
             "batch_256": {"fp32_ms": 20.0, "int8_ms": 12.0, "int8@openvino_ms": 8.0}}
    out = deployments.from_speed_check(speed, ("fp32", "int8"), "now")
    assert [(d.batch, d.artifact, d.engine, d.threads, d.ratio_to_fp32, d.measured) for d in out] == [
        (1, "int8", "onnxruntime", 2, 0.5, "export speed check"), (256, "int8", "openvino", 2, 0.4, "export speed check")]


def test_a_missing_engine_falls_back_to_the_file_fastest_on_onnxruntime_there():
    m = manifest(entry(256, artifact="int8", engine="openvino", onnxruntime_artifact="int8-space-to-depth"))
    m["artifacts"]["int8-space-to-depth"] = {}
    choice = deployments.follow(m, 256, installed())
    assert (choice.artifact, choice.engine) == ("int8-space-to-depth", "onnxruntime")
    assert "running int8-space-to-depth on onnxruntime" in choice.note
    # Negative control: a fallback the run does not ship is ignored for `recommended`.
    del m["artifacts"]["int8-space-to-depth"]
    assert deployments.follow(m, 256, installed()).artifact == "int8"


def test_the_speed_check_names_the_onnxruntime_fallback_only_where_another_engine_wins():
    speed = {"threads": 2, "batch_1": {"fp32_ms": 0.12, "int8_ms": 0.06, "int8-s2d_ms": 0.07},
             "batch_256": {"fp32_ms": 20.0, "int8_ms": 12.0, "int8@openvino_ms": 8.0, "int8-s2d_ms": 9.0,
                           "int8-s2d@openvino_ms": 8.5}}
    out = deployments.from_speed_check(speed, ("fp32", "int8", "int8-s2d"), "now")
    assert [(d.batch, d.artifact, d.engine, d.onnxruntime_artifact) for d in out] == [
        (1, "int8", "onnxruntime", None), (256, "int8", "openvino", "int8-s2d")]
    records = [record("fp32", "onnxruntime", 256, 20.0), record("int8", "openvino", 256, 8.0),
               record("int8", "onnxruntime", 256, 12.0), record("int8-s2d", "onnxruntime", 256, 9.0, kind="int8")]
    assert deployments.from_records(records, "bench", "now", HOST)[0].onnxruntime_artifact == "int8-s2d"
