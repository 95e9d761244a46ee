"""Inference engines besides ONNX Runtime, and the agreement check every engine passes before it is timed.

ONNX Runtime is the default engine and the centre of the design. OpenVINO is an optional extra
(`pip install 'pipeline[openvino]'`), like the CUDA provider: where it is installed, `pipeline
bench --engine onnxruntime,openvino` times the same shipped `.onnx` files under it. Where it is
not, it is reported as not installed in one line and everything else works as before.

OpenVINO settings, chosen so that its numbers compare with ONNX Runtime's:
- one compiled model per batch size, reshaped to that static shape (OpenVINO picks kernels per shape);
- INFERENCE_PRECISION_HINT f32 (on CPUs with AMX/bf16 its default would silently compute in bf16);
  the engine `openvino-bf16` asks for bf16 by name;
- PERFORMANCE_HINT LATENCY (one stream) and INFERENCE_NUM_THREADS = the threads bench chose for
  the group, as ONNX Runtime's intra-op threads.

The agreement check (`check_agreement`): before an (engine, artifact) pair is timed, its outputs
on the run's real test images are compared with ONNX Runtime's fp32 outputs. A full-precision pair
must stay within the export's tolerance (max abs logit diff, the number `export` proved against
PyTorch); a reduced-precision pair (an int8 or fp16 file, or the bf16 engine) must agree on the
top-1 class for at least `MIN_AGREEMENT` of the images. A pair that fails is refused: recorded
with its numbers, never timed, never recommended.

Imports no torch; openvino is imported only when an OpenVINO pair is opened.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import BENCH_ENGINES
from pipeline.errors import ConfigError, DeviceError
from pipeline.timing import Slot

ONNXRUNTIME = "onnxruntime"
OPENVINO_PRECISIONS = {"openvino": "f32", "openvino-bf16": "bf16"}
ENGINES = BENCH_ENGINES
INSTALL_HINT = {"openvino": "pip install 'pipeline[openvino]'"}
MIN_AGREEMENT = 0.995
"""Top-1 agreement with ONNX Runtime fp32 a reduced-precision pair needs on the test images."""
FULL_PRECISION_KINDS = ("fp32", "file", "onnx")
CHECK_BATCH = 500
"""Images per call of the agreement check (the last chunk is padded to this static shape)."""


def engine_module(engine: str) -> str:
    """The Python module an engine needs: `openvino` for both OpenVINO precisions."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
    return "onnxruntime" if engine == ONNXRUNTIME else "openvino"


def available(engine: str) -> tuple[bool, str]:
    """(installed, reason): whether the engine's module imports here, and if not, the one line that says so."""
    module = engine_module(engine)
    try:
        importlib.import_module(module)
    except ImportError as exc:
        hint = INSTALL_HINT.get(module, f"pip install {module}")
        return False, f"{engine}: not installed ({module} does not import: {exc.msg or exc}); `{hint}` adds it"
    return True, ""


def version(engine: str) -> str | None:
    ok, _ = available(engine)
    if not ok:
        return None
    module = importlib.import_module(engine_module(engine))
    if hasattr(module, "get_version"):
        return str(module.get_version())
    return getattr(module, "__version__", None)


