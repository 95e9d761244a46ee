"""`pipeline run`: data -> train -> export (audited) -> quantize -> bench, then a summary read back from the files.

The README's main job in one command (`make demo` wraps it). Each stage is the same workflow
call its own command makes (`workflow.train_run`, `export_run`, `quantize_run`, the bench
stage); this module only sequences them, times them, and summarizes. The summary is built
from manifest.json and bench.json as written, never from in-memory results, so what it says
is what the files say.

With `--dropout-twin` (the default) the same architecture is also trained and exported with
dropout 0, and bench answers the dropout compute question (op histograms, interleaved
latency, training time) into bench.json's `dropout` section.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.options import (
    IMAGE_SIZE_HELP,
    CacheDir,
    DecodeEta,
    OnBadImage,
    Resize,
    StridedFirstConv,
    console,
    image_size,
    int_list,
)
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, Interrupted, RunFolderError

TWIN_SUFFIX = "-dropout0"


def run(
    dataset: Annotated[str, typer.Option(help="digits (bundled), idx, folder or npz (see `pipeline train --help`).")] = "digits",
    data_dir: Annotated[Optional[Path], typer.Option(help="The IDX folder, image folder or .npz file.")] = None,
    image_size_text: Annotated[Optional[str], typer.Option("--image-size", help=IMAGE_SIZE_HELP)] = None,
    resize: Resize = "squash",
    on_bad_image: OnBadImage = "fail",
    cache_dir: CacheDir = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder. Default: models/digits, or models/<data folder name>.")] = None,
    force: Annotated[bool, typer.Option(help="Replace existing run folders (kept until the new training completes).")] = False,
    epochs: Annotated[int, typer.Option(help="Maximum epochs; early stopping may end sooner (as `pipeline train`).")] = TrainConfig.epochs,
    dropout: Annotated[float, typer.Option(help="Dropout rate before each fully connected layer.")] = 0.5,
    conv_channels: Annotated[str, typer.Option(help="Conv block widths, comma-separated.")] = "32,64",
    fc_units: Annotated[str, typer.Option(help="Hidden fully connected units, comma-separated.")] = "128",
    strided_first_conv: StridedFirstConv = None,
    patience: Annotated[int, typer.Option(help="Early stopping patience in epochs (0 disables).")] = TrainConfig.patience,
    seed: Annotated[int, typer.Option(help="Seed of splits, initialisation, shuffling and dropout masks.")] = 0,
    dropout_twin: Annotated[bool, typer.Option(help="Also train and export the dropout-0 twin and measure what dropout "
                                                    "costs (inference and training).")] = True,
    batch_sizes: Annotated[str, typer.Option(help="Bench batch sizes, comma-separated.")] = "1,64",
    bench_seconds: Annotated[float, typer.Option(help="Timed seconds per bench measurement.")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Train -> export --quantize -> bench in one command, ending with a summary.

    The summary (fp32 and int8 accuracy, sizes, latencies, the dropout audit verdict, the
    recommended variant) is read back from manifest.json and bench.json.
    """
    from pipeline.config import BenchConfig, DataConfig, ExportConfig, ModelConfig, QuantizeConfig
    from pipeline.workflow import default_run_dir

    data_config = DataConfig(dataset=dataset, data_dir=data_dir, image_size=image_size(image_size_text), resize=resize,
                             on_bad_image=on_bad_image, cache_dir=cache_dir, seed=seed)
    model_config = ModelConfig(conv_channels=int_list(conv_channels, "--conv-channels"),
                               fc_units=int_list(fc_units, "--fc-units"), dropout=dropout,
                               strided_first_conv=strided_first_conv)
    train_config = TrainConfig(epochs=epochs, patience=patience, seed=seed)
    bench_config = BenchConfig(batch_sizes=int_list(batch_sizes, "--batch-sizes"), duration=bench_seconds)
    if dropout_twin and dropout == 0:
        raise ConfigError("--dropout 0 has no dropout to compare: pass --no-dropout-twin or a rate above 0")
    run_dir = out or default_run_dir(data_config)
    twin_dir = run_dir.with_name(run_dir.name + TWIN_SUFFIX) if dropout_twin else None
    for folder in (run_dir, twin_dir):
        if folder is not None and folder.exists() and not force:
            raise RunFolderError(f"{folder} already exists: pass --force to replace it, or --out another folder")

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    from pipeline import data

    with console.status("run") as status, \
            data.reading(DecodeEta(lambda text, *_: status.update(f"run: {text}"))):
        def stage(name: str, fn, *args, **kwargs):
            status.update(f"run: {name}")
            t0 = time.perf_counter()
            try:
                value = fn(*args, **kwargs)
            except KeyboardInterrupt:
                raise Interrupted(f"during {name}: {_after_interrupt(name, run_dir, twin_dir)}") from None
            seconds[name] = round(time.perf_counter() - t0, 2)
            console.print(f"[green]done[/] {name} ({seconds[name]:.1f} s)")
            return value

        _pipeline(stage, run_dir, twin_dir, data_config, model_config, train_config,
                  ExportConfig(), QuantizeConfig(), bench_config, force)
    seconds["total"] = round(time.perf_counter() - started, 2)
    summary = summarize(run_dir, seconds)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        show(summary)


