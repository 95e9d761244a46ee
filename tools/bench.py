"""`make bench`: the performance numbers of issue 9, measured in one run on this host, as ratios.

A separate client: it reads only each run folder's manifest.json and the files it names (ONNX
files checked against their recorded sha256, the checkpoint for the PyTorch baseline, the data
the manifest records for accuracy), and opens every ONNX file with the artifact's own `runtime`
settings through `pipeline.runtime.create_session`, as a device would.

Measured, interleaved (A, B, A, B ... per round; medians and ratios; every phase bounded in time):
- ONNX Runtime fp32 vs PyTorch eager at batch 1 (1 thread) and batch 256 (2 threads);
- int8 vs fp32 at batch 1 and 256, for the default architecture (32/64) and a wide one (64/128);
- the CNN's GFLOP/s (fp32) and GOP/s (int8) against large fp32 MatMul / int8 MatMulInteger and
  QLinearMatMul graphs in ONNX Runtime on this host (the peaks);
- batch-1 p50 against an empty `session.run` (an Identity graph of the same input: the floor),
  and batch 1 at 1 vs 2 threads;
- training throughput (images/s, seconds per epoch) at 1 and 2 torch threads, and as recorded by train.

Missing run folders are made with the pipeline's own commands (`pipeline train`, `pipeline export
--quantize`). Writes <out>/bench.json and <out>/bench.md (default models/bench/).

    python tools/bench.py [--quick] [--budget 420] [--out models/bench] [--no-prepare]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402

from pipeline import artifacts, runtime  # noqa: E402
from pipeline.timing import Slot, TimingPlan, summarize, time_interleaved  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist-test"
RUNS = {"default": ("models/mnist", "32,64"), "wide": ("models/mnist-64-128", "64,128")}
BIG_BATCH = 256
# Acceptance of issue 9 (name -> (measured key, comparison, target)).
TARGETS = {
    "recommended deployment vs best peer, batch 1 (peer p50 / ours)": (">=", 1.0),
    "recommended deployment vs best peer, batch 256 (peer p50 / ours)": (">=", 1.0),
    "deployed file / fastest int8 candidate, batch 1 (export speed check)": ("<=", 1.03),
    "deployed file / fastest int8 candidate, batch 256 (export speed check)": ("<=", 1.03),
    "default int8/fp32 throughput, batch 256": (">=", 1.5),
    "default int8 p50 / fp32 p50, batch 1": ("<=", 1.0),
    "default accuracy drop (points)": ("<=", 0.5),
    "wide int8/fp32 throughput, batch 256": (">=", 2.5),
    "fp32 batch-1 p50 / empty-run floor": ("<=", 4.0),
    "ORT fp32 / torch eager speed, batch 1": (">=", 5.0),
}


# --- the manifest client ---------------------------------------------------------------------


class RunModels:
    """One run folder as a device sees it: manifest records, files checked against their sha256."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.manifest = json.loads((self.run_dir / artifacts.MANIFEST).read_text())
        self.records = self.manifest.get("artifacts") or {}

    def path(self, variant: str) -> Path:
        record = self.records[variant]
        path = self.run_dir / record["file"]
        digest = artifacts.sha256_file(path)
        if digest != record["sha256"]:
            raise SystemExit(f"{path}: sha256 {digest[:12]} differs from the manifest's {record['sha256'][:12]}")
        return path

    def runtime(self, variant: str) -> dict:
        return dict(self.records[variant].get("runtime") or {})

    def session(self, variant: str, threads: int):
        return runtime.create_session(self.path(variant), self.runtime(variant), threads=threads)

    def sample_shape(self) -> tuple[int, int, int]:
        pre = self.manifest["preprocess"]
        return (int(pre["channels"]), int(pre["size"][0]), int(pre["size"][1]))

    def test_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The run's own test split (its recorded data config), preprocessed as the manifest says."""
        from pipeline import data
        from pipeline.config import DataConfig

        splits = data.load(DataConfig.from_dict(self.manifest["dataset"]["config"]))
        pre = data.Preprocess.from_dict(self.manifest["preprocess"])
        return pre.apply(splits.x_test), splits.y_test

    def peer_data(self) -> dict:
        """Test split and the calibration images the run's int8 was made from (its recorded seed and count)."""
        from pipeline import data, quantize
        from pipeline.config import DataConfig

        splits = data.load(DataConfig.from_dict(self.manifest["dataset"]["config"]))
        pre = data.Preprocess.from_dict(self.manifest["preprocess"])
        recipe = self.records["int8"]["quantization"]
        calibration = quantize.sample_images(pre.apply(splits.x_train), int(recipe["calibration_images"]), int(recipe["seed"]))
        return {"x_test": pre.apply(splits.x_test), "y_test": splits.y_test, "calibration": calibration,
                "calibration_source": f"training split, {len(calibration)} images, seed {recipe['seed']} "
                                      "(the draw the run's int8 was calibrated on)"}

    def torch_model(self):
        from pipeline.train import load_checkpoint

        model, _ = load_checkpoint(self.run_dir / self.manifest["training"]["checkpoint"])
        return model


