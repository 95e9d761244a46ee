"""`pipeline export`: options -> ExportConfig -> workflow.export_run (fp32), then optional follow-up steps.

The fp32 export always runs first and must pass its audit; steps derived from it (int8, fp16,
MC dropout) are added after it in `export()` as small `if option:` blocks that read the run
folder it wrote, and put their result under their own key of `report` for `--json`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands import mc as m
from pipeline.commands import quantize as q
from pipeline.commands.options import CacheDirNow, DataDirNow, DecodeEta, console, int_list
from pipeline.errors import ConfigError


def export(
    run: Annotated[Path, typer.Option(help="Run folder (from `pipeline train`) whose checkpoint is exported; "
                                           "model.onnx is written into it.")] = Path("models/digits"),
    checkpoint: Annotated[Optional[Path], typer.Option(
        help="Export this checkpoint instead of the run's own. With --out: a new run folder is made around it; "
             "without: it must belong to --run (same labels, preprocessing, architecture and data).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="With --checkpoint: the new run folder to create (refused if it exists, "
                                                      "unless --force).")] = None,
    force: Annotated[bool, typer.Option(help="With --out: replace an existing folder.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset of the exported file (17-23; 18 is what torch's exporter "
                                            "emits natively).")] = 18,
    tolerance: Annotated[float, typer.Option(help="Largest max abs logit difference allowed vs PyTorch eval().")] = 1e-4,
    parity_batches: Annotated[str, typer.Option(help="Batch sizes of real validation images for the parity check.")] = "1,7,256",
    skip_simplify: Annotated[bool, typer.Option(
        "--skip-simplify", help="Ship the raw export without onnxsim (otherwise a missing or failing onnxsim "
                                "stops the export).")] = False,
    quantize: Annotated[bool, typer.Option("--quantize", help="Also build model.int8.onnx, gated on test accuracy "
                                                             "(see `pipeline quantize --help`).")] = False,
    dynamic: q.Dynamic = False,
    quant_method: q.Method = "minmax",
    quant_format: q.Format = "qdq",
    per_channel: q.PerChannel = False,
    activation_type: q.ActivationType = "uint8",
    weight_type: q.WeightType = "int8",
    calibration_samples: q.CalibrationSamples = 256,
    calibration_seed: q.CalibrationSeed = 0,
    max_accuracy_drop: q.MaxAccuracyDrop = 0.5,
    max_class_recall_drop: q.MaxClassRecallDrop = 2.0,
    max_excluded_nodes: q.MaxExcluded = 1,
    exclude_nodes: q.ExcludeNodes = None,
    keep_first_conv_fp32: q.KeepFirstConv = None,
    disable_optimizers: q.DisableOptimizers = None,
    speed_check: q.SpeedCheck = True,
    speed_batch: q.SpeedBatch = 256,
    speed_rounds: q.SpeedRounds = 15,
    recipes: q.Recipes = "",
    keep_candidates: q.KeepCandidates = False,
    fp16: q.Fp16 = False,
    mc_dropout: m.McDropout = False,
    mc_samples: m.McSamples = 32,
    mc_max_accuracy_drop: m.McMaxAccuracyDrop = 0.5,
    mc_ood_data: m.McOodData = None,
    data_dir: DataDirNow = None,
    cache_dir: CacheDirNow = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest records as JSON on stdout.")] = False,
) -> None:
    """Export a trained model to one self-contained ONNX file, with proof that dropout is gone.

    The raw export is audited before any optimizer touches it (no active Dropout, no random op,
    no training-mode BatchNorm; bit-identical repeated runs under ORT_DISABLE_ALL; parity with
    PyTorch eval() on real validation images at batch 1, odd and large; same op histogram as the
    architecture with dropout 0), then simplified with onnxsim and checked again, including by
    onnx's ReferenceEvaluator. Test accuracy through ONNX Runtime is recorded in manifest.json.
    Nothing is written unless every check passes.
    """
    from pipeline import data
    from pipeline.config import ExportConfig
    from pipeline.workflow import adopt_checkpoint, export_run

    config = ExportConfig(opset=opset, tolerance=tolerance, parity_batch_sizes=int_list(parity_batches, "--parity-batches"),
                          skip_simplify=skip_simplify)
    if fp16 and not quantize:
        raise ConfigError(f"--fp16 is built by the quantize step: add --quantize (or run "
                          f"`pipeline quantize {shlex.quote(str(out or run))} --fp16` after the export)")
    # Built before the export, so a bad quantize option fails before any work.
    quantize_config, fp16_config = q.configs(dynamic, quant_method, quant_format, per_channel, activation_type, weight_type,
                                             calibration_samples, calibration_seed, max_accuracy_drop, max_excluded_nodes,
                                             exclude_nodes, keep_first_conv_fp32, disable_optimizers, speed_check,
                                             speed_batch, fp16, recipes, keep_candidates, max_class_recall_drop,
                                             speed_rounds)
    mc_config = m.config(mc_samples, mc_max_accuracy_drop, mc_ood_data) if mc_dropout else None
    if out is not None and checkpoint is None:
        raise ConfigError("--out makes a new run folder around --checkpoint FILE: give --checkpoint too (or use --run)")
    with console.status("export") as status, \
            data.reading(DecodeEta(lambda text, *_: status.update(f"export: {text}")), data_dir, cache_dir):
        def on_step(name: str) -> None:
            status.update(f"export: {name}")

        if out is not None:
            on_step("new run folder around the checkpoint")
            run = adopt_checkpoint(checkpoint, out, force=force)
            checkpoint = None
        result = export_run(run, config, checkpoint=checkpoint, on_step=on_step)
    report: dict = {"run_dir": str(result.run_dir), "fp32": result.record, "export": result.export,
                    "dropped_stale_artifacts": list(result.dropped)}
    summary = show(result)

    # Follow-up steps on the exported fp32 model go here, each as `if option: report[key] = ...`.
    with data.reading(None, data_dir, cache_dir):  # the image cache is built by now: nothing to show
        if quantize:
            report["quantize"] = q.follow_up(result.run_dir, quantize_config, fp16_config)
        if mc_dropout:
            report["mc"] = m.follow_up(result.run_dir, mc_config)

    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(summary)


def show(result) -> str:
    """The checks on stderr; returns the one-line summary."""
    from rich.table import Table

    record = result.record
    check = record["verification"]
    raw, shipped = check["raw"], check["shipped"]
    table = Table(title=f"{result.model_path}: checks (tolerance {check['tolerance']:g})")
    table.add_column("check")
    table.add_column("raw export", justify="right")
    table.add_column("shipped", justify="right")

    def verdict(ok: bool) -> str:
        return "[green]pass[/]" if ok else "[red]FAIL[/]"

    table.add_row("graph: no active dropout / random / training BN", verdict(raw["graph"]["passed"]),
                  verdict(shipped["graph"]["passed"]))
    table.add_row("op histogram = dropout-0 twin", verdict(not raw["histogram_diff"]), verdict(not shipped["histogram_diff"]))
    table.add_row("bit-identical runs (ORT_DISABLE_ALL)", verdict(raw["deterministic"]), verdict(shipped["deterministic"]))
    for batch, diff in raw["parity_max_abs_diff"].items():
        table.add_row(f"max abs diff vs torch eval(), batch {batch}", f"{diff:.2e}",
                      f"{shipped['parity_max_abs_diff'][batch]:.2e}")
    table.add_row("max abs diff, ORT optimizations on", "", f"{shipped['parity_optimized_max_abs_diff']:.2e}")
    table.add_row("ReferenceEvaluator vs ORT", "", f"{shipped['reference_max_abs_diff']:.2e}")
    nodes = result.export["nodes"]
    table.add_row("nodes", str(nodes["raw"]), str(nodes["shipped"]))
    simplify = check["simplify"]
    table.add_row("onnxsim check", "", "skipped" if simplify.get("skipped") else verdict(simplify["check_passed"]))
    console.print(table)
    histograms = result.export["op_histogram"]
    console.print("ops: " + ", ".join(f"{op} {n}" for op, n in histograms["shipped"].items())
                  + ("" if histograms["raw"] == histograms["shipped"] else
                     "  (raw: " + ", ".join(f"{op} {n}" for op, n in histograms["raw"].items()) + ")"))
    differing = check["differing_predictions"]
    colour = "green" if differing == 0 else "yellow"
    console.print(f"test accuracy: ONNX Runtime {100 * check['ort_test_accuracy']:.2f}%, "
                  f"PyTorch {100 * check['torch_test_accuracy']:.2f}% "
                  f"on {check['test_images']} images; [{colour}]{differing} predictions differ[/]")
    if result.dropped:
        console.print(f"[yellow]removed stale records derived from the previous model.onnx: {', '.join(result.dropped)}[/]")
    return (f"{result.model_path}: opset {record['opset']}, {record['bytes']} bytes, sha256 {record['sha256'][:16]}..., "
            f"test accuracy {100 * record['test_accuracy']:.2f}%, max abs diff {check['max_abs_diff']:.2e}")
