"""Layout rewrites of the int8 file (issue 16): OpenVINO and ONNX Runtime, interleaved, with OpenVINO's per-layer time.

python tools/perf_lab/exp_layout.py models/mnist [--rounds 15]

Builds from the run's fp32 `model.onnx`, with the pipeline's own quantizer and the run's calibration draw:
- `float-gemm-outputs`: the recipe the AMX host shipped before the layout recipes (the baseline);
- `nhwc-flatten`, `nhwc-signed-input`, `space-to-depth`: the pipeline's layout recipes (`pipeline/layout.py`).
  On the AMX host space-to-depth made OpenVINO's first Conv 2x faster, but its SpaceToDepth ran in fp32 and
  the Pad and Reorders it brought cost about as much; ONNX Runtime gained 1.38x at batch 256;
- NNCF's int8 IR (when NNCF is installed), the best peer of `make bench`.
Prints each file's paired per-round speed-up over the baseline per engine and batch size (1 at 1 thread,
256 at 2), then OpenVINO's per-layer counters at batch 256 (where the NCHW Reorder before the flatten shows).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))
sys.path.insert(0, str(Path(__file__).parents[1]))
import bench_peers  # noqa: E402
import numpy as np  # noqa: E402
from bench import RunModels  # noqa: E402

from pipeline import engines, quantize  # noqa: E402
from pipeline.bench import OnnxTarget  # noqa: E402
from pipeline.config import BenchConfig, QuantizeConfig  # noqa: E402
from pipeline.timing import SETTLE_SECONDS, TimingPlan, round_medians, time_interleaved  # noqa: E402

BATCHES = ((1, 1), (256, 2))


def build(run: RunModels, work: Path, calibration: np.ndarray) -> dict[str, Path]:
    """The recipes' int8 files, built as the export builds them, and NNCF's IR as `make bench` builds it."""
    files = {}
    fp32 = run.path("fp32")
    for name in ("float-gemm-outputs", "nhwc-flatten", "nhwc-signed-input", "space-to-depth"):
        config = quantize.recipe_config(QuantizeConfig(), name)
        prepared = quantize.prepare(fp32, work / f"{name}.prepared.onnx", config.pre_process)
        quantize.rewrite_layout(prepared, config)
        files[name] = quantize.quantize_model(prepared, work / f"{name}.int8.onnx", config, calibration, ())
    nncf = bench_peers._openvino_peers(fp32, calibration, work, run.sample_shape()).get(bench_peers.PEERS[3])
    if nncf is not None:
        files["NNCF int8"] = nncf.path
    return files


def layer_times(path: Path, shape: tuple[int, ...]) -> list[tuple[float, str, str]]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.input(0).get_any_name(): [256, *shape]})
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                                                 "INFERENCE_NUM_THREADS": 2, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    x = np.zeros((256, *shape), np.float32)
    for _ in range(30):
        request.infer({0: x})
    return sorted(((p.real_time.total_seconds() * 1e6, p.node_type, p.exec_type) for p in request.profiling_info
                   if p.status == p.Status.EXECUTED), reverse=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    run = RunModels(a.run)
    peer_data = run.peer_data()  # the int8 record's calibration draw; the test images only feed the timing
    x_test, shape = peer_data["x_test"], run.sample_shape()
    with_openvino = engines.available("openvino")[0]
    with tempfile.TemporaryDirectory(prefix="exp-layout-") as tmp:
        files = build(run, Path(tmp), peer_data["calibration"])
        plan = TimingPlan(warmup=10, warmup_seconds=0.3, duration=0.12, rounds=a.rounds, time_limit=600,
                          settle_seconds=SETTLE_SECONDS)
        for batch, threads in BATCHES:
            x = np.ascontiguousarray(np.resize(x_test, (batch, *shape)), dtype=np.float32)
            slots = {}
            for name, path in files.items():
                if with_openvino:
                    slots[f"{name} (OpenVINO)"] = engines.OpenVinoTarget(name=name, path=path, kind="int8", input_shape=shape
                                                                         ).open("cpu", batch, threads, BenchConfig(), x)
                if path.suffix == ".onnx":
                    slots[f"{name} (ORT)"] = OnnxTarget(name=name, path=path, kind="int8", input_shape=shape
                                                        ).open("cpu", batch, threads, BenchConfig(), x)
            time_interleaved(list(slots.values()), plan)
            rounds = {name: np.asarray(round_medians(slot)) for name, slot in slots.items()}
            for engine in ("OpenVINO", "ORT"):
                base = rounds.get(f"float-gemm-outputs ({engine})")
                for name, ms in rounds.items():
                    if base is not None and name.endswith(f"({engine})"):
                        ratio = base / ms
                        print(f"batch {batch:3d} {name:34s} p50 {1e3 * np.median(ms):8.1f} us  speed-up over float-gemm-outputs "
                              f"{np.median(ratio):.3f} (rounds {ratio.min():.2f}-{ratio.max():.2f})")
        if with_openvino:
            for name in ("float-gemm-outputs", "nhwc-signed-input", "space-to-depth"):
                print(f"\n{name}, OpenVINO per-layer time at batch 256 (us):")
                for us, kind, kernel in layer_times(files[name], shape)[:9]:
                    print(f"  {us:7.0f}  {kind:30s} {kernel}")


if __name__ == "__main__":
    main()