# --- preparing the runs with the pipeline's own commands ---------------------------------------


def prepare(run_dir: Path, conv_channels: str, data_dir: Path, epochs: int | None, threads: int | None,
            log: list[str]) -> None:
    """Train and export --quantize with the pipeline's CLI when the run folder lacks them."""
    pipeline = [sys.executable, "-m", "pipeline"]
    if not (run_dir / artifacts.MANIFEST).is_file():
        cmd = [*pipeline, "train", "--dataset", "idx", "--data-dir", str(data_dir), "--out", str(run_dir),
               "--conv-channels", conv_channels, "--quiet"]
        if epochs:
            cmd += ["--epochs", str(epochs)]
        if threads:
            cmd += ["--threads", str(threads)]
        _call(cmd, log)
    records = RunModels(run_dir).records
    if "fp32" not in records or "int8" not in records:
        _call([*pipeline, "export", "--run", str(run_dir), "--quantize"], log)


def _call(cmd: list[str], log: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    log.append(" ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)


# --- timing ---------------------------------------------------------------------------------


def interleaved(cases: dict[str, Callable[[], object]], seconds: float, rounds: int) -> dict[str, Slot]:
    """Every case timed through the one harness (`pipeline.timing.time_interleaved`), in one call.

    Each case gets `seconds / len(cases)` of timed runs split into `rounds` rounds that alternate
    the cases (order reversed on odd rounds), so one load spike from a neighbour hits all alike.
    """
    slots = {name: Slot(run=fn) for name, fn in cases.items()}
    per_case = seconds / max(len(cases), 1)
    time_interleaved(list(slots.values()), TimingPlan(warmup=3, warmup_seconds=max(per_case / 4, 0.05), duration=per_case,
                                                       rounds=rounds, time_limit=max(2 * per_case, 1.0)))
    return slots


def p50(slot: Slot) -> float:
    """Median seconds of one timed call."""
    return float(np.median(slot.latencies_ns)) / 1e9


def summary(slot: Slot, batch: int) -> dict:
    stats = summarize(slot.latencies_ns, batch)["latency_ms"]
    return {"batch": batch, "calls": len(slot.latencies_ns), "p50_ms": stats["p50"], "p90_ms": stats["p90"],
            "min_ms": stats["min"], "images_per_s": batch / (stats["p50"] / 1e3)}


def torch_runner(model, x: np.ndarray, threads: int) -> Callable[[], object]:
    import torch

    t = torch.from_numpy(x)

    def run():
        if torch.get_num_threads() != threads:  # a switch rebuilds torch's pool: only between groups, never per call
            torch.set_num_threads(threads)
        with torch.inference_mode():
            return model(t)

    return run


def ort_runner(session, x: np.ndarray) -> Callable[[], object]:
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


# --- graphs for the peaks and the floor ----------------------------------------------------------


def _model(nodes, inputs, outputs, inits) -> bytes:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m.SerializeToString()


def identity_graph(shape: tuple[int, ...]) -> bytes:
    """An empty model: what `session.run` costs with nothing to compute (the batch-1 floor)."""
    vi = helper.make_tensor_value_info
    return _model([helper.make_node("Identity", ["input"], ["output"])], [vi("input", TensorProto.FLOAT, ["batch", *shape])],
                  [vi("output", TensorProto.FLOAT, ["batch", *shape])], [])


def gemm_graphs(m: int, k: int, n: int) -> dict[str, tuple[bytes, np.ndarray]]:
    """Large fp32 MatMul and U8S8 int8 MatMulInteger / QLinearMatMul graphs (weights constant), with inputs."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    w8 = numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "W")
    u8 = rng.integers(0, 256, (m, k)).astype(np.uint8)
    scalar = {"f": lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name),
              "u8": lambda name, v: numpy_helper.from_array(np.array(v, np.uint8), name),
              "s8": lambda name, v: numpy_helper.from_array(np.array(v, np.int8), name)}
    return {
        "fp32 MatMul": (_model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [vi("A", TensorProto.FLOAT, ["m", k])],
                               [vi("Y", TensorProto.FLOAT, ["m", n])],
                               [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")]),
                        rng.standard_normal((m, k)).astype(np.float32)),
        "int8 MatMulInteger u8s8": (_model([helper.make_node("MatMulInteger", ["A", "W", "azp", "wzp"], ["Y"])],
                                           [vi("A", TensorProto.UINT8, ["m", k])], [vi("Y", TensorProto.INT32, ["m", n])],
                                           [w8, scalar["u8"]("azp", 128), scalar["s8"]("wzp", 0)]), u8),
        "int8 QLinearMatMul u8s8": (_model([helper.make_node("QLinearMatMul", ["A", "as", "azp", "W", "ws", "wzp", "ys", "yzp"],
                                                             ["Y"])],
                                           [vi("A", TensorProto.UINT8, ["m", k])], [vi("Y", TensorProto.UINT8, ["m", n])],
                                           [w8, scalar["f"]("as", 0.02), scalar["u8"]("azp", 128), scalar["f"]("ws", 0.01),
                                            scalar["s8"]("wzp", 0), scalar["f"]("ys", 4.0), scalar["u8"]("yzp", 128)]), u8),
    }


def model_flops(path: Path) -> float:
    """Multiply-adds x 2 per image of the Conv, Gemm and MatMul nodes (from ONNX shape inference)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    inits = {i.name: i.dims for i in g.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.value_info, *g.output, *g.input]}
    flops = 0.0
    for node in g.node:
        if node.op_type == "Conv":
            cout, cin_g, kh, kw = inits[node.input[1]]
            out = shapes[node.output[0]]
            flops += 2.0 * cout * cin_g * kh * kw * out[2] * out[3]
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in inits:
            k, n = inits[node.input[1]]
            flops += 2.0 * k * n
    return flops


# --- the measurements ---------------------------------------------------------------------------


def accuracy(session, x: np.ndarray, y: np.ndarray) -> float:
    name = session.get_inputs()[0].name
    pred = np.concatenate([session.run(None, {name: x[i:i + 1000]})[0].argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).mean())


PEAK_SHAPE = (1024, 512, 512)
PEAK = "peak: "


def peak_cases(threads: int) -> dict[str, Callable[[], object]]:
    """The GEMM peak graphs as timed cases; they join each CNN group so the CNN and the peaks share its load."""
    return {PEAK + name: ort_runner(runtime.create_session(g, {}, threads=threads), x)
            for name, (g, x) in gemm_graphs(*PEAK_SHAPE).items()}


def measure_run(label: str, run: RunModels, seconds: float, rounds: int, with_torch: bool) -> dict:
    """fp32 vs int8 (and torch eager, the floor, the GEMM peaks) at batch 1 (1 thread) and 256 (2 threads)."""
    x_test, y_test = run.test_data()
    shape = run.sample_shape()
    x1, xb = x_test[:1], x_test[:BIG_BATCH]
    out: dict = {"run_dir": str(run.run_dir), "conv_channels": run.manifest["model"]["config"]["conv_channels"],
                 "recommended": run.manifest.get("recommended"),
                 "runtime": {v: run.runtime(v) for v in ("fp32", "int8")},
                 "flops_per_image": model_flops(run.path("fp32"))}
    out["accuracy"] = {}
    for variant in ("fp32", "int8"):
        measured = accuracy(run.session(variant, 2), x_test, y_test)
        out["accuracy"][variant] = {"measured": measured, "manifest": run.records[variant].get("test_accuracy")}
    out["accuracy"]["drop_points"] = 100 * (out["accuracy"]["fp32"]["measured"] - out["accuracy"]["int8"]["measured"])

    model = run.torch_model() if with_torch else None
    cases1 = {"fp32": ort_runner(run.session("fp32", 1), x1), "int8": ort_runner(run.session("int8", 1), x1)}
    if with_torch:
        floor = runtime.create_session(identity_graph(shape), {}, threads=1)
        cases1["fp32 2 threads"] = ort_runner(run.session("fp32", 2), x1)
        cases1["empty run (floor)"] = ort_runner(floor, x1)
        cases1["torch eager"] = torch_runner(model, x1, 1)
    t1 = interleaved({**cases1, **peak_cases(1)}, seconds, rounds)
    casesb = {"fp32": ort_runner(run.session("fp32", 2), xb), "int8": ort_runner(run.session("int8", 2), xb)}
    if with_torch:
        casesb["torch eager"] = torch_runner(model, xb, 2)
    tb = interleaved({**casesb, **peak_cases(2)}, seconds, rounds)
    ops = 2.0 * PEAK_SHAPE[0] * PEAK_SHAPE[1] * PEAK_SHAPE[2]
    out["peaks G(FL)OP/s"] = {"1 thread": {k[len(PEAK):]: ops / p50(v) / 1e9 for k, v in t1.items() if k.startswith(PEAK)},
                              "2 threads": {k[len(PEAK):]: ops / p50(v) / 1e9 for k, v in tb.items() if k.startswith(PEAK)}}
    out["batch1_1thread"] = {k: summary(v, 1) for k, v in t1.items() if not k.startswith(PEAK)}
    out[f"batch{BIG_BATCH}_2threads"] = {k: summary(v, BIG_BATCH) for k, v in tb.items() if not k.startswith(PEAK)}
    b1, bb = out["batch1_1thread"], out[f"batch{BIG_BATCH}_2threads"]
    ratios = {"int8/fp32 throughput, batch 256": bb["int8"]["images_per_s"] / bb["fp32"]["images_per_s"],
              "int8 p50 / fp32 p50, batch 1": b1["int8"]["p50_ms"] / b1["fp32"]["p50_ms"]}
    if with_torch:
        ratios.update({
            "ORT fp32 / torch eager speed, batch 1": b1["torch eager"]["p50_ms"] / b1["fp32"]["p50_ms"],
            "ORT fp32 / torch eager speed, batch 256": bb["torch eager"]["p50_ms"] / bb["fp32"]["p50_ms"],
            "ORT int8 / torch eager speed, batch 1": b1["torch eager"]["p50_ms"] / b1["int8"]["p50_ms"],
            "fp32 batch-1 p50 / empty-run floor": b1["fp32"]["p50_ms"] / b1["empty run (floor)"]["p50_ms"],
            "int8 batch-1 p50 / empty-run floor": b1["int8"]["p50_ms"] / b1["empty run (floor)"]["p50_ms"],
            "fp32 batch 1: 2 threads p50 / 1 thread p50": b1["fp32 2 threads"]["p50_ms"] / b1["fp32"]["p50_ms"],
        })
    out["ratios"] = ratios
    flops, peaks = out["flops_per_image"], out["peaks G(FL)OP/s"]
    c = out["compute"] = {}
    for batch, group, threads in (("256", bb, "2 threads"), ("1", b1, "1 thread")):
        fp32_peak = peaks[threads]["fp32 MatMul"]
        int8_peak = max(v for k, v in peaks[threads].items() if k.startswith("int8"))
        c[f"fp32 GFLOP/s, batch {batch}"] = flops * group["fp32"]["images_per_s"] / 1e9
        c[f"int8 GOP/s, batch {batch}"] = flops * group["int8"]["images_per_s"] / 1e9
        c[f"fp32 share of peak, batch {batch}"] = c[f"fp32 GFLOP/s, batch {batch}"] / fp32_peak
        c[f"int8 share of peak, batch {batch}"] = c[f"int8 GOP/s, batch {batch}"] / int8_peak
        c[f"int8/fp32 peak ratio, {threads}"] = int8_peak / fp32_peak
    # Even at the 1-thread fp32 GEMM peak the model's multiply-adds take flops/peak: a lower limit of batch-1 latency.
    limit = 1e3 * flops / (peaks["1 thread"]["fp32 MatMul"] * 1e9)
    c["fp32 batch-1 compute limit ms (flops / 1-thread peak)"] = limit
    if with_torch:
        ratios["fp32 batch-1 compute limit / empty-run floor"] = limit / b1["empty run (floor)"]["p50_ms"]
    print(f"[{label}] " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), file=sys.stderr, flush=True)
    return out