def _after_interrupt(stage: str, run_dir: Path, twin_dir: Path | None) -> str:
    """What an interrupted stage left, and the command that goes on from there (pasteable)."""
    from shlex import quote

    from pipeline import artifacts

    if stage.startswith("train"):
        return artifacts.after_interrupted_training(twin_dir if "twin" in stage else run_dir)
    if stage == "bench":
        compare = f" --compare {quote(str(twin_dir))}" if twin_dir is not None else ""
        return (f"bench.json is unchanged; `pipeline bench --run {quote(str(run_dir))}{compare}` measures again")
    folder, quantize = (twin_dir, "") if "twin" in stage else (run_dir, " --quantize")
    return (f"{folder} holds a finished training run; `pipeline export --run {quote(str(folder))}{quantize}` "
            "redoes the export")


def _pipeline(stage, run_dir: Path, twin_dir: Path | None, data_config, model_config, train_config,
              export_config, quantize_config, bench_config, force: bool) -> None:
    """The stages in order; each is the workflow call its own command makes."""
    import dataclasses

    from pipeline import artifacts, bench
    from pipeline.baseline import run_baseline
    from pipeline.workflow import export_run, quantize_run, train_run

    stage("train", train_run, data_config, model_config, train_config, run_dir, force=force)
    stage("export", export_run, run_dir, export_config)
    stage("quantize", quantize_run, run_dir, quantize_config)
    if twin_dir is not None:
        twin_model = dataclasses.replace(model_config, dropout=0.0, spatial_dropout=0.0)
        stage("train dropout-0 twin", train_run, data_config, twin_model, train_config, twin_dir, force=force)
        stage("export dropout-0 twin", export_run, twin_dir, export_config)

    def measure():
        with artifacts.run_writer(run_dir):  # as `pipeline bench`: no stage swaps the folder under it
            targets = bench.run_targets(run_dir)
            baseline = run_baseline(run_dir) if bench_config.baseline else None
            if baseline is not None:
                targets.append(baseline)
            result = bench.benchmark(targets, bench_config)
            if twin_dir is not None:
                from pipeline import dropout_cost

                result.extra["dropout"] = dropout_cost.compare(run_dir, twin_dir, bench_config)
            bench.publish(result, run_dir, str(run_dir))
        problem = bench.outcome_error(result.records)
        if problem is not None:
            raise problem

    stage("bench", measure)


# --- the summary, from the files ----------------------------------------------------------


def summarize(run_dir: Path, seconds: dict | None = None) -> dict:
    """What manifest.json and bench.json of `run_dir` say: per-variant accuracy, size, latency; audit; recommendation."""
    from pipeline import artifacts, bench

    manifest = artifacts.load_manifest(run_dir)
    bench_doc = json.loads((Path(run_dir) / bench.BENCH_JSON).read_text())
    latencies = _latencies(bench_doc["records"])
    variants = {}
    for name, record in manifest.artifacts.items():
        variants[name] = {"file": record.file, "bytes": record.bytes, "validation_accuracy": record.validation_accuracy,
                          "test_accuracy": record.test_accuracy, "p50_ms": latencies.get(name, {})}
    dropout = bench_doc.get("dropout")
    return {
        "run_dir": str(run_dir),
        "variants": variants,
        "torch_eager": {"test_accuracy": manifest.training.test_accuracy, "p50_ms": latencies.get("torch", {})},
        "dropout_audit": audit_verdict(manifest.artifacts["fp32"].verification),
        "recommended": manifest.recommended,
        "recommended_reason": manifest.recommended_reason,
        "dropout_compute": None if dropout is None else {"answer": dropout["answer"],
                                                         "op_histograms_identical": dropout["op_histograms_identical"],
                                                         "run_without": dropout["run_without"]},
        "bench": {"cpu": bench_doc["environment"].get("cpu_model"), "cores": bench_doc["environment"].get("usable_cores"),
                  "onnxruntime": bench_doc["environment"]["versions"].get("onnxruntime")},
        "files": {"manifest": str(Path(run_dir) / artifacts.MANIFEST), "bench": str(Path(run_dir) / bench.BENCH_JSON)},
        "seconds": seconds or {},
    }