# --- OpenVINO ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenVinoTarget:
    """A shipped ONNX file (or an OpenVINO IR .xml) run by OpenVINO's CPU plugin."""

    name: str
    path: Path
    kind: str = "onnx"
    sha256: str | None = None
    input_shape: tuple[int, ...] = ()
    engine: str = "openvino"

    @property
    def precision(self) -> str:
        return OPENVINO_PRECISIONS[self.engine]

    @property
    def full_precision(self) -> bool:
        return self.precision == "f32" and self.kind in FULL_PRECISION_KINDS

    def describe(self) -> dict:
        return {"artifact": self.name, "kind": self.kind, "engine": self.engine, "file": str(self.path),
                "sha256": self.sha256, "runtime": {"INFERENCE_PRECISION_HINT": self.precision,
                                                   "PERFORMANCE_HINT": "LATENCY"}}

    def compile(self, batch: int, threads: int | None):
        """(compiled model, seconds to compile) for the static shape (batch, *input_shape)."""
        ok, reason = available(self.engine)
        if not ok:
            raise DeviceError(reason)
        import openvino as ov

        started = time.perf_counter()
        core = ov.Core()
        model = core.read_model(str(self.path))
        model.reshape({model.input(0).get_any_name(): [batch, *self.input_shape]})
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self.precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = core.compile_model(model, "CPU", config)
        return compiled, time.perf_counter() - started

    def open(self, provider: str, batch: int, threads: int, config, x: np.ndarray) -> Slot:
        if provider != "cpu":
            raise DeviceError(f"{self.engine} runs on the CPU plugin here; provider {provider} is not one of its devices")
        import openvino as ov

        compiled, create_s = self.compile(batch, threads)
        request = compiled.create_infer_request()
        x = np.ascontiguousarray(x, dtype=np.float32)
        request.set_input_tensor(ov.Tensor(x, shared_memory=True))  # bound once, as ORT's feed is built once

        def run():
            request.infer()

        started = time.perf_counter()
        run()
        first_ms = 1e3 * (time.perf_counter() - started)
        info = {"session_providers": [f"openvino CPU ({compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()})"],
                "session_create_ms": 1e3 * create_s, "first_run_ms": first_ms, "optimization_level": "openvino",
                "io_binding": True, "input_dtype": "float32",
                "openvino": {"inference_num_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
                             "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
                             "precision_hint": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                             "version": version(self.engine)}}
        return Slot(run=run, info=info)

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """First output over `x`, in static chunks of `CHECK_BATCH` (the last one padded)."""
        chunk = min(CHECK_BATCH, len(x))
        compiled, _ = self.compile(chunk, None)
        request = compiled.create_infer_request()
        parts = []
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk]
            padded = np.zeros((chunk, *x.shape[1:]), np.float32)
            padded[:len(part)] = part
            request.infer({0: padded})
            parts.append(np.array(request.get_output_tensor(0).data[:len(part)]))
        return np.concatenate(parts)


# --- the agreement check ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """The run's real test images and ONNX Runtime's fp32 outputs on them: what every engine must agree with."""

    images: np.ndarray
    logits: np.ndarray
    tolerance: float
    """Max abs logit diff allowed to a full-precision pair: the export's tolerance from the manifest."""
    source: str


def reference_for_run(run_dir: Path, limit: int | None = None) -> Reference:
    """Test images of the run (its recorded data, preprocessed as its manifest says) and ORT fp32 logits on them."""
    from pipeline import artifacts, data, runtime
    from pipeline.config import DataConfig

    run_dir = Path(run_dir)
    manifest = artifacts.read_manifest(run_dir)
    fp32 = manifest["artifacts"]["fp32"]
    splits = data.load_trained_on(DataConfig.from_dict(manifest["dataset"]["config"]),
                                  manifest["dataset"].get("fingerprint"), str(run_dir))
    images = data.Preprocess.from_dict(manifest["preprocess"]).apply(splits.x_test)
    if limit:
        images = images[:limit]
    session = runtime.create_session(run_dir / fp32["file"], fp32.get("runtime") or {})
    logits = runtime.run_batched(session, images)
    tolerance = float((fp32.get("verification") or {}).get("tolerance") or manifest["export"]["config"]["tolerance"])
    return Reference(images, logits, tolerance, f"{run_dir}: {len(images)} test images, ONNX Runtime fp32")


def full_precision(target) -> bool:
    """Whether a pair must match fp32 to the export tolerance (else: top-1 agreement)."""
    explicit = getattr(target, "full_precision", None)
    return bool(explicit) if explicit is not None else target.kind in FULL_PRECISION_KINDS


