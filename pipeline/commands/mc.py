"""The MC dropout options of `pipeline export --mc-dropout`, and its presentation.

Like `commands/quantize.py` for `--quantize`: the option types are reused by
`commands/export.py`, `config()` builds the `MCConfig` before any work (a bad value fails
first), and `follow_up()` makes the one workflow call and shows what was verified and measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.options import console

McDropout = Annotated[bool, typer.Option(
    "--mc-dropout", help="Also write model.mc.onnx: dropout stays active at inference, N samples per input in one pass; "
                         "outputs mean probabilities, predictive entropy and mutual information (see README, MC dropout).")]
McSamples = Annotated[int, typer.Option("--mc-samples", help="Dropout samples N per input, fixed in model.mc.onnx.")]
McMaxAccuracyDrop = Annotated[float, typer.Option(
    "--mc-max-accuracy-drop", help="Largest test accuracy drop (points) of the MC mean vs the deterministic model.")]
McOodData = Annotated[Optional[Path], typer.Option(
    "--mc-ood-data", help="IDX folder or .npz of another dataset, resized to the model's input, as one more "
                          "out-of-distribution set (e.g. MNIST for digits).")]


def config(samples: int = 32, max_accuracy_drop: float = 0.5, ood_data: Path | None = None):
    """Options -> MCConfig (accuracy drop in points on the command line, a fraction in the config)."""
    from pipeline.config import MCConfig

    return MCConfig(samples=samples, max_accuracy_drop=max_accuracy_drop / 100.0, ood_data_dir=ood_data)


def follow_up(run_dir: Path, mc_config) -> dict:
    """One `workflow.mc_export_run` call with a spinner, the checks and numbers on stderr; returns the JSON report."""
    from pipeline.workflow import mc_export_run

    with console.status("MC dropout") as status:
        result = mc_export_run(run_dir, mc_config, on_step=lambda name: status.update(f"MC dropout: {name}"))
    show(result)
    return {"run_dir": str(run_dir), "file": str(result.model_path), "plot": str(result.plot_path), "record": result.record}


def show(result) -> None:
    """Verification and usefulness tables on stderr."""
    from rich.table import Table

    record = result.record
    check, evaluation = record["verification"], record["evaluation"]
    table = Table(title=f"{result.model_path}: N={record['samples']} dropout samples per input (seed {check['seed']})")
    table.add_column("check")
    table.add_column("result", justify="right")
    for level, info in check["ort_levels"].items():
        ops = ", ".join(f"{op} x{n}" for op, n in info["random_ops"].items())
        table.add_row(f"ORT level {level}: random ops kept; max diff between two runs",
                      f"{ops}; {info['max_abs_diff_between_runs']:.3g}")
    sim = check["onnxsim"]
    table.add_row("onnxsim: random ops kept; max diff between two runs",
                  f"{', '.join(f'{op} x{n}' for op, n in sim['random_ops'].items())}; {sim['max_abs_diff_between_runs']:.3g}")
    gate = check["gate"]
    table.add_row("validation accuracy (the gate): MC mean / deterministic",
                  f"{100 * gate['mc']:.2f}% / {100 * gate['deterministic']:.2f}% ({gate['difference_points']:+.2f} points)")
    accuracy = check["accuracy"]
    table.add_row("test accuracy (measured once): MC mean / deterministic",
                  f"{100 * accuracy['mc']:.2f}% / {100 * accuracy['deterministic']:.2f}% "
                  f"({accuracy['difference_points']:+.2f} points)")
    for step in check["convergence"]:
        table.add_row(f"N={step['samples']}: TV to deterministic softmax; sampling noise",
                      f"{step['tv_to_deterministic']:.4f}; {step['tv_between_independent_estimates']:.4f}")
    fp32 = check["fp32_untouched"]
    table.add_row("model.onnx untouched, passes the dropout audit",
                  "not exported" if fp32.get("exported") is False else
                  ("[green]yes[/]" if fp32["audit_passed"] and fp32["matches_manifest"] else "[red]NO[/]"))
    console.print(table)

    ood = Table(title=f"uncertainty vs out-of-distribution inputs: AUROC ({evaluation['in_distribution']['images']} test images)")
    for column in ("OOD set", "MC entropy", "MC mutual info", "deterministic entropy"):
        ood.add_column(column, justify="left" if column == "OOD set" else "right")
    for name, info in evaluation["ood"].items():
        auroc = info["auroc"]
        ood.add_row(f"{name} ({info['images']})", f"{auroc['mc_entropy']:.3f}", f"{auroc['mc_mutual_info']:.3f}",
                    f"{auroc['deterministic_entropy']:.3f}")
    console.print(ood)
    rejection = evaluation["rejection"]
    console.print("rejection (MC entropy): " + ", ".join(
        f"{100 * f:g}% -> {100 * a:.2f}%" for f, a in zip(rejection["fractions"], rejection["mc_entropy"], strict=True)
        if f in (0.0, 0.02, 0.05, 0.1, 0.2)) + f"  (plot: {result.plot_path})")
