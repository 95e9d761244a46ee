"""onnxsim, with its own check consumed, never ignored.

`onnxsim.simplify` returns `(model, check_ok)`; with `check_n=0` (its default) it checks nothing
and says True, so at least one random-input check is always asked for. A missing onnxsim, an
exception inside it, or a failed check is a `SimplifyError`: the export stops, unless the user
asked to skip simplification (then nothing here runs).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import onnx

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class SimplifyError(PipelineError):
    """onnxsim is missing, failed, or its own check says the simplified model differs."""

    exit_code = 10


@dataclass(frozen=True)
class SimplifyReport:
    nodes_before: int
    nodes_after: int
    check_n: int
    check_passed: bool
    onnxsim_version: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def simplify_model(model: onnx.ModelProto, check_n: int = 3, batch: int = 2) -> tuple[onnx.ModelProto, SimplifyReport]:
    """The onnxsim-simplified model and a report; `SimplifyError` unless onnxsim's check passed.

    The check runs with `batch` images (the input's dynamic batch dimension set to it), so it
    exercises a batch larger than 1.
    """
    if check_n < 1:
        raise ValueError(f"check_n must be >= 1 (onnxsim checks nothing with 0), got {check_n}")
    try:
        import onnxsim
    except ImportError as exc:
        raise SimplifyError(f"onnxsim is not installed ({exc}): install it, or pass --skip-simplify "
                            "to ship the unsimplified export") from None
    shapes = _test_shapes(model, batch)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):  # onnxsim prints its check progress
            simplified, check_ok = onnxsim.simplify(model, check_n=check_n, test_input_shapes=shapes)
    except Exception as exc:  # onnxsim raises RuntimeError, onnx errors, ORT errors
        first = " ".join(str(exc).split())[:300]
        raise SimplifyError(f"onnxsim failed ({type(exc).__name__}): {first}; pass --skip-simplify to ship the "
                            "unsimplified export") from None
    log.debug("onnxsim said: %s", output.getvalue().strip())
    if not check_ok:
        said = " ".join(line for line in output.getvalue().splitlines() if "diff" in line.lower())[:300]
        raise SimplifyError(f"onnxsim's own check failed: the simplified model's outputs differ from the original "
                            f"({said or 'no detail'}); pass --skip-simplify to ship the unsimplified export")
    report = SimplifyReport(len(model.graph.node), len(simplified.graph.node), check_n, bool(check_ok),
                            getattr(onnxsim, "__version__", "unknown"))
    return simplified, report


def _test_shapes(model: onnx.ModelProto, batch: int) -> dict[str, list[int]] | None:
    """Concrete shapes for onnxsim's check, dynamic dimensions set to `batch` (onnxsim would use 1); None without inputs."""
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in dims]
        shapes[value.name] = shape
    return shapes or None
