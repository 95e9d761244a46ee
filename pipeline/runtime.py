"""ONNX Runtime sessions built from the manifest's `runtime` settings. Imports no torch.

An artifact record in the manifest may carry `runtime`, e.g.
    {"graph_optimization_level": "all", "disabled_optimizers": ["QDQPropagationTransformer"]}
and every consumer (export's checks, bench, predict, the device runner) must apply it, or
the model does not run as it was measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.errors import ConfigError, DeviceError
from pipeline.timing import Slot

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def session_options(runtime: dict | None = None, threads: int | None = None, level: str | None = None) -> ort.SessionOptions:
    runtime = runtime or {}
    options = ort.SessionOptions()
    level = level or runtime.get("graph_optimization_level", "all")
    if level not in LEVELS:
        raise ConfigError(f"unknown graph optimization level {level!r}: choose one of {', '.join(LEVELS)}")
    options.graph_optimization_level = LEVELS[level]
    threads = threads if threads is not None else runtime.get("intra_op_num_threads")
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: warnings go to stderr as noise for users
    return options


def provider_available(provider: str) -> tuple[bool, str]:
    """(available, reason) for a short provider name (cpu, cuda, tensorrt)."""
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name in available:
        return True, ""
    return False, f"{name} is not in this onnxruntime build ({ort.__version__}: {', '.join(available)})"


def create_session(path: Path | bytes, runtime: dict | None = None, provider: str = "cpu",
                   threads: int | None = None, level: str | None = None) -> ort.InferenceSession:
    """A session on exactly the requested provider; `DeviceError` if it would silently fall back to the CPU."""
    ok, reason = provider_available(provider)
    if not ok:
        raise DeviceError(reason)
    options = session_options(runtime, threads, level)
    disabled = list((runtime or {}).get("disabled_optimizers", []))
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    source = str(path) if isinstance(path, Path) else path
    session = ort.InferenceSession(source, options, providers=providers, disabled_optimizers=disabled)
    if session.get_providers()[0] != PROVIDERS[provider]:
        raise DeviceError(f"asked for {PROVIDERS[provider]} but the session runs on {session.get_providers()}")
    return session


def run_batched(session: ort.InferenceSession, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """First output of the model over `x` in batches."""
    name = session.get_inputs()[0].name
    outputs: Sequence[np.ndarray] = [session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outputs)


def session_slot(session: ort.InferenceSession, x: np.ndarray, **info) -> Slot:
    """A `timing.Slot` whose one timed call is `session.run` on `x` (the feed built once, outside the clock)."""
    feed = {session.get_inputs()[0].name: x}

    def run():
        return session.run(None, feed)

    return Slot(run=run, info={"session_providers": session.get_providers(), **info})
