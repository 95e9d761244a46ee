"""GPU check for `pipeline bench`: does the CUDA path really run on CUDA, and how fast is it?

On a machine with an NVIDIA GPU, in an environment with torch (CUDA build) and onnxruntime-gpu:
1. trains the dropout CNN on `cuda` for a few epochs (digits, bundled: no download);
2. exports it to one self-contained ONNX file (eval mode: no Dropout in the graph);
3. times the CUDA provider against the CPU provider with `pipeline.bench`, IO binding on the device
   (input and output OrtValues on the GPU, `synchronize_outputs` before the clock stops) and
   without it (numpy in, numpy out: copies included), and the PyTorch eager baseline on cuda;
4. proves where the kernels ran: `session.get_providers()` AND a profiled run whose node events
   name the provider that executed each node (a CUDA session can still place nodes on the CPU).

Without a GPU, a CUDA torch build or onnxruntime-gpu it prints `SKIP: <reason>` and exits 0.
Exit 1 when the CUDA session did not really run its nodes on CUDA.

onnxruntime-gpu cannot share an environment with onnxruntime (both install the `onnxruntime`
module; with both present one silently shadows the other), so use a separate venv. The wheel is
~255 MB; torch from PyPI on Linux x86_64 is a CUDA build. onnxruntime-gpu's newest release can lag
onnxruntime's (1.31.1 vs 1.32.0 on this project's index when this was written), so it is not pinned:

    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install --no-deps -e .
    .venv-gpu/bin/pip install torch onnx onnxscript onnxsim typer rich numpy pillow matplotlib scikit-learn onnxruntime-gpu
    .venv-gpu/bin/python tools/cuda_check.py            # --json adds the full bench records

It takes about a minute on one GPU (3 epochs on digits, then ~20 one-second measurements).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def skip_reason() -> str | None:
    """Why this machine cannot run the check, or None."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime is not importable ({exc})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu in a separate venv "
                "(see this file's docstring)")
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable ({exc})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    return None


def train_on_cuda(out: Path, epochs: int) -> dict:
    from pipeline.config import DataConfig, ModelConfig, TrainConfig
    from pipeline.workflow import train_run

    started = time.perf_counter()
    result = train_run(DataConfig(), ModelConfig(), TrainConfig(epochs=epochs, device="cuda", patience=0), out)
    return {"device": result.metrics["device"], "test_accuracy": result.metrics["test_accuracy"],
            "seconds_per_epoch": result.metrics["seconds_per_epoch"], "wall_seconds": time.perf_counter() - started}


def export_fp32(run_dir: Path) -> Path:
    """Export with the export stage when it exists, else directly (same settings: eval, dynamic batch, one file)."""
    import onnx
    import torch

    from pipeline import artifacts
    from pipeline.train import load_checkpoint

    model, _ = load_checkpoint(run_dir / artifacts.CHECKPOINT)
    config = model.config
    path = run_dir / "model.onnx"
    try:
        from pipeline.export import export_module, save

        save(export_module(model, (config.in_channels, config.height, config.width), 18), path)
    except ImportError:
        program = torch.onnx.export(model, (torch.zeros(2, config.in_channels, config.height, config.width),),
                                    dynamo=True, input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False)
        onnx.save_model(program.model_proto, str(path))

    def record(manifest: dict) -> None:
        manifest["artifacts"].setdefault("fp32", {"file": path.name, "kind": "fp32", "parent": None,
                                                  "runtime": dict(artifacts.DEFAULT_RUNTIME)})
        manifest["artifacts"]["fp32"].update(sha256=artifacts.sha256_file(path), bytes=path.stat().st_size)

    artifacts.update_manifest(run_dir, record)
    return path


