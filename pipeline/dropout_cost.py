"""The dropout compute question, answered from measurements: what does dropout cost at inference
and at training time?

Two runs of the same architecture, one trained with dropout and one without, are compared on:
- the op histograms of their fp32 exports (dropout in eval() is the identity, so the graphs should
  be the same op for op);
- inference latency, their fp32 artifacts timed in the same interleaved rounds, so the ratio is
  paired and a neighbour's load hits both alike;
- training seconds per epoch, from each run's metrics.json (measured when each run trained, so not
  interleaved: read it with the runs' devices, threads and the machine's load in mind).
Imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import numpy as np

from pipeline import artifacts, bench
from pipeline.config import BenchConfig
from pipeline.errors import PipelineError
from pipeline.manifest import Manifest
from pipeline.onnxfile import load_model, op_histogram

DROPOUT_FIELDS = ("dropout", "spatial_dropout")
NOISE_FLOOR = 0.05
"""Latency differences under 5% are not told apart from noise on a shared machine, whatever the rounds say."""
INCONCLUSIVE = 0.25
"""A tolerance wider than 25% says the machine was too noisy to answer at that batch size (more --rounds/--duration)."""


class ComparisonError(PipelineError):
    """Two runs that cannot answer the question (other architecture, no export, no metrics)."""

    exit_code = 15


def _rates(manifest: Manifest) -> dict:
    return {k: manifest.model.config.get(k, 0.0) for k in DROPOUT_FIELDS}


def _check_same_architecture(run_a: Path, a: Manifest, run_b: Path, b: Manifest) -> None:
    ca = {k: v for k, v in a.model.config.items() if k not in DROPOUT_FIELDS}
    cb = {k: v for k, v in b.model.config.items() if k not in DROPOUT_FIELDS}
    if ca != cb:
        diff = {k: (ca.get(k), cb.get(k)) for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
        raise ComparisonError(f"{run_a} and {run_b} are different architectures apart from dropout: {diff}")


def _training(run_dir: Path, manifest: Manifest) -> dict:
    path = Path(run_dir) / artifacts.METRICS
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ComparisonError(f"{path}: unreadable training metrics ({exc})") from None
    epochs = [h["seconds"] for h in metrics.get("history", [])]
    config = (manifest.training.config if manifest.training else None) or {}
    return {"seconds_per_epoch": metrics.get("seconds_per_epoch"),
            # The median epoch leaves out the first epoch's one-off costs and any stall.
            "median_epoch_seconds": float(np.median(epochs)) if epochs else None,
            "epochs": len(epochs), "device": metrics.get("device"),
            "batch_size": config.get("batch_size"), "threads": config.get("threads"),
            "train_images": manifest.dataset.sizes.get("train") if manifest.dataset else None}


def _latency_verdicts(records: list[dict], name_a: str, name_b: str) -> list[dict]:
    """Per (batch, threads): the paired p50 ratio a/b, its spread over rounds, and whether it is within noise."""
    ok = {(r["artifact"], r["batch"], r["threads"]): r for r in records if r["status"] == "ok"}
    verdicts = []
    for (name, batch, threads), ra in sorted(ok.items(), key=lambda kv: (kv[0][1], kv[0][2] or 0)):
        rb = ok.get((name_b, batch, threads))
        if name != name_a or rb is None:
            continue
        ratio = ra["latency_ms"]["p50"] / rb["latency_ms"]["p50"]
        per_round = [x / y for x, y in zip(ra["round_p50_ms"], rb["round_p50_ms"], strict=True)]
        # The spread of the paired per-round ratios, robustly (a neighbour's burst in one round must not
        # widen the band to anything): 3 scaled median absolute deviations, at least the noise floor.
        mad = float(np.median(np.abs(np.asarray(per_round) - np.median(per_round)))) if per_round else 0.0
        tolerance = max(3 * 1.4826 * mad, NOISE_FLOOR)
        verdicts.append({"batch": batch, "threads": threads, "p50_ms_with": ra["latency_ms"]["p50"],
                         "p50_ms_without": rb["latency_ms"]["p50"], "ratio": ratio, "round_ratios": per_round,
                         "tolerance": tolerance, "equal_within_noise": abs(ratio - 1.0) <= tolerance <= INCONCLUSIVE,
                         "verdict": ("inconclusive" if tolerance > INCONCLUSIVE
                                     else "equal" if abs(ratio - 1.0) <= tolerance else "different")})
    return verdicts


def compare(run_with: Path, run_without: Path, config: BenchConfig, variant: str = "fp32") -> dict:
    """Answer the dropout compute question for two runs; the result goes into bench.json as `dropout`."""
    run_with, run_without = Path(run_with), Path(run_without)
    ma, mb = artifacts.load_manifest(run_with), artifacts.load_manifest(run_without)
    _check_same_architecture(run_with, ma, run_without, mb)
    rates_a, rates_b = _rates(ma), _rates(mb)
    if rates_a == rates_b:
        raise ComparisonError(f"{run_with} and {run_without} have the same dropout rates {rates_a}: nothing to compare")
    for run_dir, manifest in ((run_with, ma), (run_without, mb)):
        if variant not in manifest.artifacts:
            raise ComparisonError(f"{run_dir} has no {variant} artifact: run `pipeline export --run {shlex.quote(str(run_dir))}` first")
    (ta,), (tb,) = bench.run_targets(run_with, [variant]), bench.run_targets(run_without, [variant])
    name_a, name_b = f"{variant} (dropout {rates_a['dropout']:g})", f"{variant} (dropout {rates_b['dropout']:g})"
    ta, tb = dataclasses.replace(ta, name=name_a), dataclasses.replace(tb, name=name_b)
    hist_a, hist_b = op_histogram(load_model(ta.path)), op_histogram(load_model(tb.path))

    timing = dataclasses.replace(config, providers=("cpu",), rounds=max(config.rounds, 5), require_provider=False)
    result = bench.benchmark([ta, tb], timing)
    verdicts = _latency_verdicts(result.records, name_a, name_b)
    train_a, train_b = _training(run_with, ma), _training(run_without, mb)
    return {"run_with": str(run_with), "run_without": str(run_without), "rates_with": rates_a, "rates_without": rates_b,
            "variant": variant, "op_histogram_with": hist_a, "op_histogram_without": hist_b,
            "op_histograms_identical": hist_a == hist_b, "dropout_ops_in_exports": {
                "with": sum(v for k, v in hist_a.items() if "Dropout" in k or "Random" in k),
                "without": sum(v for k, v in hist_b.items() if "Dropout" in k or "Random" in k)},
            "latency": verdicts, "latency_records": result.records, "thread_choices": result.thread_choices,
            "training_with": train_a, "training_without": train_b,
            "training_ratio": _ratio(train_a["median_epoch_seconds"], train_b["median_epoch_seconds"]),
            "answer": answer(hist_a == hist_b, verdicts, train_a, train_b, rates_a)}


def _ratio(a, b):
    return a / b if a and b else None


def answer(identical: bool, verdicts: list[dict], train_a: dict, train_b: dict, rates: dict) -> str:
    """One paragraph that states what the measurements say."""
    parts = []
    if identical:
        parts.append("The fp32 exports have identical op histograms: dropout leaves no op in the inference graph.")
    else:
        parts.append("The fp32 exports' op histograms DIFFER: the export with dropout keeps ops the other lacks.")
    if verdicts:
        detail = "; ".join(f"batch {v['batch']}: {v['ratio']:.3f} (tolerance +/-{v['tolerance']:.3f}, {v['verdict']})"
                           for v in verdicts)
        parts.append(f"Inference latency with/without dropout (p50 ratio, interleaved rounds): {detail}.")
    sa, sb = train_a["median_epoch_seconds"], train_b["median_epoch_seconds"]
    if sa and sb:
        parts.append(f"Training: {sa:.3f} s/epoch with dropout {rates['dropout']:g} vs {sb:.3f} without "
                     f"({100 * (sa / sb - 1):+.1f}%, median epoch from each run's metrics.json; the two runs trained at "
                     f"different times, not interleaved, so this includes any change in the machine's load).")
    kinds = {v["verdict"] for v in verdicts}
    if identical and "equal" in kinds and "different" not in kinds:
        parts.append("So dropout costs nothing at inference; its cost is in training only.")
    if "inconclusive" in kinds:
        parts.append("Where inconclusive, the machine was too noisy at that batch size: rerun with more --rounds or --duration.")
    return " ".join(parts)
