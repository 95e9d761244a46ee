"""Untrusted bytes never end in an unhandled exception, and concurrent writers never lose an update.

Fuzzing with hypothesis over corrupted ONNX files, IDX headers and manifests: each reader must
either succeed or raise its typed `PipelineError`.
"""

from __future__ import annotations

import json
import multiprocessing
import struct

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from pipeline import artifacts, data
from pipeline.errors import PipelineError
from pipeline.onnxfile import ModelFileError, load_model

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _tiny_onnx() -> bytes:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


VALID_ONNX = _tiny_onnx()


@FUZZ
@given(st.data())
def test_corrupted_onnx_bytes_give_a_typed_error_or_a_valid_model(tmp_path, draw):
    data_bytes = bytearray(VALID_ONNX)
    kind = draw.draw(st.sampled_from(["truncate", "flip", "random"]))
    if kind == "truncate":
        data_bytes = data_bytes[: draw.draw(st.integers(0, len(data_bytes) - 1))]
    elif kind == "flip":
        for _ in range(draw.draw(st.integers(1, 8))):
            i = draw.draw(st.integers(0, len(data_bytes) - 1))
            data_bytes[i] = draw.draw(st.integers(0, 255))
    else:
        data_bytes = bytearray(draw.draw(st.binary(max_size=300)))
    path = tmp_path / "fuzz.onnx"
    path.write_bytes(bytes(data_bytes))
    try:
        model = load_model(path)
    except ModelFileError:
        return
    assert isinstance(model, onnx.ModelProto)


def test_non_onnx_and_empty_files_are_refused(tmp_path):
    for name, content in [("empty.onnx", b""), ("text.onnx", b"hello, I am not a model\n"), ("png.onnx", b"\x89PNG\r\n")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelFileError):
            load_model(tmp_path / name)
    (tmp_path / "ok.onnx").write_bytes(VALID_ONNX)
    assert load_model(tmp_path / "ok.onnx").graph.node[0].op_type == "Relu"  # control: a valid file loads


def _idx_bytes(dims: list[int], payload: bytes, dtype_code: int = 0x08) -> bytes:
    return bytes([0, 0, dtype_code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload


@FUZZ
@given(dims=st.lists(st.integers(0, 40), min_size=0, max_size=4), extra=st.integers(-5, 5),
       dtype_code=st.sampled_from([0x08, 0x09, 0x0B, 0x0D, 0x07, 0xFF]), magic=st.binary(min_size=0, max_size=4))
def test_fuzzed_idx_headers_give_a_typed_error_or_a_consistent_array(tmp_path, dims, extra, dtype_code, magic):
    size = int(np.prod(dims)) if dims else 0
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0D: 4}.get(dtype_code, 1)
    payload = bytes(max(size * itemsize + extra, 0))
    blob = _idx_bytes(dims, payload, dtype_code)
    if magic:
        blob = magic + blob[len(magic):]
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(blob)
    try:
        array = data.read_idx(path)
    except PipelineError:
        return
    assert array.shape == tuple(dims)


MANIFEST_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                               max_leaves=10)


@FUZZ
@given(content=st.one_of(st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                         st.dictionaries(st.sampled_from(["schema", "preprocess", "artifacts", "labels"]),
                                         MANIFEST_VALUES).map(json.dumps)))
def test_fuzzed_manifests_give_a_typed_error_or_a_dict(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / artifacts.MANIFEST).write_text(content, encoding="latin-1")
    try:
        manifest = artifacts.read_manifest(run)
        data.Preprocess.from_dict(manifest.get("preprocess"))
    except PipelineError:
        return


def _append_records(run_dir: str, worker: int, count: int) -> None:
    def add(key: str, value: int):
        record = {"file": f"{key}.onnx", "kind": "fp32", "parent": None, "sha256": f"{value:064x}"}
        return lambda manifest: manifest["artifacts"].__setitem__(key, record)

    for i in range(count):
        artifacts.update_manifest(run_dir, add(f"w{worker}-{i}", i))


def test_concurrent_manifest_updates_lose_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    artifacts.write_manifest(run, {"schema": artifacts.MANIFEST_SCHEMA, "artifacts": {}})
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_records, args=(str(run), w, 25)) for w in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    manifest = artifacts.read_manifest(run)
    assert len(manifest["artifacts"]) == 75  # every update of every writer survived
    assert not list(run.glob(".*.tmp"))  # and no temporary file was left behind


def test_the_schema_guards_what_a_stage_writes(tmp_path):
    """A stage cannot write a record the schema does not know: the manifest on disk stays as it was."""
    from pipeline.manifest import ManifestError

    run = tmp_path / "run"
    run.mkdir()
    artifacts.write_manifest(run, {"schema": artifacts.MANIFEST_SCHEMA, "artifacts": {}})
    before = (run / "manifest.json").read_bytes()
    for bad in ({"file": "m.onnx", "kind": "fp32", "parent": None, "sha256": "0" * 64, "tset_accuracy": 0.9},
                {"file": "m.onnx", "kind": "fp32", "parent": None, "sha256": "0" * 64, "bytes": "12"},
                {"kind": "fp32", "parent": None, "sha256": "0" * 64}):
        with pytest.raises(ManifestError):
            artifacts.update_manifest(run, lambda m, bad=bad: m["artifacts"].__setitem__("x", bad))
        assert (run / "manifest.json").read_bytes() == before
    # Negative control: a record that follows the schema is written.
    good = {"file": "m.onnx", "kind": "fp32", "parent": None, "sha256": "0" * 64, "bytes": 12}
    artifacts.update_manifest(run, lambda m: m["artifacts"].__setitem__("x", good))
    assert artifacts.load_manifest(run).artifacts["x"].bytes == 12