def nodes_by_provider(path: Path, batch: int) -> dict[str, int]:
    """Run once with ORT's profiler on; count the executed nodes per provider named in the profile."""
    import numpy as np
    import onnxruntime as ort

    from pipeline import artifacts, runtime

    options = runtime.session_options(artifacts.DEFAULT_RUNTIME)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "cuda_check")
        session = ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        shape = [batch, *session.get_inputs()[0].shape[1:]]
        session.run(None, {session.get_inputs()[0].name: np.zeros(shape, dtype=np.float32)})
        events = json.loads(Path(session.end_profiling()).read_text())
    counts: dict[str, int] = {}
    for event in events:
        provider = event.get("args", {}).get("provider")
        if event.get("cat") == "Node" and provider and event.get("name", "").endswith("_kernel_time"):
            counts[provider] = counts.get(provider, 0) + 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,256,4096")
    parser.add_argument("--json", action="store_true", help="print the bench records as JSON")
    args = parser.parse_args()
    reason = skip_reason()
    if reason:
        print(f"SKIP: {reason}")
        return 0

    import dataclasses

    import torch

    from pipeline import bench
    from pipeline.baseline import TorchTarget
    from pipeline.config import BenchConfig

    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "digits"
        training = train_on_cuda(run_dir, args.epochs)
        print(f"trained on {training['device']}: {training['seconds_per_epoch']:.2f} s/epoch, "
              f"test accuracy {100 * training['test_accuracy']:.1f}%")
        path = export_fp32(run_dir)
        targets = bench.run_targets(run_dir, ["fp32"]) + [TorchTarget(run_dir / "checkpoint.pt")]
        batches = tuple(int(b) for b in args.batch_sizes.split(","))
        config = BenchConfig(providers=("cuda", "cpu"), batch_sizes=batches, duration=1.0, rounds=3, io_binding=True)
        bound = bench.benchmark(targets, config)
        copied = bench.benchmark(targets[:1], dataclasses.replace(config, providers=("cuda",), io_binding=False))
        placement = nodes_by_provider(path, batches[0])

    records = bound.records + copied.records
    print(f"{'engine':12} {'provider':8} {'iobind':6} {'batch':>6} {'threads':>7} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'images/s':>12}  session providers")
    for r in records:
        if r["status"] != "ok":
            print(f"{r['engine']:12} {r['provider']:8} {r['batch']:>6}  {r['status']}: {r['reason']}")
            continue
        print(f"{r['engine']:12} {r['provider']:8} {str(r['io_binding']):6} {r['batch']:>6} {r['threads']:>7} "
              f"{r['latency_ms']['p50']:9.4f} {r['latency_ms']['p99']:9.4f} {r['throughput_ips']:12,.0f}  "
              f"{','.join(r['session_providers'])}")
    p50 = {(r["provider"], r["batch"], r["io_binding"]): r["latency_ms"]["p50"]
           for r in records if r["status"] == "ok" and r["engine"] == "onnxruntime"}
    for batch in batches:
        if ("cuda", batch, True) in p50 and ("cpu", batch, True) in p50:
            speedup = p50[("cpu", batch, True)] / p50[("cuda", batch, True)]
            print(f"batch {batch}: CUDA is {speedup:.2f}x the CPU provider's speed (p50, IO binding)")
    cuda_records = [r for r in records if r["provider"] == "cuda" and r["engine"] == "onnxruntime"]
    on_cuda = bool(cuda_records) and all(r["status"] == "ok" and r["session_providers"][0] == "CUDAExecutionProvider"
                                         for r in cuda_records)
    print(f"nodes executed per provider (profiled run): {placement}")
    really = on_cuda and placement.get("CUDAExecutionProvider", 0) > 0
    print(f"session really ran on CUDA: {'YES' if really else 'NO'} "
          f"(get_providers()[0] is CUDA: {on_cuda}; CUDA nodes in profile: {placement.get('CUDAExecutionProvider', 0)})")
    if args.json:
        print(json.dumps({"training": training, "records": records, "placement": placement,
                          "environment": bound.environment}, indent=2))
    return 0 if really else 1


if __name__ == "__main__":
    sys.exit(main())
