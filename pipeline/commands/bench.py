"""`pipeline bench`: options -> BenchConfig -> bench.benchmark (+ torch baseline, + dropout comparison)
-> rich table, bench.json and bench.png."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.options import console, int_list


def _threads(text: str) -> tuple[int, ...] | None:
    return None if text.strip().lower() == "auto" else int_list(text, "--threads")


def bench(
    files: Annotated[Optional[list[Path]], typer.Argument(
        help=".onnx files to time directly (default ORT settings).")] = None,
    run: Annotated[Optional[Path], typer.Option(
        help="Run folder: time every artifact in its manifest, with its runtime settings.")] = None,
    variants: Annotated[str, typer.Option(help="Only these artifacts of the run, comma-separated (default: all).")] = "",
    provider: Annotated[list[str], typer.Option(
        help="Execution provider: cpu, cuda, tensorrt. Repeat for several.")] = ["cpu"],  # noqa: B006
    engine: Annotated[str, typer.Option(
        help="Inference engines, comma-separated: onnxruntime, openvino (optional extra), openvino-bf16. "
             "Pairs of other engines must agree with ONNX Runtime fp32 on the run's test images first. "
             "Default: onnxruntime plus every engine the run's deployments name.")] = "",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,16,256",
    threads: Annotated[str, typer.Option(
        help="Intra-op threads, comma-separated, or 'auto' (a probe picks 1 or all cores per batch).")] = "auto",
    optimization_level: Annotated[Optional[str], typer.Option(
        help="disable, basic, extended or all for every session (default: each artifact's runtime setting).")] = None,
    warmup: Annotated[int, typer.Option(help="Warm-up runs after the first run (bounded by 1 s).")] = 10,
    runs: Annotated[Optional[int], typer.Option(help="Timed runs per measurement (default: time for --duration).")] = None,
    duration: Annotated[float, typer.Option(help="Seconds of timed runs per measurement, when --runs is not given.")] = 0.6,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds the timed runs are split into.")] = 3,
    time_limit: Annotated[float, typer.Option(help="Hard limit in seconds on one measurement's timed runs.")] = 20.0,
    io_binding: Annotated[bool, typer.Option(
        help="Bind input and output once on the provider's device (OrtValues) instead of copying per run.")] = False,
    require_provider: Annotated[bool, typer.Option(
        help="Fail when a requested provider is unavailable, instead of reporting it.")] = False,
    baseline: Annotated[bool, typer.Option(
        help="Also time the PyTorch model (eval, inference_mode) of the run's checkpoint.")] = True,
    compare: Annotated[Optional[Path], typer.Option(
        help="A run of the same architecture trained without dropout: answer what dropout costs.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for bench.json and bench.png (default: the run folder, or the first file's folder).")] = None,
    record_deployments: Annotated[bool, typer.Option(
        help="With --run: write the fastest timed (artifact, engine) per batch size to the manifest's deployments.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print bench.json to stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table; print only where bench.json went.")] = False,
) -> None:
    """Time ONNX Runtime sessions per artifact, provider, batch size and thread count.

    Reports session creation, first run, p50/p90/p99/mean/std/min latency, throughput, the
    coefficient of variation and the providers the session really used. A provider this
    onnxruntime build lacks is reported as unavailable, never timed (--require-provider: an error).
    """
    import json

    from pipeline import artifacts
    from pipeline import bench as bench_stage
    from pipeline.config import BenchConfig
    from pipeline.errors import ConfigError

    config = BenchConfig(providers=tuple(provider), engines=_engines(engine, run), batch_sizes=int_list(batch_sizes, "--batch-sizes"),
                         threads=_threads(threads), optimization_level=optimization_level, warmup=warmup, runs=runs,
                         duration=duration, rounds=rounds, time_limit=time_limit, io_binding=io_binding,
                         require_provider=require_provider, baseline=baseline)
    if run is not None and files:
        raise ConfigError("give either --run RUN or .onnx files, not both")
    if compare is not None and run is None:
        raise ConfigError("--compare needs --run (the run trained with dropout)")
    if run is not None:
        artifacts.read_manifest(run)  # a missing or unfinished run is refused before any folder is made
    else:
        bench_stage.check_targets(files or [])
    # Before any timing: a folder that cannot take the results (read-only: exit 4, with where else to write).
    hint = "pass --out DIR to write bench.json and bench.png elsewhere"
    folder = bench_stage.output_folder(out or (run if run is not None else Path(files[0]).parent), hint)
    # One writer per folder for the whole benchmark: an export would swap the run folder under it
    # (publishing a copy without these results), and a second bench would merge into the same bench.json.
    lock = folder.resolve()
    with artifacts.run_writer(lock, hint):
        targets = (bench_stage.run_targets(run, int_list_names(variants), config.engines) if run is not None
                   else bench_stage.file_targets(files or [], config.engines))
        bench_stage.check_targets(targets)
        bench_stage.read_bench(folder / bench_stage.BENCH_JSON)  # one that cannot be merged into: refused now
        reference = None
        others = [t for t in targets if t.engine not in ("onnxruntime", "torch")]
        if run is not None and others:
            from pipeline import engines

            if any(engines.available(t.engine)[0] for t in others):
                with console.status("bench: ONNX Runtime fp32 on the run's test images (the agreement reference)"):
                    reference = engines.reference_for_run(run)
        if run is not None and baseline:
            from pipeline.baseline import run_baseline

            torch_target = run_baseline(run)
            if torch_target is not None:
                targets.append(torch_target)

        with console.status("bench") as status:
            result = bench_stage.benchmark(targets, config, on_group=lambda g: status.update(f"bench: {g}"),
                                           reference=reference)
            if compare is not None and result.ok():
                from pipeline import dropout_cost

                status.update(f"bench: dropout comparison against {compare}")
                result.extra["dropout"] = dropout_cost.compare(run, compare, config)
        if run is not None and record_deployments:
            _record_deployments(run, result, held=Path(run).resolve() == lock)
        doc, json_path, png_path = bench_stage.publish(result, folder, str(run or "files"))
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
    if not quiet:
        _show(result)
    if run is not None:
        _show_followed(run, config)
    console.print(f"wrote {json_path} and {png_path} ({result.seconds:.1f} s; {len(doc['records'])} records in all)")
    problem = bench_stage.outcome_error(result.records)
    if problem is not None:
        raise problem


def _engines(text: str, run: Path | None) -> tuple[str, ...]:
    """The --engine list, or onnxruntime plus the engines the run's deployments name (bench follows them)."""
    if text.strip():
        return tuple(int_list_names(text))
    named = []
    if run is not None:
        from pipeline import artifacts, deployments

        named = [d.engine for d in deployments.read(artifacts.read_manifest(run))]
    return tuple(dict.fromkeys(["onnxruntime", *named]))


