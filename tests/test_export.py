"""`export_run` and `pipeline export`: the shipped file, the manifest contract, and what failures leave behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import REPO

runner = CliRunner()


def manifest_of(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def assert_one_line_error(result, fragment: str, code: int):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], lines[0]


# --- the stage -------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_module_writes_one_file_with_a_dynamic_batch_and_the_asked_opset(tmp_path):
    from pipeline.config import ModelConfig
    from pipeline.export import export_module, save
    from pipeline.model import DropoutCNN

    model = DropoutCNN(ModelConfig(conv_channels=(4,), fc_units=(8,), dropout=0.5)).eval()
    for opset in (18, 17):
        proto = export_module(model, (1, 8, 8), opset)
        assert next(o.version for o in proto.opset_import if o.domain == "") == opset
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
        assert [o.name for o in proto.graph.output] == ["logits"]
        assert "Dropout" not in {n.op_type for n in proto.graph.node}
        save(proto, tmp_path / f"m{opset}.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m17.onnx", "m18.onnx"]  # no .onnx.data beside them


def test_export_config_validates():
    from pipeline.config import ExportConfig

    assert ExportConfig().opset == 18
    for bad in ({"opset": 11}, {"tolerance": 0}, {"parity_batch_sizes": ()}, {"simplify_checks": 0}):
        with pytest.raises(ValueError):
            ExportConfig(**bad)


# --- the exported run: the manifest is the device contract -----------------------------------


def test_exported_run_record_follows_the_contract(exported_run):
    manifest = manifest_of(exported_run)
    record = manifest["artifacts"]["fp32"]
    path = exported_run / record["file"]
    assert record["file"] == "model.onnx" and record["kind"] == "fp32" and record["parent"] is None
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["bytes"] == path.stat().st_size
    assert record["opset"] == 18 and record["ir_version"] == onnx.load(str(path)).ir_version
    assert record["input"] == {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}
    assert record["output"] == {"name": "logits", "shape": ["batch", 10], "dtype": "float32"}
    assert record["runtime"] == {"graph_optimization_level": "all", "disabled_optimizers": []}
    assert manifest["recommended"] == "fp32"
    check = record["verification"]
    assert check["passed"] and check["raw"]["passed"] and check["shipped"]["passed"]
    assert check["max_abs_diff"] <= check["tolerance"] == 1e-4
    assert set(check["shipped"]["parity_max_abs_diff"]) == {"1", "7", "256"}
    assert check["shipped"]["deterministic"] and check["shipped"]["reference_max_abs_diff"] <= 1e-4
    assert check["simplify"]["check_passed"] and check["simplify"]["check_n"] >= 1
    assert check["ort_test_accuracy"] == check["torch_test_accuracy"] == record["test_accuracy"] > 0.5
    assert check["differing_predictions"] == 0
    assert check["source_checkpoint_sha256"] == manifest["training"]["checkpoint_sha256"]


def test_exported_run_holds_exactly_one_onnx_file_and_no_raw_export(exported_run):
    onnx_files = sorted(p.name for p in exported_run.iterdir() if ".onnx" in p.name)
    assert onnx_files == ["model.onnx"]
    assert not list(exported_run.glob(".*.tmp"))


def test_model_metadata_carries_labels_preprocess_checkpoint_and_version(exported_run):
    from pipeline import __version__

    manifest = manifest_of(exported_run)
    proto = onnx.load(str(exported_run / "model.onnx"))
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(metadata["labels"]) == manifest["labels"]
    assert json.loads(metadata["preprocess"]) == manifest["preprocess"]
    assert metadata["source_checkpoint_sha256"] == hashlib.sha256((exported_run / "checkpoint.pt").read_bytes()).hexdigest()
    assert metadata["pipeline_version"] == __version__
    # the exporter's per-node stack traces (local paths) do not ship
    assert not any(p.key.startswith("pkg.torch") for n in proto.graph.node for p in n.metadata_props)


def test_export_section_reports_histograms_and_node_counts(exported_run):
    section = manifest_of(exported_run)["export"]
    assert section["simplified"] is True
    for stage in ("raw", "shipped"):
        histogram = section["op_histogram"][stage]
        assert sum(histogram.values()) == section["nodes"][stage]
        assert histogram == section["twin_op_histogram"][stage]
        assert not {"Dropout", "RandomUniformLike", "RandomUniform"} & set(histogram)
    assert "never shipped" in section["raw_export"]


def test_manifest_only_client_reproduces_the_recorded_accuracy(exported_run):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import manifest_client
    finally:
        sys.path.remove(str(REPO / "tools"))
    accuracy, recorded = manifest_client.check_recorded_accuracy(exported_run)
    assert accuracy == recorded
    # the client itself needs neither torch nor this package
    code = ("import sys; sys.path.insert(0, 'tools'); import manifest_client; "
            "assert 'torch' not in sys.modules and 'pipeline' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    # and it gives the same labels as ONNX Runtime through the pipeline's own helpers
    from pipeline.data import Preprocess
    from pipeline.runtime import create_session

    manifest = manifest_of(exported_run)
    raw = np.random.default_rng(0).uniform(0, 16, (5, 1, 8, 8)).astype(np.float32)
    x = Preprocess.from_dict(manifest["preprocess"]).apply(raw)
    logits = create_session(exported_run / "model.onnx").run(None, {"input": x})[0]
    assert manifest_client.classify(exported_run, raw) == [manifest["labels"][i] for i in logits.argmax(1)]


# --- failures leave nothing half-written ------------------------------------------------------


@pytest.mark.slow
def test_failed_audit_writes_nothing(tiny_run, monkeypatch):
    """Negative control end to end: the run's model exported in train mode must stop the export."""
    from pipeline import export
    from pipeline.config import ExportConfig
    from pipeline.verify import DropoutAuditError
    from pipeline.workflow import export_run

    real = export.export_module
    monkeypatch.setattr(export, "export_module", lambda model, shape, opset: real(model.train(), shape, opset))
    before = (tiny_run / "manifest.json").read_bytes()
    with pytest.raises(DropoutAuditError) as caught:
        export_run(tiny_run, ExportConfig(parity_batch_sizes=(1, 7, 64)))
    assert "raw export" in str(caught.value) and caught.value.nodes
    assert not list(tiny_run.glob("*.onnx*")) and not list(tiny_run.glob(".*.tmp"))
    assert (tiny_run / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_interrupted_write_keeps_the_previous_model(exported_run, monkeypatch):
    from pipeline import export
    from pipeline.config import ExportConfig
    from pipeline.workflow import export_run

    model_before = (exported_run / "model.onnx").read_bytes()
    manifest_before = (exported_run / "manifest.json").read_bytes()

    def interrupted(proto, path):
        Path(path).write_bytes(proto.SerializeToString()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_run(exported_run, ExportConfig(parity_batch_sizes=(1, 7, 64)))
    assert (exported_run / "model.onnx").read_bytes() == model_before
    assert (exported_run / "manifest.json").read_bytes() == manifest_before
    assert not list(exported_run.glob(".*.tmp"))


# --- the command -------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_exports_a_checkpoint_into_a_new_run_folder(tiny_run, tmp_path):
    out = tmp_path / "adopted"
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--out", str(out),
                                 "--skip-simplify", "--parity-batches", "1,5,64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fp32"]["verification"]["simplify"] == {"skipped": True}
    assert report["export"]["simplified"] is False
    manifest = manifest_of(out)
    assert manifest["artifacts"]["fp32"]["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert manifest["training"]["test_accuracy"] == manifest_of(tiny_run)["training"]["test_accuracy"]
    assert manifest["artifacts"]["fp32"]["test_accuracy"] == manifest["training"]["test_accuracy"]
    assert sorted(p.name for p in out.iterdir() if ".onnx" in p.name) == ["model.onnx"]
    assert_one_line_error(runner.invoke(app, ["export", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--out", str(out)]),
                          "already exists", code=4)


def _rewrite_checkpoint(path: Path, change) -> None:
    import torch

    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def test_cli_bad_inputs_are_one_line_errors_and_write_nothing(tiny_run, tmp_path):
    run = str(tiny_run)
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes((tiny_run / "checkpoint.pt").read_bytes())
    _rewrite_checkpoint(foreign, lambda p: p.update(labels=[f"class {i}" for i in range(10)]))
    assert_one_line_error(runner.invoke(app, ["export", "--run", run, "--checkpoint", str(foreign)]),
                          "does not belong to this run: its labels differ", code=5)

    wrong_shape = tmp_path / "wrong.pt"
    wrong_shape.write_bytes((tiny_run / "checkpoint.pt").read_bytes())
    _rewrite_checkpoint(wrong_shape, lambda p: p["model_config"].update(fc_units=[64]))
    assert_one_line_error(runner.invoke(app, ["export", "--run", run, "--checkpoint", str(wrong_shape)]),
                          "weights do not match the recorded architecture", code=5)

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_one_line_error(runner.invoke(app, ["export", "--checkpoint", str(tiny_run / "checkpoint.pt"),
                                              "--out", str(blocker / "run")]), "cannot create", code=4)

    assert_one_line_error(runner.invoke(app, ["export", "--run", str(tmp_path / "nope")]), "no such run folder", code=4)
    assert_one_line_error(runner.invoke(app, ["export", "--run", run, "--opset", "11"]), "opset must be in", code=2)
    assert_one_line_error(runner.invoke(app, ["export", "--run", run, "--out", str(tmp_path / "x")]), "--checkpoint", code=2)

    (tiny_run / "checkpoint.pt").write_bytes(b"garbage")
    assert_one_line_error(runner.invoke(app, ["export", "--run", run]), "not a readable checkpoint", code=5)
    assert not list(tiny_run.glob("*.onnx*"))
    assert manifest_of(tiny_run)["artifacts"] == {}


# --- onnxsim: its check is consumed, its absence or failure stops the export ---------------------


def _tiny_graph(random: bool) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    if random:  # an active Dropout: new masks on every run, so onnxsim's own check must notice.
        # (A RandomUniformLike graph is not a control here: onnxsim's check passed it in our runs.)
        nodes += [helper.make_node("Dropout", ["r", "ratio", "train"], ["y"], name="drop")]
    else:
        nodes += [helper.make_node("Identity", ["r"], ["y"], name="id")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
                              initializer=[helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.5]),
                                           helper.make_tensor("train", TensorProto.BOOL, [], [True])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_simplify_consumes_onnxsims_own_check():
    from pipeline.simplify import SimplifyError, simplify_model

    simplified, report = simplify_model(_tiny_graph(random=False))
    assert report.check_passed and report.nodes_before == 2 and report.nodes_after == len(simplified.graph.node) == 1
    with pytest.raises(SimplifyError, match="own check failed"):
        simplify_model(_tiny_graph(random=True))
    with pytest.raises(ValueError, match="checks nothing"):
        simplify_model(_tiny_graph(random=False), check_n=0)


def test_missing_onnxsim_stops_with_a_hint(monkeypatch):
    from pipeline.simplify import SimplifyError, simplify_model

    monkeypatch.setitem(sys.modules, "onnxsim", None)  # `import onnxsim` now raises ImportError
    with pytest.raises(SimplifyError, match="onnxsim is not installed.*--skip-simplify"):
        simplify_model(_tiny_graph(random=False))
