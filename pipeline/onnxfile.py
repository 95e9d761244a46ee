"""Reading ONNX files safely, and the facts about them that every stage reports.

Imports onnx only (no torch, no onnxruntime), so `inspect`, `bench` and `predict` can use it.
Every file is passed through `onnx.checker` before anything else touches it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from pipeline.errors import PipelineError


class ModelFileError(PipelineError):
    """An ONNX file that is missing, empty, truncated, corrupt, or not ONNX at all."""

    exit_code = 7


def load_model(path: Path) -> onnx.ModelProto:
    """Parse and check an ONNX file; `ModelFileError` with the reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such ONNX file")
    data = path.read_bytes()
    if not data:
        raise ModelFileError(f"{path}: empty file")
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-like errors, ValueError
        raise ModelFileError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelFileError(f"{path}: not an ONNX model (no graph)")
    try:
        onnx.checker.check_model(model, full_check=False)
    except (onnx.checker.ValidationError, Exception) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path}: invalid ONNX model: {first}") from None
    external = [init.name for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ModelFileError(f"{path}: weights live in external files ({len(external)} tensors): not a self-contained model")
    return model


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type (main graph), sorted by op name."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def _value_info(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tensor.shape.dim]
    return {"name": value.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name}


def io_signature(model: onnx.ModelProto) -> dict:
    """Graph inputs (excluding initializers) and outputs with names, shapes and dtypes."""
    initializers = {init.name for init in model.graph.initializer}
    return {"inputs": [_value_info(v) for v in model.graph.input if v.name not in initializers],
            "outputs": [_value_info(v) for v in model.graph.output]}


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