def checked(target, reference: Reference) -> dict:
    """`check_agreement`, with a pair the engine cannot load or run recorded as failed (with the reason), not raised."""
    from pipeline.errors import PipelineError

    try:
        return check_agreement(target, reference)
    except (PipelineError, RuntimeError, ValueError) as exc:
        return {"passed": False, "check": "run", "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}


def check_agreement(target, reference: Reference, outputs: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """{"passed", "check", numbers...}: the pair's outputs on the reference images against ORT fp32."""
    started = time.perf_counter()
    logits = np.asarray((outputs or target.outputs)(reference.images), dtype=np.float64)
    if logits.shape != reference.logits.shape:
        return {"passed": False, "check": "shape", "shape": list(logits.shape),
                "expected_shape": list(reference.logits.shape), "images": int(len(reference.images)),
                "reason": f"output shape {logits.shape} differs from ONNX Runtime fp32's {reference.logits.shape}"}
    agreement = float(np.mean(logits.argmax(1) == reference.logits.argmax(1)))
    max_abs = float(np.max(np.abs(logits - reference.logits))) if logits.size else 0.0
    record = {"images": int(len(reference.images)), "top1_agreement": agreement, "max_abs_diff": max_abs,
              "seconds": round(time.perf_counter() - started, 3), "reference": reference.source}
    if full_precision(target):
        passed = max_abs <= reference.tolerance
        record.update(check="max_abs_diff", tolerance=reference.tolerance, passed=passed)
        if not passed:
            record["reason"] = (f"max abs logit diff {max_abs:.3g} vs ONNX Runtime fp32 exceeds the export tolerance "
                                f"{reference.tolerance:g} (top-1 agreement {100 * agreement:.2f}%)")
    else:
        passed = agreement >= MIN_AGREEMENT
        record.update(check="top1_agreement", min_agreement=MIN_AGREEMENT, passed=passed)
        if not passed:
            record["reason"] = (f"top-1 agreement with ONNX Runtime fp32 {100 * agreement:.2f}% < {100 * MIN_AGREEMENT:.1f}% "
                                f"on {len(reference.images)} test images (max abs logit diff {max_abs:.3g})")
    return record


# --- an ONNX Runtime-shaped session for readers (predict) ----------------------------------------


@dataclass(frozen=True)
class _Port:
    name: str
    shape: list


class OpenVinoSession:
    """The part of `onnxruntime.InferenceSession` that `predict` uses (get_inputs/get_outputs/get_providers/run),
    over an OpenVINO model compiled with the same hints as bench (f32 precision, LATENCY, threads)."""

    def __init__(self, model: bytes | Path, threads: int | None = None, engine: str = "openvino") -> None:
        ok, reason = available(engine)
        if not ok:
            raise DeviceError(reason)
        import openvino as ov

        core = ov.Core()
        source = model if isinstance(model, bytes) else str(model)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[engine]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled = core.compile_model(core.read_model(source), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._precision = OPENVINO_PRECISIONS[engine]

    @staticmethod
    def _ports(ports) -> list[_Port]:
        return [_Port(p.get_any_name(), [d.get_length() if d.is_static else "batch" for d in p.get_partial_shape()])
                for p in ports]

    def get_inputs(self) -> list[_Port]:
        return self._ports(self._compiled.inputs)

    def get_outputs(self) -> list[_Port]:
        return self._ports(self._compiled.outputs)

    def get_providers(self) -> list[str]:
        return [f"OpenVINO CPU ({self._precision})"]

    def run(self, output_names, feed: dict) -> list[np.ndarray]:
        results = self._request.infer({0: np.ascontiguousarray(next(iter(feed.values())), dtype=np.float32)})
        outputs = [np.array(results[port]) for port in self._compiled.outputs]
        if output_names:
            names = [p.get_any_name() for p in self._compiled.outputs]
            return [outputs[names.index(name)] for name in output_names]
        return outputs
