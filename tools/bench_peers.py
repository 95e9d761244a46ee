"""`make bench`'s peer comparison: the pipeline's recommended deployment against what a user would pick instead.

Every contender starts from the same fp32 `model.onnx` of the run and the same calibration images
(the training-split draw the run's int8 record names), and goes through the same accuracy
measurement on the held-out test split:

- ORT `quantize_static` with its defaults (QDQ, S8S8, per-tensor, MinMax) after `quant_pre_process`;
- ORT `quantize_dynamic` with its defaults after `quant_pre_process`;
- OpenVINO on the fp32 file (static shape, f32 precision hint, LATENCY hint);
- OpenVINO on NNCF's post-training int8 (`nncf.quantize` with its defaults) of the fp32 file.

OpenVINO and NNCF are this script's own extras (`pip install 'pipeline[bench-peers]'`), never core
dependencies: a peer whose package is missing is skipped with one line. The pipeline's side is the
deployment its manifest recommends for each batch size (`pipeline.deployments.follow`), plus its
int8 and fp32 under ONNX Runtime for context. At each batch size (1 at 1 thread, 256 at 2 threads)
all contenders are timed in ONE `pipeline.timing.time_interleaved` call, so their ratios hold on a
loaded machine. A peer counts as "best peer" only if it passes the pipeline's own accuracy gate
(test accuracy within `MAX_DROP_POINTS` of fp32): a faster file that lost accuracy is no alternative.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline import bench, deployments, engines, quantize, runtime
from pipeline.bench import OnnxTarget
from pipeline.config import BenchConfig
from pipeline.timing import SETTLE_SECONDS, TimingPlan, round_medians, summarize, time_interleaved

BATCHES = ((1, 1), (256, 2))
"""(batch, threads): the two operating points the acceptance names."""
MAX_DROP_POINTS = 0.5
PEERS = ("ORT quantize_static defaults", "ORT quantize_dynamic defaults", "OpenVINO fp32", "OpenVINO + NNCF int8")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _ort_peers(fp32: Path, calibration: np.ndarray, folder: Path, shape: tuple[int, ...]) -> dict:
    from onnxruntime.quantization import quant_pre_process, quantize_dynamic, quantize_static

    prepared = folder / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
    name = runtime.create_session(prepared, {}).get_inputs()[0].name
    static, dynamic = folder / "ort_static_default.onnx", folder / "ort_dynamic_default.onnx"
    quantize_static(str(prepared), str(static), quantize.CalibrationReader(calibration, name, 32))
    quantize_dynamic(str(prepared), str(dynamic))
    return {PEERS[0]: OnnxTarget(name=PEERS[0], path=static, kind="int8", input_shape=shape),
            PEERS[1]: OnnxTarget(name=PEERS[1], path=dynamic, kind="int8", input_shape=shape)}


def _openvino_peers(fp32: Path, calibration: np.ndarray, folder: Path, shape: tuple[int, ...]) -> dict:
    ok, reason = engines.available("openvino")
    if not ok:
        say(f"peers: OpenVINO fp32 and OpenVINO + NNCF int8 skipped: {reason}")
        return {}
    out = {PEERS[2]: engines.OpenVinoTarget(name=PEERS[2], path=fp32, kind="fp32", input_shape=shape)}
    try:
        import nncf
    except ImportError as exc:
        say(f"peers: OpenVINO + NNCF int8 skipped: nncf is not installed ({exc}); `pip install 'pipeline[bench-peers]'` adds it")
        return out
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    xml = folder / "nncf_int8.xml"
    ov.save_model(quantized, str(xml))
    out[PEERS[3]] = engines.OpenVinoTarget(name=PEERS[3], path=xml, kind="int8", input_shape=shape)
    return out


def _outputs(target, x: np.ndarray) -> np.ndarray:
    if isinstance(target, OnnxTarget):
        return runtime.run_batched(runtime.create_session(target.path, target.runtime), x)
    return target.outputs(x)


def _pipeline_targets(run, manifest: dict, shape: tuple[int, ...]) -> dict:
    """Every deployable artifact of the run (fp32, int8 and the per-batch int8 files) under ONNX Runtime, and
    under OpenVINO where it is installed: the deployments may name any of them."""
    out = {}
    with_openvino = engines.available("openvino")[0]
    for name, record in manifest["artifacts"].items():
        if record["kind"] not in deployments.DEPLOYABLE_KINDS or record["kind"] == "fp16":
            continue
        out[f"pipeline {name} (ORT)"] = OnnxTarget(name=name, path=run.path(name), kind=record["kind"],
                                                   runtime=run.runtime(name), input_shape=shape)
        if with_openvino:
            out[f"pipeline {name} (OpenVINO)"] = engines.OpenVinoTarget(name=name, path=run.path(name), kind=record["kind"],
                                                                        input_shape=shape)
    return out


def _onnxruntime_only(engine: str) -> tuple[bool, str]:
    """`engines.available` on a device with ONNX Runtime alone (most edge devices)."""
    return engine == "onnxruntime", f"{engine}: not on this device"


def _recommended(manifest: dict, batch: int, contenders: dict, installed=engines.available) -> tuple[str, dict]:
    """The contender that is the manifest's deployment for `batch` (as `predict` would follow it where `installed`)."""
    choice = deployments.follow(manifest, batch, installed)
    engine_label = "ORT" if choice.engine == "onnxruntime" else "OpenVINO"
    name = f"pipeline {choice.artifact} ({engine_label})"
    where = {"artifact": choice.artifact, "engine": choice.engine, "note": choice.note,
             "deployment": choice.deployment.to_dict() if choice.deployment else None}
    if name not in contenders:
        raise SystemExit(f"the manifest recommends {choice.artifact} on {choice.engine} at batch {batch}, "
                         f"which this script cannot time here ({', '.join(contenders)})")
    return name, where


