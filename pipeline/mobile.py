"""ONNX Runtime's mobile format (.ort), the operators a reduced-size build needs, and the mobile usability report.

All three come from onnxruntime's own tools (`onnxruntime.tools`):
- `.ort` files are written the way `python -m onnxruntime.tools.convert_onnx_models_to_ort` writes
  them (a CPU session with `session.save_model_format=ORT` and `optimized_model_filepath`, the
  NCHWc layout transformer excluded so the file runs on ARM as well, `session.qdqisint8allowed=0`
  as for a non-ARM target). Unlike that script, each model is converted with its own recorded
  `runtime` (optimization level, disabled optimizers): an int8 model measured with
  `QDQPropagationTransformer` disabled must be frozen the same way, and the script takes no
  disabled optimizers;
- `required_operators.config` from `onnxruntime.tools.ort_format_model.create_config_from_models`,
  the file `build.py --include_ops_by_config` takes for a reduced-size build;
- the NNAPI / CoreML partitioning report from `onnxruntime.tools.mobile_helpers.usability_checker`
  (what `python -m onnxruntime.tools.check_onnx_model_mobile_usability` logs), kept as data.

ORT's converter is not byte-deterministic: the same .onnx converted twice, even in two fresh
processes, gives .ort files that differ in flatbuffer order (measured with onnxruntime 1.32), so a
bundle packed with --ort-format is not byte-identical across packs (one without it is).
Imports no torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.errors import PipelineError
from pipeline.runtime import LEVELS

CONFIG_NAME = "required_operators.config"
ORT_TOLERANCE = 1e-6
# The NCHWc transformer writes x86-specific layouts into the file; ORT's converter drops it for every
# target except amd64 for the same reason.
PORTABLE_DISABLED = ("NchwcTransformer",)


class OrtFormatError(PipelineError):
    """An .ort conversion that failed, or whose outputs differ from its .onnx."""

    exit_code = 9


def convert(model: bytes, runtime: dict, out: Path) -> Path:
    """Write the ORT-format file of `model` (bytes) to `out`, frozen with the artifact's runtime settings."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[(runtime or {}).get("graph_optimization_level", "all")]
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.add_session_config_entry("session.qdqisint8allowed", "0")
    options.log_severity_level = 3
    disabled = sorted(set((runtime or {}).get("disabled_optimizers") or []) | set(PORTABLE_DISABLED))
    try:
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    except Exception as exc:  # onnxruntime's own exception types
        raise OrtFormatError(f"onnxruntime could not convert the model to ORT format: {' '.join(str(exc).split())[:300]}") from None
    return out


def required_operators(ort_files: list[Path], out: Path) -> str:
    """The reduced-build operator config for these .ort files, with the temporary paths it names made relative."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    with _quiet("ort_format_model.utils"):
        create_config_from_models([Path(p) for p in ort_files], Path(out), False)
    text = Path(out).read_text()
    for path in ort_files:  # the config names its source files: keep the bundle names, not this host's temp folder
        text = text.replace(str(path), Path(path).name)
    return text


def mobile_usability(model: bytes) -> dict:
    """Per EP (NNAPI, CoreML NeuralNetwork, CoreML MLProgram): partitions, nodes covered, unsupported ops, verdict.

    As `check_onnx_model_mobile_usability` does: the model is first optimized to the BASIC level (what
    the ORT-format conversion does), then checked as is and, if it has dynamic inputs, as if they were fixed.
    """
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    checkers = {"NNAPI": uc.check_nnapi_partitions,
                "CoreML NeuralNetwork": lambda m, fixed: uc.check_coreml_partitions(m, fixed, "coreml_supported_neuralnetwork_ops.md"),
                "CoreML MLProgram": lambda m, fixed: uc.check_coreml_partitions(m, fixed, "coreml_supported_mlprogram_ops.md")}
    with tempfile.TemporaryDirectory() as tmp, _quiet("usability_checker"):
        source, optimized = Path(tmp) / "model.onnx", Path(tmp) / "model.basic.onnx"
        source.write_bytes(model)
        optimize_model(source, optimized)
        shaped = ModelProtoWithShapeInfo(optimized).model_with_shape_info
        dynamic_inputs, _ = uc.check_shapes(shaped.graph)
        report = {"dynamic_inputs": [i.name for i in dynamic_inputs], "execution_providers": {}}
        for name, check in checkers.items():
            info = check(shaped, True)
            entry = _partition_facts(info)
            if entry["suitability"] != "YES" and dynamic_inputs:
                entry["if_input_shapes_fixed"] = _partition_facts(check(shaped, False))
            report["execution_providers"][name] = entry
    return report


def _partition_facts(info) -> dict:
    return {"suitability": info.suitability().name, "partitions": info.num_partitions,
            "supported_nodes": info.num_supported_nodes, "nodes": info.num_nodes,
            "unsupported_ops": sorted(info.unsupported_ops),
            "nodes_unsupported_due_to_dynamic_input": info.nodes_unsupported_due_to_dynamic_input}


def max_abs_diff(ort_model: bytes, onnx_session, inputs: np.ndarray) -> float:
    """The .ort file's outputs against its .onnx session's on the same inputs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(ort_model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = session.run(None, {name: inputs})[0].astype(np.float64)
    want = onnx_session.run(None, {onnx_session.get_inputs()[0].name: inputs})[0].astype(np.float64)
    return float(np.max(np.abs(got - want))) if got.size else 0.0


@contextlib.contextmanager
def _quiet(logger_name: str):
    """onnxruntime's tools log at INFO and print; keep that out of the CLI's output."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
