"""The PyTorch eager baseline for `bench`: the trained model in eval() under inference_mode.

It is a bench target like `bench.OnnxTarget` (same `open` -> `Slot`), so it is timed in the same
interleaved rounds, on the same inputs and with the same thread count as the ONNX artifacts, and
`bench` can report the ONNX Runtime / PyTorch ratio. Kept apart from `bench.py` so that module
never imports torch (the device side runs ONNX Runtime only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import artifacts
from pipeline.config import BenchConfig
from pipeline.errors import DeviceError
from pipeline.train import load_checkpoint


@dataclass
class TorchTarget:
    """A checkpoint, timed as PyTorch eager on the CPU (or CUDA when torch has it)."""

    checkpoint: Path
    name: str = "torch"
    kind: str = "eager"
    engine: str = "torch"
    model: torch.nn.Module = field(init=False, repr=False)
    input_shape: tuple[int, ...] = field(init=False)
    load_ms: float = field(init=False)

    def __post_init__(self) -> None:
        started = time.perf_counter()
        self.model, _ = load_checkpoint(self.checkpoint)  # in eval(): dropout is the identity
        self.load_ms = 1e3 * (time.perf_counter() - started)
        config = self.model.config
        self.input_shape = (config.in_channels, config.height, config.width)

    def describe(self) -> dict:
        return {"artifact": self.name, "kind": self.kind, "engine": self.engine, "file": str(self.checkpoint),
                "sha256": artifacts.sha256_file(self.checkpoint), "runtime": {"mode": "eval", "inference_mode": True}}

    def open(self, provider: str, batch: int, threads: int, config: BenchConfig, x: np.ndarray):
        from pipeline.timing import Slot

        if provider == "cpu":
            device = torch.device("cpu")
        elif provider == "cuda" and torch.cuda.is_available():
            device = torch.device("cuda")
        else:
            raise DeviceError(f"PyTorch baseline on {provider!r}: this torch build has no such device "
                              f"(torch {torch.__version__}, cuda available: {torch.cuda.is_available()})")
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)  # global in torch; ORT sessions have their own pools, unaffected
        model = self.model.to(device).eval()
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def run():
            with torch.inference_mode():
                out = model(xt)
            sync()  # CUDA launches are asynchronous: stop the clock when the work is done
            return out

        started = time.perf_counter()
        run()
        first_ms = 1e3 * (time.perf_counter() - started)
        info = {"session_providers": [f"torch:{device.type}"], "session_create_ms": self.load_ms, "first_run_ms": first_ms,
                "optimization_level": None, "disabled_optimizers": [], "io_binding": False, "input_dtype": "float32",
                "torch_threads": torch.get_num_threads()}
        return Slot(run=run, info=info, close=lambda: torch.set_num_threads(previous_threads))


def run_baseline(run_dir: Path) -> TorchTarget | None:
    """The baseline of a run folder, or None when it has no checkpoint."""
    training = artifacts.load_manifest(run_dir).training
    checkpoint = Path(run_dir) / (training.checkpoint if training else artifacts.CHECKPOINT)
    return TorchTarget(checkpoint) if checkpoint.is_file() else None
