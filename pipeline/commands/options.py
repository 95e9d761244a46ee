"""Parsers for option values that Typer has no type for, and the console used by commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

# Progress and tables go to stderr, so stdout stays clean for --json output. When stderr is not a
# terminal (CI logs, `2> file`), rich would assume 80 columns and squash the tables: use 160.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# The first conv block's downsampling, shared by train, run and study (ModelConfig.strided_first_conv).
StridedFirstConv = Annotated[Optional[bool], typer.Option(
    "--strided-first-conv/--pooled-first-conv",
    help="First block: conv 5x5 stride 2 (faster, most of all in int8) or conv 3x3 + 2x2 max pool."
         " Default: strided for inputs of 16x16 or more.")]

# How image-folder sources are read (DataConfig.resize, on_bad_image, cache_dir), shared by every command that reads one.
Resize = Annotated[str, typer.Option(
    help="How images of another aspect ratio reach --image-size: squash (stretch), crop (cover, cut the centre) "
         "or pad (fit, centre on black). Recorded in the manifest's preprocess for the device.")]
OnBadImage = Annotated[str, typer.Option(
    help="Unreadable image files: fail (the error names all of them) or skip (left out, listed in "
         "skipped_images.json in the run folder).")]
CacheDir = Annotated[Optional[Path], typer.Option(
    help="Folder of the decoded-image cache of image folders. Default: $PIPELINE_CACHE_DIR, else ~/.cache/pipeline.")]
IMAGE_SIZE_HELP = "Resize images to N or HxW (folder: needed only when the images differ in size)."


def int_list(text: str, what: str) -> tuple[int, ...]:
    """'32,64' -> (32, 64); '' -> ()."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def image_size(text: str | None) -> tuple[int, int] | None:
    """'28' -> (28, 28); '32x48' -> (32, 48)."""
    if text is None:
        return None
    parts = int_list(text.lower().replace("x", ","), "--image-size")
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) == 2:
        return parts
    raise ValueError(f"--image-size must be N or HxW, got {text!r}")