def _record_deployments(run: Path, result, held: bool = False) -> None:
    """The fastest timed pair per batch size into the manifest, under the run's one-writer lock (a stage
    publishing its staged copy at the same time would otherwise swap this update away); `held`: this
    process holds it already (bench into the run folder itself)."""
    import contextlib

    from pipeline import artifacts, deployments

    new = deployments.from_records(result.records, "bench", artifacts.now_iso())
    if not new:
        return
    try:
        with contextlib.nullcontext() if held else artifacts.run_writer(run):
            artifacts.update_manifest(run, lambda m: m.__setitem__(
                "deployments", deployments.merged(m.get("deployments") or [], new)))
    except artifacts.RunFolderError as exc:
        console.print(f"[yellow]note:[/] deployments not recorded in the manifest: {exc}")
        return
    result.extra["deployments"] = [d.to_dict() for d in new]


def _show_followed(run: Path, config) -> None:
    """Per batch size, what the manifest's deployments say to run here (and a one-line note when it cannot be)."""
    from pipeline import artifacts, deployments, engines

    manifest = artifacts.read_manifest(run)
    for batch in config.batch_sizes:
        choice = deployments.follow(manifest, batch, engines.available)
        if choice.note:
            console.print(f"[yellow]note:[/] {choice.note}")
        elif choice.deployment is not None:
            d = choice.deployment
            console.print(f"deployment for batch {batch}: {d.artifact} on {d.engine} ({d.threads} threads), "
                          f"p50 {_ms(d.p50_ms)} ms at batch {d.batch}, {d.ratio_to_fp32 or float('nan'):.2f}x fp32 "
                          f"({d.measured}, {d.created})")


def int_list_names(text: str) -> list[str]:
    return [part for part in text.replace(" ", "").split(",") if part]


def _label(record: dict) -> str:
    """The artifact, and the engine when it is not ONNX Runtime (the torch baseline names itself)."""
    return record["artifact"] if record["engine"] in ("onnxruntime", "torch") else f"{record['artifact']} ({record['engine']})"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _show(result) -> None:
    from rich.table import Table

    env = result.environment
    load = f", load {env['load_average'][0]:.1f}" if env.get("load_average") else ""
    table = Table(title=f"{env['cpu_model']}, {env['usable_cores']} cores, onnxruntime {env['versions']['onnxruntime']}, "
                        f"torch {env['versions']['torch']}{load} (times in ms)")
    # Session creation, first run, mean and min are in bench.json; the table keeps what people compare.
    for column in ("artifact", "prov", "batch", "thr", "p50", "p90", "p99", "cv", "img/s", "vs torch", "ran on"):
        table.add_column(column, justify="left" if column in ("artifact", "prov", "ran on") else "right", no_wrap=True)
    for r in result.records:
        if r["status"] != "ok":
            continue
        lat = r["latency_ms"]
        speedup = f"{r['speedup_vs_torch']:.1f}x" if "speedup_vs_torch" in r else ""
        table.add_row(_label(r), r["provider"], str(r["batch"]), f"{r['threads']}", _ms(lat["p50"]), _ms(lat["p90"]),
                      _ms(lat["p99"]), f"{r['cv']:.2f}", f"{r['throughput_ips']:,.0f}", speedup,
                      ",".join(p.replace("ExecutionProvider", "") for p in r["session_providers"]))
    console.print(table)
    unavailable = {}
    for r in result.records:
        if r["status"] != "ok":
            name = r["provider"] if r["engine"] in ("onnxruntime", "torch") else r["engine"]
            unavailable.setdefault((name, r["status"], r["reason"]), []).append(f"{r['artifact']}@{r['batch']}")
    for (name, status, reason), which in unavailable.items():
        if status == "unavailable" and name in ("openvino", "openvino-bf16"):
            console.print(f"[yellow]{reason}[/]")  # one line: the engine is not installed, nothing else changes
            continue
        console.print(f"[yellow]{name}: {status}, not timed[/] ({', '.join(which)}): {reason}")
    for choice in result.thread_choices:
        console.print(f"threads at {choice['provider']} batch {choice['batch']}: {choice['chosen']} "
                      f"({choice['by']}; p50 ms by threads {choice.get('candidates_p50_ms')})")
    dropout = result.extra.get("dropout")
    if dropout:
        console.print(f"[bold]dropout compute question[/]: {dropout['answer']}")
