"""`pipeline pack`: options -> PackConfig -> pack.pack -> what the bundle holds."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.options import console
from pipeline.config import PackConfig


def pack(
    run: Annotated[Path, typer.Argument(help="The run folder (with an exported model).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="Bundle to write. Default: <run>.tar.gz beside the run folder.")] = None,
    variant: Annotated[Optional[list[str]], typer.Option(help="Variant to ship (repeat for several). "
                                                              "Default: the manifest's recommended (else fp32) and every variant its per-batch "
                                                              "deployments name.")] = None,
    golden: Annotated[int, typer.Option(help="Test images in the golden set (PNG, tensor, every variant's answers) "
                                             "that `device_runner.py --selftest` checks; 0: none.")] = 32,
    ort_format: Annotated[bool, typer.Option("--ort-format", help="Also ship .ort files (ONNX Runtime's mobile format), "
                                                                 "checked against the .onnx, required_operators.config "
                                                                 "and the NNAPI/CoreML usability report.")] = False,
    sign: Annotated[Optional[Path], typer.Option(help="Ed25519 private key (PEM): sign SHA256SUMS into SIGNATURE "
                                                      "(needs pipeline[sign]).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON to stdout.")] = False,
) -> None:
    """Write a device bundle (.tar.gz): model variant(s), golden set, trimmed manifest, labels, device runner, README.

    Unpack it on the device and run `python device_runner.py --selftest` inside it (onnxruntime, numpy
    and Pillow only): it checks every file, runs every variant on the golden set, times them there and
    chooses. The model hashes are checked before packing; the same run and options give the same bytes.
    """
    from pipeline.pack import default_bundle_path
    from pipeline.pack import pack as run_pack

    config = PackConfig(out=out or default_bundle_path(run), variants=tuple(variant or ()), golden=golden,
                        ort_format=ort_format, sign_key=sign)
    with console.status("pack") as status:
        result = run_pack(run, config, on_step=lambda s: status.update(f"pack: {s}"))
    if as_json:
        typer.echo(json.dumps({"path": str(result.path), "variants": list(result.variants), "bytes": result.bytes,
                               "sha256": result.sha256, "files": result.files}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{result.path} ({result.bytes:,} bytes, variants {', '.join(result.variants)})",
                  title_justify="left")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    golden_files = {name: size for name, size in result.files.items() if "/golden/" in name}
    for name, size in result.files.items():
        if name not in golden_files:
            table.add_row(name, f"{size:,}")
    if golden_files:
        table.add_row(f"{next(iter(golden_files)).rsplit('/', 1)[0]}/ ({len(golden_files)} files)",
                      f"{sum(golden_files.values()):,}")
    console.print(table)
    top = next(iter(result.files)).split("/")[0]
    # A command that works when pasted: quoted paths (a bundle may be "my photos.tar.gz"), from any folder.
    typer.echo(f"{result.path}: tar xzf {shlex.quote(str(result.path))} && cd {shlex.quote(top)} "
               "&& python device_runner.py --selftest")
