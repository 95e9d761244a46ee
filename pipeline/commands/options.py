"""Parsers for option values that Typer has no type for, and the console used by commands."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from pipeline.errors import ConfigError

# Progress and tables go to stderr, so stdout stays clean for --json output. When stderr is not a
# terminal (CI logs, `2> file`), rich would assume 80 columns and squash the tables: use 160.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# The first conv block's downsampling, shared by train, run and study (ModelConfig.strided_first_conv).
StridedFirstConv = Annotated[Optional[bool], typer.Option(
    "--strided-first-conv/--pooled-first-conv",
    help="First block: conv 5x5 stride 2 (faster, most of all in int8) or conv 3x3 + 2x2 max pool."
         " Default: strided for inputs of 16x16 or more.")]


def int_list(text: str, what: str) -> tuple[int, ...]:
    """'32,64' -> (32, 64); '' -> ()."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None


def image_size(text: str | None) -> tuple[int, int] | None:
    """'28' -> (28, 28); '32x48' -> (32, 48)."""
    if text is None:
        return None
    parts = int_list(text.lower().replace("x", ","), "--image-size")
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) == 2:
        return parts
    raise ConfigError(f"--image-size must be N or HxW, got {text!r}")
