"""Parsers for option values that Typer has no type for, and the console used by commands."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
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

# How image-folder sources are read (DataConfig.resize, on_bad_image, cache_dir), shared by every command that reads one.
Resize = Annotated[str, typer.Option(
    help="How images of another aspect ratio reach --image-size: squash (stretch), crop (cover, cut the centre) "
         "or pad (fit, centre on black). Recorded in the manifest's preprocess for the device.")]
OnBadImage = Annotated[str, typer.Option(
    help="Unreadable image files: fail (the error names all of them) or skip (left out, listed in "
         "skipped_images.json in the run folder).")]
CacheDir = Annotated[Optional[Path], typer.Option(
    help="Folder of the decoded-image cache of image folders. Default: $PIPELINE_CACHE_DIR, else ~/.cache/pipeline.")]
# Where a finished run's data is now, for the commands that re-read it (export, quantize).
DataDirNow = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Where the run's training data is now, if it moved (replaces the recorded folder; its fingerprint "
                       "must match). Not needed while the image cache holds it.")]
CacheDirNow = Annotated[Optional[Path], typer.Option(
    "--cache-dir", help="The image cache to read the run's data from (default: the recorded one).")]
IMAGE_SIZE_HELP = "Resize images to N or HxW (folder: needed only when the images differ in size)."


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


class DecodeEta:
    """A `data.reading(on_progress=...)` callback that turns (stage, done, total) into a line with rate and ETA.

    `show(text, done, total)` puts it on screen: a progress bar's task or a spinner's status.
    """

    def __init__(self, show: Callable[[str, int, int], None]) -> None:
        self.show = show
        self.started = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if done == 0:
            self.started = time.perf_counter()
        what = "reading image headers" if stage == "probe" else "decoding images into the cache"
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 and done else 0.0
        eta = f", ETA {_clock((total - done) / rate)}" if rate and done < total else ""
        self.show(f"{what} {done:,}/{total:,} ({rate:,.0f}/s{eta})", done, total)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"
