"""One image file -> 8-bit pixels at the model's size: the decoding rule every reader shares.

Training (through the decoded-image cache), `predict` and the device follow the same steps:
1. EXIF orientation applied (photos from phones are stored rotated);
2. 16-bit images scaled to 8 bits (65535 -> 255, by / 257), never clipped; 8-bit images as stored;
3. converted to grayscale ("L") or RGB (transparency dropped);
4. brought to the model's (H, W) by the `resize` mode, with Pillow's bilinear filter:
   - `squash`: stretched to (H, W), aspect ratio not kept (the historic behaviour);
   - `crop`:   scaled to cover (H, W), then the centre cut out (`ImageOps.fit`);
   - `pad`:    scaled to fit inside (H, W), centred on black (0) (`ImageOps.pad`).
The mode is part of the preprocessing contract (`Preprocess.resize`, manifest `preprocess.resize`).

Hidden files (names starting with "."), which include macOS `._name.png` resource forks and
`.DS_Store`, are never images. Imports numpy and Pillow only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The device runner carries the resize and 16-bit rules to devices (it imports nothing from the
# package once bundled): this module uses its definitions rather than a second copy.
from pipeline.device_runner import EXIF_FORMATS, RESIZE_MODES, SIXTEEN_BIT_MODES, fit, to_8bit  # noqa: F401
from pipeline.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Pillow modes that hold one gray channel; 16-bit ones are scaled to 8 bits.
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def is_hidden(name: str) -> bool:
    """`.DS_Store`, `._photo.png` (a macOS resource fork, not an image), `.git`, ..."""
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES


class UnreadableImageError(DataError):
    """An image file Pillow cannot open or decode; `reason` is Pillow's one-line explanation."""

    def __init__(self, path: Path, reason: str) -> None:
        reason = reason.replace(f" '{path}'", "").replace(str(path), Path(path).name)  # Pillow repeats the path
        super().__init__(f"{path}: unreadable image: {reason}")
        self.path, self.reason = Path(path), reason


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def probe(path: Path) -> tuple[str, tuple[int, int]]:
    """(Pillow mode, (H, W)) from the header only; `DataError` if it is no image Pillow can open."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1) if image.format in ("JPEG", "TIFF", "WEBP") else 1
            if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: the decoded image is W x H
                width, height = height, width
            return image.mode, (height, width)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise UnreadableImageError(path, _first_line(exc)) from None


def decode(path: Path, size: tuple[int, int] | None, channels: int, resize: str = "squash") -> np.ndarray:
    """One image file -> uint8 (channels, H, W); `size` None keeps the stored size. `DataError` if unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # a truncated file fails here, not later
            image = ImageOps.exif_transpose(image) if image.format in EXIF_FORMATS else image
            image = to_8bit(image).convert("L" if channels == 1 else "RGB")
            if size is not None:
                image = fit(image, size, resize)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(path, _first_line(exc)) from None
    return pixels[None] if channels == 1 else np.ascontiguousarray(np.moveaxis(pixels, -1, 0))


def load_image(path: Path, size: tuple[int, int], channels: int, resize: str = "squash") -> np.ndarray:
    """One image file -> raw pixels (channels, H, W) float32 in 0-255 at `size` (H, W)."""
    return decode(path, size, channels, resize).astype(np.float32)
