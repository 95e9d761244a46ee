"""`pipeline quantize RUN`, and the quantize options `pipeline export --quantize` shares.

The option types below are reused by `commands/export.py`, so both commands spell and
document the options the same way; `configs()` turns them into `QuantizeConfig` and
`Fp16Config`, `run()` makes the one workflow call and shows the variants table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.options import CacheDirNow, DataDirNow, console
from pipeline.config import QUANT_RECIPES

Dynamic = Annotated[bool, typer.Option("--dynamic", help="Dynamic int8 (activation ranges at run time, no calibration) "
                                                          "instead of static; written as int8_dynamic.")]
Method = Annotated[str, typer.Option("--quant-method", help="Calibration: minmax, entropy or percentile.")]
Format = Annotated[str, typer.Option("--quant-format",
                                      help="Static int8 format: qdq (Q/DQ pairs) or qoperator (QLinearConv, ...).")]
PerChannel = Annotated[bool, typer.Option("--per-channel/--per-tensor",
                                           help="One weight scale per output channel, or one per tensor.")]
ActivationType = Annotated[str, typer.Option("--activation-type", help="int8 or uint8 activations.")]
WeightType = Annotated[str, typer.Option("--weight-type", help="int8 or uint8 weights.")]
CalibrationSamples = Annotated[int, typer.Option("--calibration-samples", help="Training images the calibration sees.")]
CalibrationSeed = Annotated[int, typer.Option("--calibration-seed",
                                               help="Seed of the calibration sample (same seed, same file).")]
MaxAccuracyDrop = Annotated[float, typer.Option("--max-accuracy-drop",
                                                help="Largest test accuracy drop (points) an int8 model may ship with.")]
MaxClassRecallDrop = Annotated[float, typer.Option(
    "--max-class-recall-drop", help="Largest validation recall drop (points) of any one class with enough validation "
                                    "images (int8 and fp16 gates).")]
MaxExcluded = Annotated[int, typer.Option("--max-excluded-nodes",
                                          help="When the gate fails, keep up to this many of the most sensitive nodes in fp32.")]
ExcludeNodes = Annotated[Optional[list[str]], typer.Option("--exclude-node",
                                                            help="Keep this node in fp32 (repeatable).")]
KeepFirstConv = Annotated[Optional[bool], typer.Option(
    "--keep-first-conv-fp32/--quantize-first-conv",
    help="Keep the first Conv in fp32 or quantize it too (default: fp32 when it feeds a max pool, int8 when it is strided;"
         " the faster of the two on x86, see README Performance).")]
DisableOptimizers = Annotated[Optional[list[str]], typer.Option(
    "--disable-optimizer", help="ORT optimizer to disable when running the int8 file (repeatable; recorded in the manifest).")]
SpeedCheck = Annotated[bool, typer.Option("--speed-check/--no-speed-check", help="Time int8 against fp32 on this host.")]
SpeedBatch = Annotated[int, typer.Option("--speed-batch", help="Large batch of the speed check.")]
SpeedRounds = Annotated[int, typer.Option(
    "--speed-rounds", help="Interleaved rounds of the speed check per batch size (more: a steadier choice on a noisy "
                           "host, and a longer export).")]
Recipes = Annotated[str, typer.Option(
    "--recipes", help="int8 recipes to build, gate on validation and time against each other; the fastest passing one "
                      f"ships: {', '.join(QUANT_RECIPES)}, "
                      "comma-separated, or 'all' (default: all with the speed check, else the configured recipe only). "
                      "A recipe more than 3% faster at one batch size ships too, as int8-<recipe>, for that size.")]
KeepCandidates = Annotated[bool, typer.Option(
    "--keep-candidates", help="Keep the int8 candidates not shipped as model.int8.<recipe>.onnx (not run artifacts).")]
Fp16 = Annotated[bool, typer.Option("--fp16",
                                     help="Also write model.fp16.onnx (for GPU targets), checked for parity and accuracy.")]


def configs(dynamic: bool = False, method: str = "minmax", format: str = "qdq", per_channel: bool = False,
            activation_type: str = "uint8", weight_type: str = "int8", calibration_samples: int = 256,
            calibration_seed: int = 0, max_accuracy_drop: float = 0.5, max_excluded_nodes: int = 1,
            exclude_nodes: list[str] | None = None, keep_first_conv_fp32: bool | None = None,
            disable_optimizers: list[str] | None = None, speed_check: bool = True, speed_batch: int = 256,
            fp16: bool = False, recipes: str = "", keep_candidates: bool = False, max_class_recall_drop: float = 2.0,
            speed_rounds: int = 15):
    """Options -> (QuantizeConfig, Fp16Config or None). Unset values keep the config's defaults."""
    from pipeline.config import Fp16Config, QuantizeConfig

    config = QuantizeConfig(mode="dynamic" if dynamic else "static", method=method, format=format, per_channel=per_channel,
                            activation_type=activation_type, weight_type=weight_type,
                            calibration_samples=calibration_samples, seed=calibration_seed,
                            max_accuracy_drop=max_accuracy_drop, max_excluded_nodes=max_excluded_nodes,
                            nodes_to_exclude=tuple(exclude_nodes or ()), keep_first_conv_fp32=keep_first_conv_fp32,
                            disabled_optimizers=tuple(disable_optimizers or QuantizeConfig.disabled_optimizers),
                            speed_check=speed_check, speed_batch=speed_batch, speed_rounds=speed_rounds,
                            recipes=_recipes(recipes),
                            keep_candidates=keep_candidates, max_class_recall_drop=max_class_recall_drop)
    return config, (Fp16Config(max_class_recall_drop=max_class_recall_drop) if fp16 else None)


