"""`pipeline predict`: options -> PredictConfig -> predict.predict -> a table or JSON.

Runs the exported model under ONNX Runtime with the artifact's session settings, as the
device will; imports no torch (tests/test_predict.py proves it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import PredictConfig
from pipeline.errors import ConfigError


def predict(
    model: Annotated[Path, typer.Argument(help="A run folder (reads manifest.json) or an .onnx file.", show_default=False)],
    inputs: Annotated[list[str], typer.Argument(help="Images (PNG, JPEG, ...) of any size, IDX files, .npy arrays, folders "
                                                     "(every image below them) and quoted globs ('photos/**/*.jpg').",
                                                show_default=False)],
    variant: Annotated[Optional[str], typer.Option(help="Artifact to run (fp32, int8, ...). "
                                                        "Default: the manifest's deployment for this many inputs.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Labels to show per input.")] = 3,
    threads: Annotated[Optional[int], typer.Option(help="ORT intra-op threads (default: the artifact's runtime).")] = None,
    invert: Annotated[bool, typer.Option(help="Invert 8-bit inputs: dark ink on light paper.")] = False,
    assume: Annotated[bool, typer.Option(help="Bare .onnx without manifest or metadata: assume pixels/255, "
                                              "mean 0, std 1, labels 0..K-1.")] = False,
    mc: Annotated[bool, typer.Option("--mc", help="Run the MC dropout model (variant mc, from `export --mc-dropout`) and "
                                                  "show its uncertainty: predictive entropy and mutual info, nats.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit non-zero if any input is unreadable (by default they are listed, "
                                               "and only no readable input at all is an error).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of a table.")] = False,
) -> None:
    """Classify images, IDX files or .npy arrays with an exported model, without PyTorch.

    Images are converted as the manifest says (grayscale or RGB, resized, normalized). The
    model file's sha256 is checked against the manifest before it is loaded. Every readable input
    is classified; unreadable ones are listed after the results.
    """
    from pipeline.predict import predict as run_predict

    if mc and variant not in (None, "mc"):
        raise ConfigError(f"--mc runs variant mc; it cannot be combined with --variant {variant}")
    variant = "mc" if mc else variant
    config = PredictConfig(variant=variant, top_k=top_k, threads=threads, invert=invert, assume=assume, strict=strict)
    result = run_predict(model, inputs, config)
    if result.model.note:
        typer.echo(f"note: {result.model.note}", err=True)
    if as_json:
        typer.echo(json.dumps({"model": result.model.describe(), "predictions": [p.to_dict() for p in result.predictions],
                               "unreadable": [{"input": name, "reason": reason} for name, reason in result.unreadable]},
                              indent=2))
    else:
        _show(result.model, result.predictions)
    if result.unreadable:
        from pipeline.commands.options import console
        from pipeline.errors import DataError

        for name, reason in result.unreadable:
            console.print(f"[yellow]unreadable:[/] {name}: {reason}", markup=True, highlight=False)
        if strict:
            raise DataError(f"--strict: {len(result.unreadable)} unreadable input(s) beside {len(result.predictions)} "
                            "classified: " + "; ".join(f"{name}: {reason}" for name, reason in result.unreadable))


def _show(loaded, predictions) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.commands.options import console

    if loaded.source == "assumed":
        console.print(f"[yellow]note:[/] {loaded.path} carries no preprocessing: assumed pixels / 255, mean 0, std 1")
    name = f"{loaded.path}" + (f" ({loaded.variant})" if loaded.variant else "")
    table = Table(title=f"{name}, {loaded.session.get_providers()[0]}", title_justify="left")
    table.add_column("input", overflow="fold")
    for rank in range(len(predictions[0].top) if predictions else 0):
        table.add_column("top" if rank == 0 else f"#{rank + 1}")
    uncertain = bool(predictions and predictions[0].uncertainty)
    if uncertain:  # MC dropout: in nats; entropy <= ln K, mutual information <= entropy
        table.add_column("entropy")
        table.add_column("mutual info")
    for p in predictions:
        extra = (f"{p.uncertainty['entropy']:.3f}", f"{p.uncertainty['mutual_info']:.3f}") if uncertain else ()
        table.add_row(p.name, *(f"{label}  {100 * prob:.1f}%" for _, label, prob in p.top), *extra)
    Console().print(table)  # the answer goes to stdout; notes and errors to stderr
