"""Training-time augmentation of photo batches (`TrainConfig.augment == "photo"`), on the device.

Works on normalized batches: flips and crops commute with the per-channel normalization, and a
brightness factor b on the raw pixels is b * z + (b - 1) * mean / std on normalized ones, so the
cached uint8 images are never touched and no second copy is kept. Random numbers come from
torch's global generator, which the training state saves, so a resumed run draws the same ones.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

CROP_AREA = (0.6, 1.0)
"""Share of the image area a random resized crop keeps."""
CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect ratios (width / height) of the crop."""
FLIP_PROBABILITY = 0.5
BRIGHTNESS = (0.8, 1.2)
CONTRAST = (0.8, 1.2)


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n) * (high - low) + low


def photo(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Random resized crop + horizontal flip + brightness/contrast jitter of a normalized (N, C, H, W) batch."""
    n = x.shape[0]
    area = _uniform(n, *CROP_AREA)
    ratio = torch.exp(_uniform(n, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    width, height = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x, centre_y = (torch.rand(n) * 2 - 1) * (1 - width), (torch.rand(n) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(n) < FLIP_PROBABILITY, -1.0, 1.0)
    # One affine sampling grid per image: the crop box (in [-1, 1] coordinates), mirrored when flipped.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = functional.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shape = (n, 1, 1, 1)
    brightness = _uniform(n, *BRIGHTNESS).reshape(shape).to(x.device, x.dtype)
    contrast = _uniform(n, *CONTRAST).reshape(shape).to(x.device, x.dtype)
    shift = (torch.tensor(mean) / torch.tensor(std)).reshape(1, -1, 1, 1).to(x.device, x.dtype)
    out = brightness * out + (brightness - 1) * shift  # raw pixels x brightness
    centre = out.mean(dim=(2, 3), keepdim=True)
    return (out - centre) * contrast + centre  # contrast about each image's channel mean (affine: commutes)
