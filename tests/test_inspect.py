"""`pipeline inspect`: facts and the dropout audit verdict for any ONNX file; one line for anything else."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
from onnx import TensorProto, helper
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import REPO

runner = CliRunner()


def foreign_model(path, active_dropout: bool) -> None:
    """A model not made by this pipeline: MatMul -> Dropout (training_mode given as a constant)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Dropout", ["h", "ratio", "train"], ["y"], name="foreign_dropout")]
    graph = helper.make_graph(
        nodes, "foreign", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [0.1] * 6),
                     helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.3]),
                     helper.make_tensor("train", TensorProto.BOOL, [], [active_dropout])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="someone-else")
    onnx.save(model, str(path))


def test_inspect_our_model_reports_facts_and_a_passing_audit(exported_run):
    path = exported_run / "model.onnx"
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    record = json.loads((exported_run / "manifest.json").read_text())["artifacts"]["fp32"]
    assert facts["inputs"] == [record["input"]] and facts["outputs"] == [record["output"]]
    assert facts["opset"] == record["opset"] and facts["ir_version"] == record["ir_version"]
    assert facts["bytes"] == record["bytes"] and facts["sha256"] == record["sha256"]
    assert facts["dropout_audit"]["passed"] is True
    assert sum(facts["op_histogram"].values()) == facts["nodes"]
    assert facts["manifest"] == {"variant": "fp32", "sha256_matches": True, "test_accuracy": record["test_accuracy"]}
    assert "source_checkpoint_sha256" in facts["metadata"]
    # opset 18, and the export lowers the IR version to 8 (onnx stamps 10, which would need 1.18)
    assert facts["runtime_compatibility"]["onnxruntime_min"] == "1.14" and facts["ir_version"] == 8
    table = runner.invoke(app, ["inspect", str(path)])
    assert table.exit_code == 0 and "pass" in table.output and "Conv" in table.output
    assert "onnxruntime >= 1.14" in table.output


def test_inspect_a_foreign_model_names_its_active_dropout(tmp_path):
    active, inert = tmp_path / "active.onnx", tmp_path / "inert.onnx"
    foreign_model(active, active_dropout=True)
    foreign_model(inert, active_dropout=False)
    facts = json.loads(runner.invoke(app, ["inspect", str(active), "--json"]).stdout)
    assert facts["dropout_audit"]["passed"] is False
    assert facts["dropout_audit"]["findings"] == ["foreign_dropout (Dropout): training_mode is true: active dropout"]
    assert facts["opset"] == 17 and facts["producer"] == "someone-else" and facts["manifest"] is None
    compat = facts["runtime_compatibility"]
    assert compat["opset_imports"] == {"ai.onnx": 17} and compat["ops"] == {"Dropout": 13, "MatMul": 13}
    assert runner.invoke(app, ["inspect", str(active), "--check"]).exit_code == 9
    # control: the same graph with training_mode false passes, and --check exits 0
    facts = json.loads(runner.invoke(app, ["inspect", str(inert), "--json"]).stdout)
    assert facts["dropout_audit"] == {"passed": True, "findings": [], "inert_dropouts": ["foreign_dropout"]}
    assert runner.invoke(app, ["inspect", str(inert), "--check"]).exit_code == 0


def test_inspect_non_onnx_files_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path, fragment in ((text, "not an ONNX model"), (empty, "empty file"), (tmp_path / "missing.onnx", "no such ONNX file")):
        result = runner.invoke(app, ["inspect", str(path)])
        assert result.exit_code == 7, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output


def test_inspect_does_not_import_torch(tmp_path):
    path = tmp_path / "m.onnx"
    foreign_model(path, active_dropout=False)
    code = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
            f"r = CliRunner().invoke(app, ['inspect', {str(path)!r}]); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
