"""torch -> ONNX: one self-contained file with a dynamic batch dimension.

The exporter is torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`). Facts that
shape this module, measured on this stack:
- a model in eval() exports without Dropout nodes and with BatchNorm folded; one in train()
  keeps `Dropout(training_mode=True)` (nn.Dropout) or random ops (nn.Dropout2d), which is what
  `verify.audit_graph` looks for;
- the weights go to a separate `.onnx.data` file unless `external_data=False`;
- tracing with batch 1 can specialise the batch dimension, so the example batch is 2 and the
  batch dimension is declared dynamic;
- the requested opset is not always the one written, so it is checked afterwards.
This module returns `onnx.ModelProto`s in memory; the workflow decides what is written where.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXAMPLE_BATCH = 2
# Per-node records the dynamo exporter writes (stack traces with local paths, FX node text).
# Useful while auditing the raw export; stripped from the shipped file.
_NODE_METADATA_PREFIXES = ("pkg.torch.onnx.", "namespace")


class ExportError(PipelineError):
    """torch could not export the model, or wrote something other than what was asked."""

    exit_code = 14


def export_module(model: nn.Module, input_shape: tuple[int, int, int], opset: int) -> onnx.ModelProto:
    """Export `model` as it is (its train/eval mode is the caller's choice) for inputs (batch, C, H, W).

    Returns a self-contained ModelProto (weights inside) with input `input` and output `logits`.
    """
    example = torch.zeros((EXAMPLE_BATCH, *input_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    except Exception as exc:  # the exporter raises many types (TorchExportError, ConversionError, ...)
        first = " ".join(str(exc).split())[:300]
        raise ExportError(f"torch.onnx.export failed ({type(exc).__name__}): {first}") from None
    proto = program.model_proto
    _check_export(proto, opset)
    return proto


def _check_export(proto: onnx.ModelProto, opset: int) -> None:
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(f"asked torch.onnx.export for opset {opset} but it wrote opset {written}")
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"the export keeps {len(external)} weights in external data; expected one self-contained file")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        raise ExportError(f"the exported input's batch dimension is fixed ({dims[0].dim_value if dims else '?'}), not dynamic")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress and warns about optional packages (torchvision); send that to the log."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if buffer.getvalue().strip():
            log.debug("torch.onnx.export said: %s", buffer.getvalue().strip())


def lowest_ir_version(proto: onnx.ModelProto) -> int:
    """The oldest IR version that carries the model's opsets and tensor types (never above its own).

    The onnx library stamps every model with its own IR version (10 since onnx 1.16), and ONNX
    Runtime refuses a newer IR version than it knows (IR 10 needs >= 1.18) whatever the opset:
    without lowering it, `--opset 17` could not reach an older runtime. Only the domains a node
    uses count; tensor types newer than bfloat16 (float8: IR 9, int4: IR 10) keep the newer IR.
    """
    used = {node.domain for node in proto.graph.node} | {""}
    imports = [o for o in proto.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    wanted = onnx.helper.find_min_ir_version_for(imports, ignore_unknown=True)
    values = list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info)
    types = {t.data_type for t in proto.graph.initializer} | {v.type.tensor_type.elem_type for v in values}
    if any(t > onnx.TensorProto.BFLOAT16 for t in types):
        wanted = max(wanted, proto.ir_version)
    return min(proto.ir_version, wanted)


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Set model-level `metadata_props` (replacing keys already present)."""
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=str(value))


def strip_node_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node records (local file paths, FX text) from a model about to ship."""
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if not p.key.startswith(_NODE_METADATA_PREFIXES)]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def save(proto: onnx.ModelProto, path: Path) -> None:
    """Write one self-contained file (never external data)."""
    onnx.save_model(proto, str(path), save_as_external_data=False)