def first_of_round_dropped(slot: Slot) -> list[float]:
    """Seconds of each timed call except the first of every round (the one that paid for a thread switch)."""
    keep = [i for i, r in enumerate(slot.rounds) if i > 0 and slot.rounds[i - 1] == r]
    return [slot.latencies_ns[i] / 1e9 for i in keep] or [ns / 1e9 for ns in slot.latencies_ns]


def measure_training(run: RunModels, seconds: float, rounds: int, batch: int = 64) -> dict:
    """Images/s of the training step (forward, backward, AdamW) on in-memory tensors, 1 vs 2 torch threads.

    One `time_interleaved` call: blocks of steps alternate between the thread counts, round by round;
    the first step of each block is left out (torch rebuilds its thread pool on `set_num_threads`).
    """
    import torch

    from pipeline.model import DropoutCNN

    model = DropoutCNN(run.torch_model().config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x_test, y_test = run.test_data()
    x, y = torch.from_numpy(x_test[:batch].copy()), torch.from_numpy(y_test[:batch].astype(np.int64))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def at(threads: int) -> Callable[[], None]:
        def run():
            if torch.get_num_threads() != threads:  # a switch rebuilds torch's pool: once per round, dropped below
                torch.set_num_threads(threads)
            step()
        return run

    before = torch.get_num_threads()
    slots = {"1 thread": Slot(run=at(1)), "2 threads": Slot(run=at(2))}
    time_interleaved(list(slots.values()), TimingPlan(warmup=1, duration=seconds / 2, rounds=rounds,
                                                       time_limit=max(seconds, 1.0)))
    torch.set_num_threads(before)
    times = {name: first_of_round_dropped(slot) for name, slot in slots.items()}
    train_images = run.manifest["dataset"]["sizes"]["train"]
    res: dict = {"batch": batch, "train_images": train_images}
    for name, ts in times.items():
        ips = batch / float(np.median(ts))
        res[name] = {"images_per_s": ips, "seconds_per_epoch": train_images / ips, "steps": len(ts)}
    tr = run.manifest["training"]
    res["recorded by train"] = {"seconds_per_epoch": tr.get("seconds_per_epoch"), "train_seconds": tr.get("train_seconds"),
                                "epochs_run": tr.get("epochs_run"),
                                "images_per_s": (train_images * tr["epochs_run"] / tr["train_seconds"]
                                                 if tr.get("train_seconds") else None),
                                "threads": tr.get("config", {}).get("threads")}
    return res


# The instruction sets the summary line names, when the host has them.
SUMMARY_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def environment() -> dict:
    """`pipeline bench`'s record of the host (CPU, flags, versions, load), plus the short fields the summary prints."""
    from pipeline import bench

    env = bench.environment()
    versions = env["versions"]
    return {**env, "cpu": env["cpu_model"], "cores": env["logical_cores"],
            "isa": [f for f in SUMMARY_ISA if f in env["cpu_flags"]],
            "onnxruntime": versions["onnxruntime"], "torch": versions["torch"], "onnx": versions["onnx"]}


def acceptance(result: dict) -> list[dict]:
    d, w = result["runs"].get("default"), result["runs"].get("wide")
    ratios = (result.get("peers") or {}).get("ratios", {})
    shipped = (result.get("peers") or {}).get("deployed_vs_candidates", {})
    values = {
        **{f"deployed file / fastest int8 candidate, {key} (export speed check)": row["ratio"] for key, row in shipped.items()},
        "recommended deployment vs best peer, batch 1 (peer p50 / ours)": ratios.get("best peer p50 / recommended p50, batch 1"),
        "recommended deployment vs best peer, batch 256 (peer p50 / ours)":
            ratios.get("best peer p50 / recommended p50, batch 256"),
    }
    if d is None:  # --peers-only
        return _rows(values)
    values.update({
        "default int8/fp32 throughput, batch 256": d["ratios"]["int8/fp32 throughput, batch 256"],
        "default int8 p50 / fp32 p50, batch 1": d["ratios"]["int8 p50 / fp32 p50, batch 1"],
        "default accuracy drop (points)": d["accuracy"]["drop_points"],
        "wide int8/fp32 throughput, batch 256": w["ratios"]["int8/fp32 throughput, batch 256"] if w else None,
        "fp32 batch-1 p50 / empty-run floor": d["ratios"]["fp32 batch-1 p50 / empty-run floor"],
        "ORT fp32 / torch eager speed, batch 1": d["ratios"]["ORT fp32 / torch eager speed, batch 1"],
    })
    return _rows(values)


def _rows(values: dict) -> list[dict]:
    rows = []
    for name, (op, target) in TARGETS.items():
        if name not in values:
            continue
        v = values[name]
        ok = None if v is None else (v >= target if op == ">=" else v <= target)
        rows.append({"check": name, "value": v, "target": f"{op} {target:g}", "pass": ok})
    return rows


# --- report ---------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Benchmark ({result['created']})", "",
             f"{env['cpu']}, {env['cores']} cores ({', '.join(env['isa'])}), load average at start "
             f"{env['load_average'][0]:.1f}; onnxruntime {env['onnxruntime']}, torch {env['torch']}. "
             f"Interleaved rounds, p50 latencies; ratios are within one run. {result['seconds']:.0f} s in all.", "",
             "## Acceptance (issues 9 and 16)", "", "| check | measured | target | pass |", "| --- | --- | --- | --- |"]
    for row in result["acceptance"]:
        v = "n/a" if row["value"] is None else f"{row['value']:.2f}"
        verdict = "-" if row["pass"] is None else ("yes" if row["pass"] else "NO")
        lines.append(f"| {row['check']} | {v} | {row['target']} | {verdict} |")
    if result.get("peers"):
        lines += bench_peers.markdown(result["peers"], result.get("command", "python tools/bench.py"))
    for label, r in result["runs"].items():
        lines += ["", f"## {label}: conv {r['conv_channels']} ({r['run_dir']}), {r['flops_per_image'] / 1e6:.1f} MFLOP/image", "",
                  f"accuracy fp32 {100 * r['accuracy']['fp32']['measured']:.2f}%, "
                  f"int8 {100 * r['accuracy']['int8']['measured']:.2f}% "
                  f"(drop {r['accuracy']['drop_points']:.2f} points); recommended: {r['recommended']}; "
                  f"int8 runtime {json.dumps(r['runtime']['int8'])}", "",
                  "| target | batch | threads | p50 ms | p90 ms | images/s |", "| --- | --- | --- | --- | --- | --- |"]
        for key, threads in (("batch1_1thread", 1), (f"batch{BIG_BATCH}_2threads", 2)):
            for name, s in r[key].items():
                t = 2 if name == "fp32 2 threads" else threads
                lines.append(f"| {name} | {s['batch']} | {t} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['images_per_s']:.0f} |")
        lines += [""] + [f"- {k}: **{v:.2f}**" for k, v in r["ratios"].items()]
        lines += [f"- {k}: {v:.3f}" if "limit" in k else f"- {k}: {v:.1f}" for k, v in r["compute"].items() if "share" not in k]
    if "training" not in result:  # --peers-only
        return "\n".join(lines) + "\n"
    lines += ["", f"## Against the GEMM peaks: ({PEAK_SHAPE[0]} x {PEAK_SHAPE[1]}) @ ({PEAK_SHAPE[1]} x {PEAK_SHAPE[2]}) "
              "in ONNX Runtime, timed inside each CNN group", ""]
    for label, r in result["runs"].items():
        c = r["compute"]
        for batch, threads in (("256", "2 threads"), ("1", "1 thread")):
            peaks = ", ".join(f"{k} {v:.0f}" for k, v in r["peaks G(FL)OP/s"][threads].items())
            lines.append(f"- {label}, batch {batch} ({threads}): fp32 {c[f'fp32 GFLOP/s, batch {batch}']:.0f} GFLOP/s = "
                         f"{100 * c[f'fp32 share of peak, batch {batch}']:.0f}% of the fp32 peak; int8 "
                         f"{c[f'int8 GOP/s, batch {batch}']:.0f} GOP/s = "
                         f"{100 * c[f'int8 share of peak, batch {batch}']:.0f}% of the int8 peak (peaks G(FL)OP/s: {peaks})")
    t = result["training"]
    lines += ["", f"## Training step (batch {t['batch']}, AdamW, in-memory tensors)", ""]
    for name in ("1 thread", "2 threads"):
        lines.append(f"- {name}: {t[name]['images_per_s']:.0f} images/s = {t[name]['seconds_per_epoch']:.1f} s per epoch "
                     f"of {t['train_images']} images")
    rec = t["recorded by train"]
    if rec.get("seconds_per_epoch"):
        lines.append(f"- recorded by `pipeline train` (threads {rec['threads']}): {rec['seconds_per_epoch']:.1f} s per epoch, "
                     f"{rec['images_per_s']:.0f} images/s over {rec['epochs_run']} epochs")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "models" / "bench", help="folder for bench.json and bench.md")
    p.add_argument("--default-run", type=Path, default=ROOT / RUNS["default"][0])
    p.add_argument("--wide-run", type=Path, default=ROOT / RUNS["wide"][0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="IDX folder used when a run must be trained")
    p.add_argument("--train-epochs", type=int, default=8,
                   help="epochs when a run must be trained (8 reaches ~98.6%% on the MNIST test split; 0: train's default)")
    p.add_argument("--train-threads", type=int, default=1,
                   help="torch threads when a run must be trained (1 was 3-7x faster than 2 on this shared 2-core host; 0: torch's)")
    p.add_argument("--no-prepare", action="store_true", help="fail instead of training/exporting missing runs")
    p.add_argument("--no-wide", action="store_true", help="skip the 64/128 run")
    p.add_argument("--budget", type=float, default=300.0, help="seconds of timed measurement in all (bounds the run)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per measurement")
    p.add_argument("--quick", action="store_true", help="a 60 s budget and 6 rounds (smoke run)")
    p.add_argument("--no-peers", action="store_true", help="skip the peer comparison (ORT defaults, OpenVINO, NNCF)")
    p.add_argument("--peers-only", action="store_true",
                   help="only the peer comparison on the default run (the whole budget; no wide run, torch, peaks, training)")
    a = p.parse_args(argv)
    if a.quick:
        a.budget, a.rounds = 60.0, 6
    started = time.perf_counter()
    log: list[str] = []
    runs = {"default": (a.default_run, RUNS["default"][1])}
    if not a.no_wide and not a.peers_only:
        runs["wide"] = (a.wide_run, RUNS["wide"][1])
    for run_dir, widths in runs.values():
        if not a.no_prepare:
            prepare(Path(run_dir), widths, a.data_dir, a.train_epochs, a.train_threads, log)
    # Budget split in shares: the default run's two groups carry torch, the floor and the 3 peak graphs
    # (4 each), the wide run's two groups 2.5 each, the training step 1, the peers (7 contenders, 2 batches) 6.
    peers = not a.no_peers
    shares = 0 if a.peers_only else 8 + 5 * (len(runs) - 1) + 1
    share = a.budget / (shares + 6 * peers)
    command = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict = {"schema": 1, "created": artifacts.now_iso(), "environment": environment(), "commands_run": log,
                    "command": command.strip(), "budget_seconds": a.budget, "rounds": a.rounds, "runs": {}}
    if peers:
        result["peers"] = bench_peers.measure_peers(RunModels(a.default_run), RunModels(a.default_run).peer_data(),
                                                    share * 6, a.rounds, a.out / "peers")
    if not a.peers_only:
        for label, (run_dir, _) in runs.items():
            result["runs"][label] = measure_run(label, RunModels(run_dir), share * (4 if label == "default" else 2.5),
                                                a.rounds, with_torch=label == "default")
        result["training"] = measure_training(RunModels(a.default_run), share, a.rounds)
    result["acceptance"] = acceptance(result)
    result["seconds"] = time.perf_counter() - started
    a.out.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_json(a.out / "bench.json", result)
    text = markdown(result)
    artifacts.atomic_write_bytes(a.out / "bench.md", text.encode())
    print(text)
    print(f"wrote {a.out / 'bench.json'} and {a.out / 'bench.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
