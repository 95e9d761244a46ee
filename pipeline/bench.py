"""ONNX Runtime latency, measured so that the numbers can be trusted. Imports no torch.

What makes a number honest here:
- the session is built by `runtime.create_session` with the artifact's `runtime` settings (or the
  level asked for), and the providers it really uses (`get_providers()`) are recorded;
- a provider this onnxruntime build lacks is reported as unavailable with the reason, never timed on
  the CPU under its name (CUDAExecutionProvider on the CPU wheel only warns and runs on the CPU);
- session creation and the first run are timed apart from the steady state; warm-up runs follow;
- the timed runs of one group (same provider, batch and threads) are split into rounds interleaved
  across the targets, so a load spike from a neighbour hits every target alike and ratios hold;
- thread counts are fixed per measurement and recorded; at batch 1 the count is chosen by a probe;
- with IO binding the input and output live on the provider's device as OrtValues bound once, and
  on a GPU the outputs are synchronised before the clock stops;
- every loop is bounded in time (`BenchConfig.warmup_seconds`, `duration`, `time_limit`).

A target is anything with `name`, `engine`, `describe()`, `input_shape`, `open(...)` -> `Slot`:
`OnnxTarget` here, `pipeline.baseline.TorchTarget` for the PyTorch eager baseline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from pipeline import artifacts, engines, runtime
from pipeline.config import BenchConfig, to_dict
from pipeline.device_runner import usable_cores  # the runner's copy, which it carries to devices; one definition
from pipeline.errors import DeviceError, ModelIntegrityError, PipelineError, RunFolderError
from pipeline.onnxfile import ModelFileError, io_signature, load_model
from pipeline.timing import Slot, round_medians, summarize, time_interleaved

log = logging.getLogger(__name__)
BENCH_JSON = "bench.json"
BENCH_PNG = "bench.png"
BENCH_SCHEMA = 2
READABLE_SCHEMAS = (1, 2)  # bench.json files a new benchmark merges into
HISTORY_LIMIT = 20  # earlier timings kept per record
PROBE_SECONDS = 0.3
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
DEVICE_OF = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"}
# ORT's own exception types derive from Exception, not RuntimeError: a model that cannot run at a
# batch size (a fixed batch dim) or on a provider is a record of failure, not a crash.
_ORT_ERRORS = tuple(getattr(_ort_state, name) for name in
                    ("Fail", "InvalidArgument", "RuntimeException", "InvalidGraph", "NotImplemented", "EPFail")
                    if hasattr(_ort_state, name))


class BenchError(PipelineError):
    """A target that cannot be benchmarked (changed file, missing artifact, bad shape)."""

    exit_code = 13


# --- what is timed -------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxTarget:
    """An ONNX file and the ORT settings it must run with (the manifest's `runtime`)."""

    name: str
    path: Path
    kind: str = "onnx"
    runtime: dict = field(default_factory=dict)
    sha256: str | None = None
    input_shape: tuple[int, ...] = ()
    """Per-sample input shape (C, H, W); the batch dimension is added per measurement."""
    engine: str = "onnxruntime"

    def describe(self) -> dict:
        return {"artifact": self.name, "kind": self.kind, "engine": self.engine, "file": str(self.path),
                "sha256": self.sha256, "runtime": self.runtime}

    def open(self, provider: str, batch: int, threads: int, config: BenchConfig, x: np.ndarray) -> Slot:
        level = config.optimization_level
        started = time.perf_counter()
        session = runtime.create_session(self.path, self.runtime, provider=provider, threads=threads, level=level)
        create_ms = 1e3 * (time.perf_counter() - started)
        inp, out = session.get_inputs()[0], session.get_outputs()[0]
        x = x.astype(ORT_DTYPES.get(inp.type, np.float32), copy=False)
        if config.io_binding:
            run, first_ms, parity = _bound_runner(session, inp.name, out.name, x, DEVICE_OF[provider])
        else:
            def run():
                return session.run([out.name], {inp.name: x})

            started = time.perf_counter()
            run()
            first_ms, parity = 1e3 * (time.perf_counter() - started), None
        info = {"session_providers": session.get_providers(), "session_create_ms": create_ms, "first_run_ms": first_ms,
                "optimization_level": level or self.runtime.get("graph_optimization_level", "all"),
                "disabled_optimizers": list(self.runtime.get("disabled_optimizers", [])),
                "io_binding": config.io_binding, "input_dtype": np.dtype(x.dtype).name}
        if parity is not None:
            info["io_binding_max_abs_diff"] = parity
        return Slot(run=run, info=info)


def _bound_runner(session: ort.InferenceSession, in_name: str, out_name: str, x: np.ndarray, device: str):
    """(run, first-run ms, max |bound - plain|): input and output bound once as OrtValues on `device`.

    On a GPU the copies to and from the host leave the timed loop, and `synchronize_outputs` makes
    the clock stop only when the device has finished (kernels are launched asynchronously).
    """
    binding = session.io_binding()
    x_value = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
    binding.bind_ortvalue_input(in_name, x_value)
    binding.bind_output(out_name, device)  # first run: ORT allocates the output, which tells its shape
    sync = device != "cpu"

    started = time.perf_counter()
    session.run_with_iobinding(binding)
    if sync:
        binding.synchronize_outputs()
    first_ms = 1e3 * (time.perf_counter() - started)
    shape = binding.get_outputs()[0].shape()
    dtype = ORT_DTYPES.get(session.get_outputs()[0].type, np.float32)
    y_value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
    binding.clear_binding_outputs()
    binding.bind_ortvalue_output(out_name, y_value)  # preallocated: no allocation inside the timed loop

    def run():
        session.run_with_iobinding(binding)
        if sync:
            binding.synchronize_outputs()

    run()
    bound = binding.copy_outputs_to_cpu()[0]
    plain = session.run([out_name], {in_name: x})[0]
    parity = float(np.max(np.abs(bound.astype(np.float64) - plain.astype(np.float64)))) if bound.size else 0.0
    return run, first_ms, parity


# --- targets from a run folder or from files ------------------------------------------------


def _sample_shape(path: Path, model) -> tuple[int, ...]:
    inputs = io_signature(model)["inputs"]
    if len(inputs) != 1:
        raise BenchError(f"{path}: bench times single-input models, this one has {len(inputs)} inputs")
    dims = inputs[0]["shape"][1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise BenchError(f"{path}: input {inputs[0]['name']} needs a fixed per-sample shape, got {inputs[0]['shape']}")
    return tuple(dims)


def run_targets(run_dir: Path, variants: Sequence[str] | None = None,
                engine_names: Sequence[str] = (engines.ONNXRUNTIME,)) -> list:
    """Every artifact of the run's manifest (or the named `variants`), checked against its recorded hash, per engine."""
    run_dir = Path(run_dir)
    manifest = artifacts.read_manifest(run_dir)
    records = manifest.get("artifacts") or {}
    if not records:
        raise RunFolderError(f"{run_dir}: the manifest lists no exported artifacts: run `pipeline export --run {shlex.quote(str(run_dir))}` first")
    if variants:
        missing = [v for v in variants if v not in records]
        if missing:
            raise BenchError(f"{run_dir}: no artifact named {', '.join(missing)} (the manifest has {', '.join(records)})")
        records = {name: records[name] for name in variants}
    targets = []
    for name, record in records.items():
        path = run_dir / record["file"]
        model = load_model(path)
        digest = artifacts.sha256_file(path)
        if record.get("sha256") and record["sha256"] != digest:
            raise ModelIntegrityError(f"{path}: sha256 {digest[:12]} differs from the manifest's {record['sha256'][:12]}: "
                             "the file changed after it was recorded")
        target = OnnxTarget(name=name, path=path, kind=record.get("kind", name), runtime=dict(record.get("runtime") or {}),
                            sha256=digest, input_shape=_sample_shape(path, model))
        targets += _per_engine(target, engine_names)
    return targets


def file_targets(paths: Sequence[Path], engine_names: Sequence[str] = (engines.ONNXRUNTIME,)) -> list:
    """ONNX files given directly: default ORT settings, named by file name."""
    targets, names = [], set()
    for path in map(Path, paths):
        model = load_model(path)
        name = path.name.removesuffix(".onnx")
        while name in names:
            name += "'"
        names.add(name)
        targets += _per_engine(OnnxTarget(name=name, path=path, kind="file", sha256=artifacts.sha256_file(path),
                                          input_shape=_sample_shape(path, model)), engine_names)
    return targets


# Artifacts another engine may run: single-output deterministic classifiers (not the MC dropout model).
OTHER_ENGINE_KINDS = ("fp32", "int8", "fp16", "file")


def _per_engine(target: OnnxTarget, engine_names: Sequence[str]) -> list:
    """The ORT target and, for every other engine asked for, the same file under that engine."""
    out = [target] if engines.ONNXRUNTIME in engine_names else []
    for engine in engine_names:
        if engine != engines.ONNXRUNTIME and target.kind in OTHER_ENGINE_KINDS:
            out.append(engines.OpenVinoTarget(name=target.name, path=target.path, kind=target.kind, sha256=target.sha256,
                                              input_shape=target.input_shape, engine=engine))
    return out


# --- timing -----------------------------------------------------------------------------------


def inputs_for(shape: tuple[int, ...], batch: int, seed: int) -> np.ndarray:
    """Seeded standard-normal inputs, like normalised images: the same array for every target of a group."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *shape), dtype=np.float32)


# --- one benchmark --------------------------------------------------------------------------


@dataclass
class BenchResult:
    config: BenchConfig
    environment: dict
    targets: list[dict]
    records: list[dict]
    thread_choices: list[dict]
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def ok(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "ok"]

    def to_json(self) -> dict:
        """This benchmark alone as a bench.json document (`merge` adds it to an existing one)."""
        created = artifacts.now_iso()
        invocation = {"created": created, "config": to_dict(self.config), "environment": self.environment,
                      "seconds": self.seconds}
        return {"schema": BENCH_SCHEMA, **invocation, "targets": self.targets, "thread_choices": self.thread_choices,
                "records": [{**r, "created": created} for r in self.records], "summary": summary(self.records),
                "invocations": [invocation], **self.extra}


def _record(target, provider: str, batch: int, threads: int | None, threads_source: str, status: str, **rest) -> dict:
    return {"artifact": target.name, "kind": target.kind, "engine": target.engine, "provider": provider,
            "provider_name": runtime.PROVIDERS.get(provider, provider), "batch": batch, "threads": threads,
            "threads_source": threads_source, "status": status, "reason": rest.pop("reason", None), **rest}


def _open(target, provider, batch, threads, config, x, source):
    """(slot, None) or (None, record of why not)."""
    try:
        return target.open(provider, batch, threads, config, x), None
    except DeviceError as exc:
        return None, _record(target, provider, batch, threads, source, "unavailable", reason=str(exc))
    except (PipelineError, *_ORT_ERRORS, RuntimeError, ValueError) as exc:
        first = " ".join(str(exc).split())[:300]
        return None, _record(target, provider, batch, threads, source, "failed", reason=f"{type(exc).__name__}: {first}")


def _probe_threads(target: OnnxTarget, provider: str, batch: int, config: BenchConfig, cores: int) -> dict:
    """Time `target` at 1 thread and at all usable cores, interleaved, briefly; choose the faster p50."""
    x = inputs_for(target.input_shape, batch, config.seed)
    probe = dataclasses.replace(config, batch_sizes=(batch,), providers=(provider,), threads=None, runs=None,
                                duration=PROBE_SECONDS, rounds=2, warmup=5, warmup_seconds=0.3)
    slots = {}
    for threads in sorted({1, cores}):
        slot, _ = _open(target, provider, batch, threads, probe, x, "probe")
        if slot is not None:
            slots[threads] = slot
    if not slots:
        return {"provider": provider, "batch": batch, "chosen": 1, "by": "fallback: the probe could not open a session"}
    time_interleaved(list(slots.values()), probe)
    p50 = {t: summarize(s.latencies_ns, batch)["latency_ms"]["p50"] for t, s in slots.items()}
    chosen = min(p50, key=p50.get)
    return {"provider": provider, "batch": batch, "artifact": target.name,
            "candidates_p50_ms": {str(t): v for t, v in p50.items()}, "chosen": chosen,
            "by": f"probe ({PROBE_SECONDS:.1f} s, interleaved): the lower p50"}


def _thread_plan(targets, provider: str, batch: int, config: BenchConfig, cores: int) -> tuple[list[int], str, dict | None]:
    """(thread counts, how they were chosen, probe record)."""
    if config.threads is not None:
        return list(config.threads), "option", None
    onnx_targets = [t for t in targets if t.engine == "onnxruntime"]
    if cores > 1 and provider == "cpu" and onnx_targets:
        # Measured, not assumed: at batch 1 a tiny CNN is usually fastest on one thread (no fork/join),
        # and on a shared machine even large batches can lose from a second thread.
        choice = _probe_threads(onnx_targets[0], provider, batch, config, cores)
        return [choice["chosen"]], "auto (probe)", choice
    if batch == 1:
        return [1], "auto (batch 1: one thread)", None
    return [cores], "auto (all usable cores)", None


def vet_engines(targets: Sequence, reference: engines.Reference | None) -> tuple[list, dict, list[dict]]:
    """(targets that may be timed, {id(target): (status, reason, extra)} of the others, agreement records).

    ONNX Runtime pairs are the reference (fp32) or passed the export's accuracy gate against it
    (int8, fp16) and run as timed. Every other engine's pair is run on the reference's real test
    images first: one that is not installed is "unavailable", one that disagrees is "refused".
    """
    keep, held, checks = [], {}, []
    for target in targets:
        if target.engine in (engines.ONNXRUNTIME, "torch"):
            keep.append(target)
            continue
        ok, reason = engines.available(target.engine)
        if not ok:
            held[id(target)] = ("unavailable", reason, {})
            continue
        if reference is None:
            held[id(target)] = ("refused", f"{target.engine} needs the agreement check on real test images: "
                                           "bench it with --run RUN", {})
            continue
        check = engines.checked(target, reference)
        checks.append({"artifact": target.name, "engine": target.engine, **check})
        if check["passed"]:
            keep.append(target)
        else:
            held[id(target)] = ("refused", check["reason"], {"agreement": check})
    return keep, held, checks


def benchmark(targets: Sequence, config: BenchConfig, on_group: Callable[[str], None] | None = None,
              reference: engines.Reference | None = None) -> BenchResult:
    """Time every target for every provider, batch size and thread count of `config`.

    Pairs of engines other than ONNX Runtime are checked against `reference` first (`vet_engines`).
    """
    started = time.perf_counter()
    unavailable = {p: runtime.provider_available(p)[1] for p in config.providers if not runtime.provider_available(p)[0]}
    if config.require_provider and unavailable:
        raise DeviceError(f"--require-provider: {'; '.join(unavailable.values())}")
    timed, held, checks = vet_engines(targets, reference)
    cores = usable_cores()
    records, choices = [], []
    for provider in config.providers:
        for batch in config.batch_sizes:
            records += [_record(t, provider, batch, None, "none", held[id(t)][0], reason=held[id(t)][1], **held[id(t)][2])
                        for t in targets if id(t) in held]
            group = list(timed)
            if provider in unavailable:
                # No session is opened: ORT would warn and run on the CPU under the provider's name.
                # Other engines (the torch baseline) decide for themselves in `open`.
                records += [_record(t, provider, batch, None, "none", "unavailable", reason=unavailable[provider])
                            for t in timed if t.engine == "onnxruntime"]
                group = [t for t in timed if t.engine != "onnxruntime"]
                if not group:
                    continue
            threads_list, source, choice = _thread_plan(group, provider, batch, config, cores)
            if choice is not None:
                choices.append(choice)
            for threads in threads_list:
                if on_group is not None:
                    on_group(f"{provider} batch {batch} threads {threads}")
                records += _measure_group(group, provider, batch, threads, source, config)
    passed = {(c["artifact"], c["engine"]): c for c in checks if c["passed"]}
    for r in records:
        if r["status"] == "ok" and (r["artifact"], r["engine"]) in passed:
            r["agreement"] = passed[(r["artifact"], r["engine"])]
    add_speedups(records)
    result = BenchResult(config=config, environment=environment(), targets=[t.describe() for t in targets],
                         records=records, thread_choices=choices, seconds=time.perf_counter() - started)
    if checks:
        result.extra["agreement"] = checks
    return result


def _measure_group(targets, provider, batch, threads, source, config) -> list[dict]:
    inputs = {}
    opened, records = [], []
    for target in targets:
        shape = tuple(target.input_shape)
        if shape not in inputs:
            inputs[shape] = inputs_for(shape, batch, config.seed)
        slot, failure = _open(target, provider, batch, threads, config, inputs[shape], source)
        if failure is not None:
            records.append(failure)
        else:
            opened.append((target, slot))
    try:
        time_interleaved([slot for _, slot in opened], config)
    finally:
        for _, slot in opened:
            slot.close()
    for target, slot in opened:
        stats = summarize(slot.latencies_ns, batch)
        records.append(_record(target, provider, batch, threads, source, "ok", **slot.info, warmup_runs=slot.warmup_runs,
                               stopped_by=slot.stopped_by, timed_seconds=slot.timed_seconds,
                               round_p50_ms=round_medians(slot), **stats))
    return records


def add_speedups(records: list[dict]) -> None:
    """`speedup_vs_torch` = torch p50 / this p50, for records timed in the same group as the torch baseline."""
    torch_p50 = {(r["provider"], r["batch"], r["threads"]): r["latency_ms"]["p50"]
                 for r in records if r["status"] == "ok" and r["engine"] == "torch"}
    for r in records:
        key = (r["provider"], r["batch"], r["threads"])
        if r["status"] == "ok" and r["engine"] != "torch" and key in torch_p50:
            r["torch_p50_ms"] = torch_p50[key]
            r["speedup_vs_torch"] = torch_p50[key] / r["latency_ms"]["p50"]


def summary(records: list[dict]) -> dict:
    """The headline numbers: fastest target per (provider, batch), ORT/torch ratios, unavailable providers."""
    out: dict = {"fastest": {}, "speedup_vs_torch": {}, "unavailable": {}}
    for r in records:
        if r["status"] == "unavailable":
            out["unavailable"][r["provider"] if r["engine"] in ("onnxruntime", "torch") else r["engine"]] = r["reason"]
        if r["status"] != "ok":
            continue
        key = f"{r['provider']}/batch{r['batch']}"
        best = out["fastest"].get(key)
        if best is None or r["latency_ms"]["p50"] < best["p50_ms"]:
            out["fastest"][key] = {"artifact": r["artifact"], "engine": r["engine"], "threads": r["threads"],
                                   "p50_ms": r["latency_ms"]["p50"]}
        if "speedup_vs_torch" in r:
            out["speedup_vs_torch"][f"{r['artifact']}/{key}/threads{r['threads']}"] = r["speedup_vs_torch"]
    return out


# --- environment ------------------------------------------------------------------------------

# ISA features that choose ORT's and torch's kernels (x86 and ARM spellings).
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "vnni", "bmi", "popcnt", "asimd", "sve", "neon",
                 "fp16", "fphp", "dotprod", "i8mm", "bf16")


def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = sorted({f for f in value.split() if f.startswith(_ISA_PREFIXES)})
    return model, flags


def environment() -> dict:
    """The machine and software the numbers belong to. Versions are read without importing torch."""
    model, flags = _cpu_info()
    # The module really running, not pip's record: an onnxruntime-gpu unpacked on PYTHONPATH shadows
    # an installed onnxruntime whose metadata would otherwise be reported (seen on the GPU machine).
    versions = {**artifacts.versions(), "onnxruntime": ort.__version__}
    return {"cpu_model": model, "cpu_flags": flags, "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "versions": versions, "onnxruntime_providers": ort.get_available_providers(),
            "onnxruntime_device": ort.get_device(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# The bench.json contract (schema 2; README "bench.json"). `schema_problems` is what tests and
# downstream readers check a file against.
TOP_KEYS = ("schema", "created", "config", "environment", "targets", "thread_choices", "records", "summary", "seconds",
            "invocations")
INVOCATION_KEYS = ("created", "config", "environment", "seconds")
ENVIRONMENT_KEYS = ("cpu_model", "cpu_flags", "logical_cores", "usable_cores", "platform", "python", "versions",
                    "onnxruntime_providers")
VERSION_KEYS = ("torch", "onnx", "onnxruntime")
RECORD_KEYS = ("artifact", "kind", "engine", "provider", "provider_name", "batch", "threads", "threads_source", "status",
               "reason")
TIMED_KEYS = ("session_providers", "session_create_ms", "first_run_ms", "optimization_level", "io_binding", "warmup_runs",
              "runs", "stopped_by", "latency_ms", "cv", "throughput_ips")
LATENCY_KEYS = ("p50", "p90", "p99", "mean", "std", "min", "max")
STATUSES = ("ok", "unavailable", "failed", "refused")


def schema_problems(doc: dict) -> list[str]:
    """Everything in a bench.json document that breaks the schema; [] when it conforms."""
    problems = [f"missing top-level key {k!r}" for k in TOP_KEYS if k not in doc]
    if doc.get("schema") != BENCH_SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, expected {BENCH_SCHEMA}")
    env = doc.get("environment", {})
    problems += [f"environment lacks {k!r}" for k in ENVIRONMENT_KEYS if k not in env]
    problems += [f"environment.versions lacks {k!r}" for k in VERSION_KEYS if k not in env.get("versions", {})]
    invoked = {i.get("created") for i in doc.get("invocations", [])}
    keys = [record_key(r) for r in doc.get("records", [])]
    if len(set(keys)) != len(keys):
        problems.append("two records of one (artifact, engine, provider, batch, threads)")
    for i, r in enumerate(doc.get("records", [])):
        where = f"records[{i}] ({r.get('artifact')}, {r.get('provider')}, batch {r.get('batch')})"
        problems += [f"{where} lacks {k!r}" for k in (*RECORD_KEYS, "created") if k not in r]
        if "created" in r and r["created"] not in invoked:
            problems.append(f"{where} was created {r['created']}, by no benchmark listed in invocations")
        if r.get("status") not in STATUSES:
            problems.append(f"{where} has status {r.get('status')!r}")
        elif r["status"] == "ok":
            problems += [f"{where} lacks {k!r}" for k in TIMED_KEYS if k not in r]
            problems += [f"{where} lacks latency_ms.{k}" for k in LATENCY_KEYS if k not in r.get("latency_ms", {})]
        else:
            if not r.get("reason"):
                problems.append(f"{where} is {r['status']} without a reason")
            if "latency_ms" in r:
                problems.append(f"{where} is {r['status']} but carries timings")
    return problems


# --- bench.json accumulates: a benchmark adds to the results, it never replaces the file ------

RECORD_KEY = ("artifact", "engine", "provider", "batch", "threads")


def record_key(record: dict) -> tuple:
    """What one measurement is of; a later measurement of the same key replaces it (history kept)."""
    return tuple(record.get(k) for k in RECORD_KEY)


def read_bench(path: Path) -> dict | None:
    """The bench.json at `path`, None when there is none; `BenchError` when it cannot be merged into.

    An unreadable file is refused rather than overwritten: the results in it may be all the user has.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: unreadable ({exc}); move it away or pass --out DIR, it is not overwritten") from None
    if not isinstance(doc, dict) or doc.get("schema") not in READABLE_SCHEMAS or not isinstance(doc.get("records"), list):
        raise BenchError(f"{path}: not a bench.json of schema {' or '.join(map(str, READABLE_SCHEMAS))}; "
                         "move it away or pass --out DIR, it is not overwritten")
    return doc


def _past(record: dict) -> dict:
    """A replaced record, as one history entry."""
    entry = {"created": record.get("created"), "status": record.get("status")}
    if record.get("status") == "ok":
        entry["p50_ms"] = record["latency_ms"]["p50"]
        entry["runs"] = record.get("runs")
    else:
        entry["reason"] = record.get("reason")
    return entry


def merge(old: dict | None, new: dict) -> dict:
    """The document `new` (one benchmark) added to `old` (what bench.json held).

    Records are keyed by (artifact, engine, provider, batch, threads). A new timing replaces only
    the old record of its key; the old one's `created`, status and p50 go into the new record's
    `history`. A new record that timed nothing (unavailable, failed) never replaces a timed one:
    the timed one stays, with the attempt noted in `last_attempt`. Every record carries the
    `created` of the benchmark that made it, and `invocations` keeps the config and environment
    of every benchmark a record still comes from.
    """
    if old is None:
        return new
    created = new["created"]
    merged = {record_key(r): {"created": old.get("created"), **r} for r in old["records"]}
    for r in new["records"]:
        key, record = record_key(r), dict(r)
        previous = merged.get(key)
        if previous is not None and previous.get("status") == "ok" and record["status"] != "ok":
            previous["last_attempt"] = {"created": created, "status": record["status"], "reason": record["reason"]}
            continue
        if previous is not None:
            record["history"] = ([_past(previous)] + list(previous.get("history", [])))[:HISTORY_LIMIT]
        merged[key] = record
    records = list(merged.values())
    targets = {(t.get("artifact"), t.get("engine")): t for t in [*old.get("targets", []), *new["targets"]]}
    choices = {(c.get("provider"), c.get("batch"), c.get("artifact")): c
               for c in [*old.get("thread_choices", []), *new["thread_choices"]]}
    invocations = [*old.get("invocations", [{k: old.get(k) for k in INVOCATION_KEYS}]), *new["invocations"]]
    used = {r["created"] for r in records} | {h.get("created") for r in records for h in r.get("history", [])}
    extra = {k: v for k, v in old.items() if k not in TOP_KEYS}
    return {**extra, **new, "records": records, "targets": list(targets.values()), "thread_choices": list(choices.values()),
            "summary": summary(records), "invocations": [i for i in invocations if i.get("created") in used]}


def publish(result: BenchResult, folder: Path, label: str) -> tuple[dict, Path, Path]:
    """Merge `result` into `folder`/bench.json and redraw bench.png (titled `label`) from the merged records.

    A benchmark that timed nothing changes no file: it raises `outcome_error` (a provider that is
    missing must not wipe the CPU results measured a minute earlier). Both files are written to
    temporary names and renamed only when both are ready, so a failure leaves the old pair.
    Returns (merged document, json path, png path); the caller raises `outcome_error` after presenting.
    """
    from pipeline.report import plot_latency

    if not result.ok():
        raise outcome_error(result.records)
    folder = Path(folder)
    title = f"{label}: ONNX Runtime {result.environment['versions']['onnxruntime']}, {result.environment['cpu_model']}"
    json_path, png_path = folder / BENCH_JSON, folder / BENCH_PNG
    doc = merge(read_bench(json_path), result.to_json())
    with artifacts.atomic_path(json_path) as json_tmp, artifacts.atomic_path(png_path) as png_tmp:
        json_tmp.write_text(json.dumps(doc, indent=2) + "\n")
        plot_latency(doc["records"], png_tmp, title)
    return doc, json_path, png_path


def outcome_error(records: Sequence[dict]) -> PipelineError | None:
    """Why a benchmark with these records must not exit 0, or None.

    Nothing timed: `DeviceError` (exit 6) when every failure is an unavailable provider, else
    `BenchError`. Something timed: a `failed` record is a `BenchError`; an `unavailable` one is
    fine, since another provider the user listed beside it ran, and so is a `refused` one (an
    engine whose outputs disagreed with ONNX Runtime fp32: a verdict, reported, not a crash).
    """
    timed = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] == "failed"]
    unavailable = [r for r in records if r["status"] == "unavailable"]
    if not timed:
        not_run = failed + [r for r in records if r["status"] == "refused"]
        if not_run or not unavailable:
            reasons = "; ".join(dict.fromkeys(f"{r['artifact']}: {r['reason']}" for r in not_run)) or "no measurement"
            return BenchError(f"nothing was timed ({reasons}); no file was changed")
        reasons = "; ".join(dict.fromkeys(f"{r['provider']}: {r['reason']}" for r in unavailable))
        return DeviceError(f"nothing was timed: {reasons}; no file was changed")
    if failed:
        which = ", ".join(dict.fromkeys(f"{r['artifact']}@{r['provider']}/batch{r['batch']}" for r in failed))
        return BenchError(f"{len(failed)} of {len(records)} measurements failed ({which}: {failed[0]['reason']}); "
                          "the ones that ran are in bench.json")
    return None


def output_folder(folder: Path, hint: str) -> Path:
    """`folder`, created if need be; `RunFolderError` (exit 4, with `hint`) when it cannot be made or written.

    Called before any timing, so a read-only run folder costs no benchmark (and loses no --json output).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create {folder} ({exc.strerror}): {hint}") from None
    artifacts.check_writable(folder, hint)
    return folder


def check_targets(targets: Sequence) -> None:
    if not targets:
        raise BenchError("nothing to benchmark: give --run RUN or one or more .onnx files")


__all__ = ["BENCH_JSON", "BENCH_PNG", "BenchError", "BenchResult", "ModelFileError", "OnnxTarget", "Slot",
           "benchmark", "check_targets", "environment", "file_targets", "inputs_for", "merge", "outcome_error", "publish",
           "output_folder", "read_bench", "run_targets", "schema_problems", "summarize", "time_interleaved"]
