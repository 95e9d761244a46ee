"""The dropout audit and parity checks, with negative controls that must fail them.

Graph-level cases use tiny `onnx.helper` graphs; export-level cases use tiny inline modules
exported by torch's dynamo exporter (seconds each, so marked slow and exported once per module).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.verify import (
    DropoutAuditError,
    ParityError,
    Verification,
    audit_graph,
    histogram_difference,
    raise_for_failures,
    verify_model,
)

# --- graph audit on helper-built graphs -----------------------------------------------------


def _model(nodes, initializers=(), extra_inputs=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]), *extra_inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _bool(name: str, value: bool):
    return helper.make_tensor(name, TensorProto.BOOL, [], [value])


def _ratio():
    return helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.5])


def test_clean_graph_passes():
    audit = audit_graph(_model([helper.make_node("Relu", ["x"], ["y"], name="relu")]))
    assert audit.passed and audit.findings == () and audit.inert_dropouts == ()


def test_dropout_with_constant_true_training_mode_is_named():
    model = _model([helper.make_node("Dropout", ["x", "ratio", "train"], ["y"], name="drop_fc1")],
                   [_ratio(), _bool("train", True)])
    audit = audit_graph(model)
    assert not audit.passed
    assert [f.node for f in audit.findings] == ["drop_fc1"]
    assert "training_mode is true" in audit.findings[0].reason


def test_dropout_training_mode_from_a_constant_node_is_resolved():
    nodes = [helper.make_node("Constant", [], ["train"], value=_bool("v", True)),
             helper.make_node("Dropout", ["x", "", "train"], ["y"], name="drop")]
    assert [f.node for f in audit_graph(_model(nodes)).findings] == ["drop"]


def test_dropout_training_mode_from_a_graph_input_fails():
    model = _model([helper.make_node("Dropout", ["x", "", "train"], ["y"], name="drop")],
                   extra_inputs=[helper.make_tensor_value_info("train", TensorProto.BOOL, [])])
    audit = audit_graph(model)
    assert not audit.passed and "decided at run time" in audit.findings[0].reason


@pytest.mark.parametrize("inputs", [["x"], ["x", "ratio"], ["x", "ratio", "off"]])
def test_inference_dropout_is_inert_not_a_failure(inputs):
    model = _model([helper.make_node("Dropout", inputs, ["y"], name="drop")], [_ratio(), _bool("off", False)])
    audit = audit_graph(model)
    assert audit.passed and audit.inert_dropouts == ("drop",)


@pytest.mark.parametrize("op", ["RandomUniformLike", "RandomNormalLike", "Bernoulli"])
def test_random_ops_fail(op):
    nodes = [helper.make_node(op, ["x"], ["noise"], name="noise_node"),
             helper.make_node("Mul", ["x", "noise"], ["y"], name="mask")]
    audit = audit_graph(_model(nodes))
    assert [(f.node, f.op_type, f.reason) for f in audit.findings] == [("noise_node", op, "random op")]


def test_training_mode_batchnorm_fails():
    params = [helper.make_tensor(n, TensorProto.FLOAT, [4], [1.0] * 4) for n in ("s", "b", "m", "v")]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], name="bn", training_mode=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 2])], initializer=params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert [f.node for f in audit_graph(model).findings] == ["bn"]


def test_dropout_hidden_in_a_subgraph_is_found():
    then_branch = helper.make_graph([helper.make_node("Dropout", ["x", "ratio", "train"], ["t"], name="inner_drop")],
                                    "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", 4])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])],
                                    "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", 4])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)]
    model = _model(nodes, [_ratio(), _bool("train", True), _bool("cond", True)])
    assert [f.node for f in audit_graph(model).findings] == ["inner_drop"]


def test_twin_histogram_detects_an_extra_op():
    ours = {"Gemm": 2, "Relu": 1, "Dropout": 1}
    twin = {"Gemm": 2, "Relu": 1}
    assert histogram_difference(ours, twin) == {"Dropout": [1, 0]}
    assert histogram_difference(twin, twin) == {}
    clean = audit_graph(_model([helper.make_node("Relu", ["x"], ["y"])]))
    verification = Verification(tolerance=1e-4, graph=clean, histogram=ours, twin_histogram=twin)
    with pytest.raises(DropoutAuditError, match="Dropout 1 vs 0"):
        raise_for_failures(verification, "model")
    # control: equal histograms raise nothing
    raise_for_failures(Verification(tolerance=1e-4, graph=clean, histogram=twin, twin_histogram=twin), "model")


# --- exported tiny modules: the negative controls ------------------------------------------

import torch  # noqa: E402  (the helper-graph tests above need no torch)
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402


class Head(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear, on (N, 1, 4, 4) images."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.drop, self.fc2 = nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x.flatten(1)))))


class TwinHead(Head):
    """The dropout-0 twin of Head."""

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class AlwaysDropout(Head):
    """Calls F.dropout(training=True): dropout stays active even in eval()."""

    def forward(self, x):
        return self.fc2(F.dropout(F.relu(self.fc1(x.flatten(1))), 0.5, training=True))


class SpatialDropout(nn.Module):
    """Conv -> Dropout2d -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.drop, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Dropout2d(0.5), nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.conv(x))).flatten(1))