def _recipes(text: str) -> tuple[str, ...] | None:
    names = [part for part in text.replace(" ", "").split(",") if part]
    if not names:
        return None
    return QUANT_RECIPES if names == ["all"] else tuple(names)


def follow_up(run_dir: Path, config, fp16_config) -> dict:
    """One `workflow.quantize_run` call with a spinner, the variants table on stderr; returns the JSON report.

    `pipeline export --quantize` calls this after the fp32 export, `pipeline quantize` on its own.
    """
    from pipeline.workflow import quantize_run

    with console.status("quantize") as status:
        result = quantize_run(run_dir, config, fp16_config, on_step=lambda name: status.update(f"quantize: {name}"))
    show(result)
    return {"run_dir": str(run_dir), "variant": result.variant, "recommended": result.recommended,
            "recommended_reason": result.recommended_reason, "variants": result.variants,
            "warnings": list(result.warnings), "record": result.record, "fp16": result.fp16_record}


def run(run_dir: Path, config, fp16_config, as_json: bool = False) -> None:
    report = follow_up(run_dir, config, fp16_config)
    if as_json:
        typer.echo(json.dumps(report, indent=2))


def show(result) -> None:
    """The variants table and the recommendation on stderr; loud warnings in red."""
    from rich.table import Table

    table = Table(title=f"{result.run_dir}: variants (* recommended; latency as a multiple of fp32's)")
    for column in ("variant", "file", "KiB", "size", "accuracy", "agree"):
        table.add_column(column, justify="left" if column in ("variant", "file") else "right")
    batches = sorted({k for row in result.variants for k in (row["latency_ratio"] or {})}, key=lambda k: int(k.split("_")[1]))
    for key in batches:
        table.add_column(key.replace("batch_", "b"), justify="right")
    for row in result.variants:
        name = row["variant"] + (" *" if row["variant"] == result.recommended else "")
        ratios = row["latency_ratio"] or {}
        table.add_row(name, row["file"], f"{row['bytes'] / 1024:.1f}", _fmt(row["size_ratio"], "{:.1%}"),
                      _fmt(row["test_accuracy"], "{:.2%}"), _fmt(row["agreement"], "{:.2%}"),
                      *[_fmt(ratios.get(k), "{:.2f}x") for k in batches])
    console.print(table)
    gate = result.record["verification"]["gate"]
    kept = gate["excluded_nodes"]
    worst = (gate.get("class_recall_drops") or [None])[0]
    if worst is not None:
        console.print(f"{result.variant}: largest class recall drop {worst['drop_points']:.2f} points, class "
                      f"{worst['label']!r} ({worst['support']} validation images; gate {gate['max_class_recall_drop']:.2f})")
    console.print(f"{result.variant}: accuracy drop {gate['drop_points']:.2f} points (gate {gate['max_accuracy_drop']:.2f}), "
                  f"{len(kept)} node(s) kept in fp32{': ' + ', '.join(kept) if kept else ''}")
    recipe = result.record.get("quantization", {})
    if len(recipe.get("candidates", [])) > 1:
        rows = []
        for c in recipe["candidates"]:
            ratios = " / ".join(f"{v['ratio_to_fp32']:.2f}x" + ("" if v["engine"] == "onnxruntime" else f" on {v['engine']}")
                                for v in (c.get("latency") or {}).values())
            rows.append(f"{c['recipe']}{' *' if c['shipped'] else ''} "
                        + (f"({ratios or 'not timed'})" if c["passed"] else "(failed its gate)"))
        console.print(f"int8 recipes (latency vs fp32 per batch, * shipped): {', '.join(rows)}")
    for warning in result.warnings:
        console.print(f"[bold red]WARNING: {warning}[/bold red]")
    console.print(f"recommended: [bold]{result.recommended}[/bold] ({result.recommended_reason})")


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def quantize(
    run_dir: Annotated[Path, typer.Argument(help="Run folder whose fp32 model.onnx (from `pipeline export`) is quantized.")],
    dynamic: Dynamic = False,
    method: Method = "minmax",
    format: Format = "qdq",
    per_channel: PerChannel = False,
    activation_type: ActivationType = "uint8",
    weight_type: WeightType = "int8",
    calibration_samples: CalibrationSamples = 256,
    calibration_seed: CalibrationSeed = 0,
    max_accuracy_drop: MaxAccuracyDrop = 0.5,
    max_class_recall_drop: MaxClassRecallDrop = 2.0,
    max_excluded_nodes: MaxExcluded = 1,
    exclude_nodes: ExcludeNodes = None,
    keep_first_conv_fp32: KeepFirstConv = None,
    disable_optimizers: DisableOptimizers = None,
    speed_check: SpeedCheck = True,
    speed_batch: SpeedBatch = 256,
    speed_rounds: SpeedRounds = 15,
    recipes: Recipes = "",
    keep_candidates: KeepCandidates = False,
    fp16: Fp16 = False,
    data_dir: DataDirNow = None,
    cache_dir: CacheDirNow = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Quantize an exported run to int8 (model.int8.onnx), refusing a model that loses accuracy.

    The int8 model is judged through ONNX Runtime on the test split; above --max-accuracy-drop the
    most sensitive nodes are kept in fp32 (up to --max-excluded-nodes), else nothing is written.
    int8 is timed against fp32 on this host and recommended only when it is not slower.
    """
    config, fp16_config = configs(dynamic, method, format, per_channel, activation_type, weight_type, calibration_samples,
                                  calibration_seed, max_accuracy_drop, max_excluded_nodes, exclude_nodes,
                                  keep_first_conv_fp32, disable_optimizers, speed_check, speed_batch, fp16,
                                  recipes, keep_candidates, max_class_recall_drop, speed_rounds)
    from pipeline import data

    with data.reading(None, data_dir, cache_dir):
        run(run_dir, config, fp16_config, as_json)