def _latencies(records: list[dict]) -> dict:
    """{artifact: {batch: p50 ms}} over the CPU records that ran (PyTorch as "torch"); best thread count per batch."""
    out: dict = {}
    for r in records:
        if r["status"] != "ok" or r["provider"] != "cpu":
            continue
        by_batch = out.setdefault(r["artifact"], {})
        key = str(r["batch"])
        by_batch[key] = min(by_batch.get(key, float("inf")), r["latency_ms"]["p50"])
    return out


def audit_verdict(verification: dict) -> dict:
    """The dropout audit of the raw export and the shipped model, as one verdict with its numbers."""
    raw, shipped = verification["raw"], verification["shipped"]
    checks = {
        "no active dropout / random ops (raw export)": raw["graph"]["passed"],
        "no active dropout / random ops (shipped)": shipped["graph"]["passed"],
        "op histogram = dropout-0 twin": not raw["histogram_diff"] and not shipped["histogram_diff"],
        "bit-identical repeated runs": bool(raw["deterministic"] and shipped["deterministic"]),
        "parity with torch eval()": bool(raw["passed"] and shipped["passed"]),
    }
    passed = all(checks.values())
    text = (f"{'PASS' if passed else 'FAIL'}: dropout is gone from the shipped graph "
            f"(max abs diff vs eval() {verification['max_abs_diff']:.1e}, tolerance {verification['tolerance']:g}; "
            f"{verification['differing_predictions']} of {verification['test_images']} test predictions differ)")
    if not passed:
        text = "FAIL: " + ", ".join(name for name, ok in checks.items() if not ok)
    return {"passed": passed, "checks": checks, "max_abs_diff": verification["max_abs_diff"], "text": text}


def show(summary: dict) -> None:
    from rich.table import Table

    rows = [*summary["variants"].values(), summary["torch_eager"]]
    batches = sorted({b for row in rows for b in row["p50_ms"]}, key=int)
    table = Table(title=f"{summary['run_dir']}: {summary['bench']['cpu']}, {summary['bench']['cores']} cores, "
                        f"onnxruntime {summary['bench']['onnxruntime']}; p50 latency at batch b", title_justify="left")
    for column in ("model", "file", "bytes", "accuracy", *(f"b{b} ms" for b in batches)):
        table.add_column(column, justify="left" if column in ("model", "file") else "right",
                         no_wrap=column in ("model", "file"))
    for name, v in summary["variants"].items():
        mark = " *" if name == summary["recommended"] else ""
        accuracy = f"{100 * v['test_accuracy']:.2f}%" if v["test_accuracy"] is not None else ""
        table.add_row(name + mark, v["file"], f"{v['bytes']:,}", accuracy, *(_ms(v["p50_ms"].get(b)) for b in batches))
    eager = summary["torch_eager"]
    table.add_row("torch eager", "checkpoint.pt", "", f"{100 * eager['test_accuracy']:.2f}%",
                  *(_ms(eager["p50_ms"].get(b)) for b in batches))
    console.print(table)
    audit = summary["dropout_audit"]
    console.print(f"[bold]dropout audit[/]: [{'green' if audit['passed'] else 'red'}]{audit['text']}[/]")
    console.print(f"[bold]recommended[/] (*): {summary['recommended']}: {summary['recommended_reason']}")
    if summary["dropout_compute"]:
        console.print(f"[bold]dropout compute[/]: {summary['dropout_compute']['answer']}")
    total = summary["seconds"].get("total")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items() if k != "total")
    console.print(f"files: {summary['files']['manifest']}, {summary['files']['bench']}"
                  + (f"; {total:.0f} s in all ({stages})" if total else ""))
    typer.echo(f"{summary['run_dir']}: recommended {summary['recommended']}; dropout audit "
               f"{'PASS' if audit['passed'] else 'FAIL'}; next: pipeline pack {shlex.quote(summary['run_dir'])}")


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"