SHAPE = (1, 4, 4)
IMAGES = np.random.default_rng(0).standard_normal((40, *SHAPE)).astype(np.float32)
TOL = 1e-4


def _export(module: nn.Module, train: bool) -> onnx.ModelProto:
    from pipeline.export import export_module

    return export_module(module.train(train), SHAPE, 18)


@pytest.fixture(scope="module")
def exports() -> dict[str, onnx.ModelProto]:
    return {"eval": _export(Head(), False), "twin": _export(TwinHead(), False),
            "train": _export(Head(), True), "always": _export(AlwaysDropout(), False),
            "spatial": _export(SpatialDropout(), True)}


def _verify(model, module, twin=None):
    from pipeline.onnxfile import op_histogram

    return verify_model(model, module, IMAGES, TOL, batch_sizes=(1, 7, 33), repeats=3,
                        twin_histogram=op_histogram(twin) if twin is not None else None, reference_images=4)


@pytest.mark.slow
def test_eval_export_passes_every_check(exports):
    """The positive control: without it, the negative controls below could pass by always failing."""
    verification = _verify(exports["eval"], Head(), twin=exports["twin"])
    assert verification.failures() == []
    assert verification.deterministic is True
    assert set(verification.parity) == {1, 7, 33} and max(verification.parity.values()) <= TOL
    assert verification.reference_max_abs_diff <= TOL
    raise_for_failures(verification, "eval export")


@pytest.mark.slow
def test_export_in_train_mode_fails_graph_and_numbers(exports):
    model = exports["train"]
    verification = _verify(model, Head(), twin=exports["twin"])
    dropout_nodes = [n.name for n in model.graph.node if n.op_type == "Dropout"]
    assert dropout_nodes and [f.node.split(" ")[0] for f in verification.graph.findings] == dropout_nodes
    assert verification.deterministic is False
    assert verification.histogram_diff["Dropout"] == [1, 0]
    assert max(verification.parity.values()) > TOL
    with pytest.raises(DropoutAuditError) as caught:
        raise_for_failures(verification, "raw export")
    error = caught.value
    assert error.nodes and dropout_nodes[0] in error.nodes[0]
    assert error.max_abs_diff > error.tolerance == TOL
    assert dropout_nodes[0] in str(error) and "tolerance 0.0001" in str(error)


@pytest.mark.slow
def test_functional_dropout_with_training_true_fails_even_from_eval(exports):
    verification = _verify(exports["always"], AlwaysDropout().eval(), twin=exports["twin"])
    assert not verification.graph.passed
    assert verification.deterministic is False
    with pytest.raises(DropoutAuditError, match="training_mode is true"):
        raise_for_failures(verification, "raw export")


@pytest.mark.slow
def test_dropout2d_in_train_mode_fails_through_random_ops(exports):
    model = exports["spatial"]
    ops = {n.op_type for n in model.graph.node}
    assert "Dropout" not in ops, "the point of this control: Dropout2d leaves no Dropout node to find"
    verification = _verify(model, SpatialDropout())
    assert {f.op_type for f in verification.graph.findings} == {"RandomUniformLike"}
    assert verification.deterministic is False
    with pytest.raises(DropoutAuditError, match="random op"):
        raise_for_failures(verification, "raw export")


@pytest.mark.slow
def test_twin_histogram_check_catches_an_extra_op_in_a_real_export(exports):
    """An exported graph with one op more than its dropout-0 twin fails, even when it is otherwise clean."""
    from pipeline.onnxfile import op_histogram

    twin = op_histogram(exports["twin"])
    shrunk = {**twin, "Relu": twin["Relu"] - 1}  # the twin of a model that has one ReLU fewer
    verification = verify_model(exports["eval"], Head(), IMAGES, TOL, batch_sizes=(1,), twin_histogram=shrunk)
    assert verification.graph.passed and verification.parity[1] <= TOL
    assert verification.histogram_diff == {"Relu": [twin["Relu"], twin["Relu"] - 1]}
    with pytest.raises(DropoutAuditError, match="dropout 0: Relu"):
        raise_for_failures(verification, "export")


@pytest.mark.slow
def test_parity_error_carries_the_diff_and_tolerance(exports):
    """A weight changed after export: graph clean, numbers off -> ParityError, not a dropout error."""
    model = onnx.ModelProto()
    model.CopyFrom(exports["eval"])
    bias = next(t for t in model.graph.initializer if tuple(t.dims) == (3,))
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + np.float32(0.01), bias.name))
    verification = _verify(model, Head(), twin=exports["twin"])
    assert verification.dropout_failures() == []
    with pytest.raises(ParityError) as caught:
        raise_for_failures(verification, "export")
    assert caught.value.max_abs_diff == pytest.approx(0.01, rel=1e-2)
    assert caught.value.tolerance == TOL
    assert "batch 1: max abs diff 0.01" in str(caught.value)