def deployed_vs_candidates(manifest: dict) -> dict:
    """Per batch size the export's speed check measured: the deployed artifact's p50 over the fastest int8
    candidate's (each at its fastest engine), both from that one interleaved speed check (the int8 record's
    `candidates` and the manifest's `deployments`). <= 1.03 is issue 16's "within 3% of the fastest candidate"."""
    candidates = ((manifest["artifacts"].get("int8") or {}).get("quantization") or {}).get("candidates") or []
    out = {}
    for d in deployments.read(manifest):
        key = f"batch_{d.batch}"
        timed = [(c["latency"][key]["ms"], c["recipe"], c["latency"][key]["engine"]) for c in candidates
                 if key in (c.get("latency") or {})]
        if not timed or d.measured != "export speed check":
            continue
        ms, recipe, engine = min(timed)
        out[f"batch {d.batch}"] = {"deployed": f"{d.artifact} on {d.engine}", "deployed_ms": d.p50_ms,
                                   "fastest_candidate": f"{recipe} on {engine}", "fastest_ms": ms, "ratio": d.p50_ms / ms}
    return out


def measure_peers(run, data: dict, seconds: float, rounds: int, folder: Path) -> dict:
    """Build the peers, measure every contender's accuracy, time all contenders per batch in one interleaved call."""
    manifest = run.manifest
    shape = run.sample_shape()
    fp32 = run.path("fp32")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peers-", dir=folder) as tmp:
        work = Path(tmp)
        peers = {**_ort_peers(fp32, data["calibration"], work, shape), **_openvino_peers(fp32, data["calibration"], work, shape)}
        ours = _pipeline_targets(run, manifest, shape)
        x_test, y_test = data["x_test"], data["y_test"]
        fp32_logits = _outputs(ours["pipeline fp32 (ORT)"], x_test)
        reference = fp32_logits.argmax(1)
        fp32_accuracy = float(np.mean(reference == y_test))
        # The pipeline's pairs pass the same agreement check as in `pipeline bench` before they are timed.
        check = engines.Reference(x_test, fp32_logits, float(manifest["artifacts"]["fp32"]["verification"]["tolerance"]),
                                  "the run's test split, ONNX Runtime fp32")
        kept, held, checks = bench.vet_engines(list(ours.values()), check)
        for name, target in list(ours.items()):
            if id(target) in held:
                say(f"peers: {name} not timed: {held[id(target)][1]}")
                del ours[name]
        contenders = {**ours, **peers}
        rows: dict = {}
        for name, target in contenders.items():
            predictions = _outputs(target, x_test).argmax(1)
            accuracy = float(np.mean(predictions == y_test))
            drop = 100 * (fp32_accuracy - accuracy)
            rows[name] = {"peer": name in peers, "engine": target.engine, "file": target.path.name,
                          "test_accuracy": accuracy, "drop_points": drop,
                          "agreement_with_fp32": float(np.mean(predictions == reference)),
                          "passes_gate": drop <= MAX_DROP_POINTS + 1e-9}
        result: dict = {"agreement_checks": checks, "calibration": data["calibration_source"], "test_images": int(len(y_test)),
                        "fp32_test_accuracy": fp32_accuracy, "max_drop_points": MAX_DROP_POINTS,
                        "contenders": rows, "recommended": {}, "best_peer": {}, "ratios": {}, "paired": {}, "onnxruntime_only": {},
                        "deployed_vs_candidates": deployed_vs_candidates(manifest)}
        plan = TimingPlan(warmup=10, warmup_seconds=0.5, duration=seconds / len(BATCHES) / len(contenders),
                          rounds=rounds, time_limit=max(seconds, 2.0), settle_seconds=SETTLE_SECONDS)
        config = BenchConfig()
        for batch, threads in BATCHES:
            x = np.ascontiguousarray(np.resize(x_test, (batch, *x_test.shape[1:])), dtype=np.float32)
            slots = {name: target.open("cpu", batch, threads, config, x) for name, target in contenders.items()}
            time_interleaved(list(slots.values()), plan)
            key = f"batch {batch}"
            for name, slot in slots.items():
                stats = summarize(slot.latencies_ns, batch)
                rows[name][key] = {"threads": threads, "p50_ms": stats["latency_ms"]["p50"],
                                   "p90_ms": stats["latency_ms"]["p90"], "cv": stats["cv"], "runs": stats["runs"],
                                   "images_per_s": batch / (stats["latency_ms"]["p50"] / 1e3),
                                   "round_p50_ms": round_medians(slot)}
            rec, where = _recommended(manifest, batch, contenders)
            eligible = [n for n in peers if rows[n]["passes_gate"]]
            result["recommended"][key] = {"contender": rec, **where}
            if eligible:
                best = min(eligible, key=lambda n: rows[n][key]["p50_ms"])
                result["best_peer"][key] = best
                # >= 1.0: the pipeline's recommendation is at least as fast as the best peer.
                result["ratios"][f"best peer p50 / recommended p50, {key}"] = rows[best][key]["p50_ms"] / rows[rec][key]["p50_ms"]
                # The same ratio round by round (both timed under the same load in each round): its spread is the noise.
                paired = np.asarray(rows[best][key]["round_p50_ms"]) / np.asarray(rows[rec][key]["round_p50_ms"])
                result["paired"][key] = {"median": float(np.median(paired)), "min": float(paired.min()),
                                         "max": float(paired.max()), "rounds": int(len(paired))}
            # A device with ONNX Runtime only runs the deployments' fallback: against the ONNX Runtime peers.
            fallback, _ = _recommended(manifest, batch, contenders, _onnxruntime_only)
            on_onnxruntime = [n for n in eligible if rows[n]["engine"] == "onnxruntime"]
            if on_onnxruntime:
                best_there = min(on_onnxruntime, key=lambda n: rows[n][key]["p50_ms"])
                result["onnxruntime_only"][key] = {
                    "contender": fallback, "best_peer": best_there,
                    "ratio": rows[best_there][key]["p50_ms"] / rows[fallback][key]["p50_ms"]}
            say(f"[peers] {key}: " + ", ".join(f"{n} {rows[n][key]['p50_ms']:.4g} ms" for n in rows))
    return result


