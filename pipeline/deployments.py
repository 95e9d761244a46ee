"""The manifest's `deployments`: per measured batch size, which (artifact, engine) to run, and what it measured.

    "deployments": [
      {"batch": 1, "artifact": "int8", "engine": "onnxruntime", "provider": "cpu", "threads": 1,
       "p50_ms": 0.061, "ratio_to_fp32": 0.47, "host": {"machine": ..., "processor": ..., "cpu_count": ...},
       "measured": "export speed check", "created": "2026-12-02T01:00:00+00:00"},
      {"batch": 256, ...}
    ]

Written by the export's speed check (ONNX Runtime, on the export host) and by `pipeline bench
--run` (every engine it timed, on the bench host); a newer measurement of a batch size replaces
the older one. `recommended` stays the one answer for readers that want one. Readers (`predict`,
`bench`, the device runner) follow the entry of the nearest measured batch size at or below the
one they run (the smallest entry when they run below every measured size), and fall back to ONNX
Runtime with a one-line note when the entry's engine is not installed where they run: to the
entry's `onnxruntime_artifact` (the file that measured fastest on ONNX Runtime at that batch size)
when it has one, else to `recommended`.

The record is `pipeline.manifest.Deployment` (the typed schema); this module chooses and merges them.
Imports no torch and no engine.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pipeline.manifest import Deployment

MEASURED_BY = ("export speed check", "bench")
"""The two stages that write deployments (`Deployment.measured`)."""


def host() -> dict:
    """The host a measurement belongs to (the same three fields as the artifacts' latency records)."""
    return {"machine": platform.machine(), "processor": platform.processor() or None, "cpu_count": os.cpu_count()}


def _default_threads() -> int:
    """The intra-op threads ONNX Runtime used when none were set: one per usable core (what bench calls all cores)."""
    from pipeline.device_runner import usable_cores

    return usable_cores()


def read(manifest: dict) -> list[Deployment]:
    """The manifest's deployments, by batch size; [] when it has none."""
    entries = manifest.get("deployments") or []
    return sorted((Deployment.from_dict(r, f"manifest.deployments[{i}]") for i, r in enumerate(entries)),
                  key=lambda d: d.batch)


def merged(existing: Iterable[dict], new: Iterable[Deployment]) -> list[dict]:
    """`existing` with every batch size of `new` replaced by the new entry, sorted by batch size."""
    by_batch = {int(r["batch"]): r for r in existing}
    by_batch.update({d.batch: d.to_dict() for d in new})
    return [by_batch[b] for b in sorted(by_batch)]


def nearest(entries: list[Deployment], batch: int) -> Deployment | None:
    """The entry of the largest measured batch size <= `batch`, else the smallest; None without entries."""
    if not entries:
        return None
    below = [d for d in entries if d.batch <= batch]
    return below[-1] if below else entries[0]


@dataclass(frozen=True)
class Choice:
    """What a reader runs for a batch size, and why."""

    artifact: str
    engine: str
    threads: int | None
    deployment: Deployment | None
    note: str | None
    """One line when the deployment could not be followed here (its engine missing), else None."""


def follow(manifest: dict, batch: int, installed: Callable[[str], tuple[bool, str]]) -> Choice:
    """The (artifact, engine) to run at `batch`: the nearest deployment, or `recommended` on ONNX Runtime.

    `installed(engine)` -> (ok, reason), e.g. `pipeline.engines.available`.
    """
    fallback = manifest.get("recommended") or "fp32"
    entry = nearest(read(manifest), batch)
    if entry is None:
        return Choice(fallback, "onnxruntime", None, None, None)
    if entry.artifact not in (manifest.get("artifacts") or {}):
        return Choice(fallback, "onnxruntime", None, entry,
                      f"the deployment for batch {entry.batch} names {entry.artifact!r}, which this run does not ship: "
                      f"running {fallback} on onnxruntime")
    if entry.engine != "onnxruntime":
        ok, reason = installed(entry.engine)
        if not ok:
            if entry.onnxruntime_artifact in manifest["artifacts"]:
                fallback = entry.onnxruntime_artifact
            return Choice(fallback, "onnxruntime", None, entry,
                          f"the deployment for batch {entry.batch} is {entry.artifact} on {entry.engine}, not installed here "
                          f"({reason}): running {fallback} on onnxruntime")
    return Choice(entry.artifact, entry.engine, entry.threads, entry, None)


# Artifact kinds a deployment may name: deterministic classifiers (not the MC dropout model, not the torch baseline).
DEPLOYABLE_KINDS = ("fp32", "int8", "fp16")


def from_records(records: Iterable[dict], measured: str, created: str, host_record: dict | None = None) -> list[Deployment]:
    """Per batch size, the fastest timed record of a deployable artifact, with its p50 over fp32 on ONNX Runtime.

    `records` are bench records (`status`, `artifact`, `kind`, `engine`, `provider`, `batch`, `threads`,
    `latency_ms.p50`); only pairs that were timed count, so a pair refused by the agreement check never does.
    The fp32 ratio uses the fp32 ONNX Runtime record of the same group (provider, batch, threads).
    """
    timed = [r for r in records if r.get("status") == "ok" and r.get("kind") in DEPLOYABLE_KINDS]
    fp32 = {(r["provider"], r["batch"], r["threads"]): r["latency_ms"]["p50"] for r in timed
            if r["kind"] == "fp32" and r["engine"] == "onnxruntime"}
    best = _fastest_per_batch(timed)
    best_on_onnxruntime = _fastest_per_batch(r for r in timed if r["engine"] == "onnxruntime")
    out = []
    for batch, r in sorted(best.items()):
        base = fp32.get((r["provider"], batch, r["threads"]))
        on_onnxruntime = best_on_onnxruntime.get(batch, {}).get("artifact")
        out.append(Deployment(batch=batch, artifact=r["artifact"], engine=r["engine"], provider=r["provider"],
                              threads=r["threads"], p50_ms=round(r["latency_ms"]["p50"], 6),
                              ratio_to_fp32=round(r["latency_ms"]["p50"] / base, 4) if base else None,
                              host=host_record or host(), measured=measured, created=created,
                              onnxruntime_artifact=on_onnxruntime if r["engine"] != "onnxruntime" else None))
    return out


def _fastest_per_batch(records: Iterable[dict]) -> dict[int, dict]:
    """Batch size -> the record with the lowest p50 at that batch size."""
    best: dict[int, dict] = {}
    for r in records:
        if r["batch"] not in best or r["latency_ms"]["p50"] < best[r["batch"]]["latency_ms"]["p50"]:
            best[r["batch"]] = r
    return best


def from_speed_check(speed: dict, artifacts: Iterable[str], created: str) -> list[Deployment]:
    """Per batch size of an export speed check (`quantize.speed_check`: "batch_N" -> {"<name>_ms",
    "<name>@<engine>_ms"}), the fastest of `artifacts` on any engine timed (CPU, the check's threads),
    with its p50 over fp32's on ONNX Runtime, and, when that engine is another, the fastest on ONNX Runtime."""
    out = []
    for key, entry in speed.items():
        if not key.startswith("batch_"):
            continue
        timed = {}
        for name in artifacts:
            if f"{name}_ms" in entry:
                timed[(name, "onnxruntime")] = entry[f"{name}_ms"]
            timed.update({(name, k[len(name) + 1:-3]): v for k, v in entry.items()
                          if k.startswith(name + "@") and k.endswith("_ms")})
        if not timed:
            continue
        (name, engine) = min(timed, key=timed.get)
        on_onnxruntime = [pair for pair in timed if pair[1] == "onnxruntime"]
        fallback = min(on_onnxruntime, key=timed.get)[0] if engine != "onnxruntime" and on_onnxruntime else None
        fp32 = entry.get("fp32_ms")
        out.append(Deployment(batch=int(key.removeprefix("batch_")), artifact=name, engine=engine, provider="cpu",
                              threads=entry.get("threads") or speed.get("threads") or _default_threads(),
                              p50_ms=timed[(name, engine)],
                              ratio_to_fp32=round(timed[(name, engine)] / fp32, 4) if fp32 else None, host=host(),
                              measured="export speed check", created=created, onnxruntime_artifact=fallback))
    return sorted(out, key=lambda d: d.batch)
