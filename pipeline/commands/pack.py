"""`pipeline pack`: options -> PackConfig -> pack.pack -> what the bundle holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.options import console
from pipeline.config import PackConfig


def pack(
    run: Annotated[Path, typer.Argument(help="The run folder (with an exported model).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="Bundle to write. Default: <run>.tar.gz beside the run folder.")] = None,
    variant: Annotated[Optional[list[str]], typer.Option(help="Variant to ship (repeat for several). "
                                                              "Default: the manifest's recommended, else fp32.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON to stdout.")] = False,
) -> None:
    """Write a device bundle (.tar.gz): model variant(s), trimmed manifest, labels, device runner, README.

    Unpack it on the device and run `python device_runner.py IMAGE...` inside it: it needs only
    onnxruntime, numpy and Pillow. The model hashes are checked before packing.
    """
    from pipeline.pack import default_bundle_path
    from pipeline.pack import pack as run_pack

    config = PackConfig(out=out or default_bundle_path(run), variants=tuple(variant or ()))
    result = run_pack(run, config)
    if as_json:
        typer.echo(json.dumps({"path": str(result.path), "variants": list(result.variants), "bytes": result.bytes,
                               "sha256": result.sha256, "files": result.files}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{result.path} ({result.bytes:,} bytes, variants {', '.join(result.variants)})",
                  title_justify="left")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for name, size in result.files.items():
        table.add_row(name, f"{size:,}")
    console.print(table)
    top = next(iter(result.files)).split("/")[0]
    typer.echo(f"{result.path}: tar xzf {result.path.name} && cd {top} && python device_runner.py IMAGE...")