def markdown(peers: dict, command: str) -> list[str]:
    """The peer table (README-ready) and the two acceptance ratios."""
    rows = peers["contenders"]
    lines = ["", "## Peers: the same fp32 model.onnx, the same calibration images", "",
             f"`{command}`; calibration: {peers['calibration']}; accuracy on {peers['test_images']} held-out test images "
             f"(fp32 {100 * peers['fp32_test_accuracy']:.2f}%). A peer is eligible as best peer only within "
             f"{peers['max_drop_points']} points of fp32.", "",
             "| contender | engine | test acc. | agrees w/ fp32 | batch 1, 1 thread, p50 | batch 256, 2 threads, p50 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        b1, b256 = r.get("batch 1"), r.get("batch 256")
        mark = "" if r["passes_gate"] else " (fails the gate)"
        lines.append(f"| {name}{mark} | {r['engine']} | {100 * r['test_accuracy']:.2f}% | {100 * r['agreement_with_fp32']:.2f}% | "
                     f"{1e3 * b1['p50_ms']:.1f} us | {b256['p50_ms']:.2f} ms |")
    lines.append("")
    for key, rec in peers["recommended"].items():
        best = peers["best_peer"].get(key)
        ratio = peers["ratios"].get(f"best peer p50 / recommended p50, {key}")
        paired = peers.get("paired", {}).get(key)
        spread = (f"; round by round median {paired['median']:.2f}, range {paired['min']:.2f}-{paired['max']:.2f} "
                  f"over {paired['rounds']} rounds") if paired else ""
        verdict = "n/a (no eligible peer)" if ratio is None else f"**{ratio:.2f}** (best peer: {best}{spread})"
        note = f"; {rec['note']}" if rec.get("note") else ""
        lines.append(f"- {key}: recommended deployment {rec['contender']}; best peer p50 / recommended p50 = {verdict}{note}")
    for key, row in (peers.get("onnxruntime_only") or {}).items():
        lines.append(f"- {key}, a device with ONNX Runtime only: the deployments run {row['contender']}; best ONNX Runtime "
                     f"peer p50 / its p50 = **{row['ratio']:.2f}** (best: {row['best_peer']})")
    for key, row in (peers.get("deployed_vs_candidates") or {}).items():
        lines.append(f"- {key}, the export's speed check: deployed {row['deployed']} {row['deployed_ms']:.4g} ms, fastest int8 "
                     f"candidate {row['fastest_candidate']} {row['fastest_ms']:.4g} ms: ratio **{row['ratio']:.3f}**")
    return lines
