"""Which ONNX Runtime release runs a file: from its IR version and the opsets of the domains it really uses."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.compat import ORT_RELEASES, requirements, strictest, version_tuple


def tiny(opset: int, ir: int, extra_imports=(), ml_node: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    if ml_node:
        nodes.append(helper.make_node("Normalizer", ["y"], ["z"], domain="ai.onnx.ml", norm="L2"))
    out = "z" if ml_node else "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 3])])
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_imports)]
    return helper.make_model(graph, opset_imports=imports, ir_version=ir)


def test_the_table_only_grows():
    for column in (1, 2, 3):
        values = [row[column] for row in ORT_RELEASES]
        assert values == sorted(values)
    assert [version_tuple(r[0]) for r in ORT_RELEASES] == sorted(version_tuple(r[0]) for r in ORT_RELEASES)


@pytest.mark.parametrize("opset, ir, expected, reason", [
    (17, 8, "1.12", "ai.onnx opset 17"),
    (13, 7, "1.6", "ai.onnx opset 13"),
    (18, 8, "1.14", "ai.onnx opset 18"),
    (18, 10, "1.18", "IR version 10"),   # what torch's exporter writes today: the IR version decides
    (19, 9, "1.16", "IR version 9"),
])
def test_oldest_release(opset, ir, expected, reason):
    found = requirements(tiny(opset, ir))
    assert found["onnxruntime_min"] == expected and found["basis"].startswith(reason)
    assert found["ops"] == {"Relu": 14 if opset >= 14 else 13} and found["ops_need_opset"] == found["ops"]["Relu"]


def test_unused_imports_do_not_constrain_used_ones_do():
    unused = requirements(tiny(13, 7, extra_imports=[("ai.onnx.ml", 4), ("com.microsoft", 1)]))
    assert unused["onnxruntime_min"] == "1.6" and unused["domains_used"] == ["ai.onnx"]
    used = requirements(tiny(13, 7, extra_imports=[("ai.onnx.ml", 4)], ml_node=True))
    assert used["onnxruntime_min"] == "1.17" and "ai.onnx.ml opset 4" in used["basis"]


def test_beyond_the_table_has_no_release_and_says_why():
    found = requirements(tiny(22, 10))
    assert found["onnxruntime_min"] is None and "newer than the last release in the table (1.20)" in found["basis"]
    assert strictest([found, requirements(tiny(17, 8))]) is None
    assert strictest([requirements(tiny(17, 8)), requirements(tiny(18, 10))]) == "1.18"


def test_version_tuple_reads_dev_and_local_versions():
    assert version_tuple("1.19.0.dev20240101") == (1, 19, 0) and version_tuple("1.17.3+cu118") == (1, 17, 3)
    assert version_tuple("1.9") < version_tuple("1.10")  # numeric, not string order


def test_export_stamps_the_lowest_ir_version_its_opsets_and_types_allow():
    from pipeline.export import lowest_ir_version

    assert lowest_ir_version(tiny(18, 10)) == 8 and lowest_ir_version(tiny(17, 10)) == 8
    assert lowest_ir_version(tiny(18, 10, extra_imports=[("ai.onnx.ml", 5)])) == 8  # imported, unused
    assert lowest_ir_version(tiny(13, 7)) == 7  # never raised
    float8 = tiny(18, 10)
    float8.graph.initializer.append(helper.make_tensor("f8", TensorProto.FLOAT8E4M3FN, [1], [1.0]))
    assert lowest_ir_version(float8) == 10  # a type IR 8 cannot carry keeps the newer IR
