"""Photo augmentation and class balancing: exact on crafted batches, no training needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import augment, train
from pipeline.data import Preprocess

PRE = Preprocess(size=(6, 8), channels=3, scale=1 / 255, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


def _batch() -> tuple[np.ndarray, torch.Tensor]:
    raw = np.random.default_rng(0).integers(0, 200, size=(4, 3, 6, 8)).astype(np.float32)
    return raw, torch.from_numpy(PRE.apply(raw))


def _fixed(monkeypatch, flip: float, brightness: float = 1.0, contrast: float = 1.0) -> None:
    """No random crop (the whole image), a set flip probability and fixed colour factors."""
    monkeypatch.setattr(augment, "CROP_AREA", (1.0, 1.0))
    monkeypatch.setattr(augment, "CROP_RATIO", (1.0, 1.0))
    monkeypatch.setattr(augment, "FLIP_PROBABILITY", flip)
    monkeypatch.setattr(augment, "BRIGHTNESS", (brightness, brightness))
    monkeypatch.setattr(augment, "CONTRAST", (contrast, contrast))


def test_whole_image_crop_without_flip_is_the_identity(monkeypatch):
    _fixed(monkeypatch, flip=0.0)
    _, x = _batch()
    assert torch.allclose(augment.photo(x, PRE.mean, PRE.std), x, atol=1e-5)


def test_flip_mirrors_the_columns(monkeypatch):
    _fixed(monkeypatch, flip=1.0)
    _, x = _batch()
    assert torch.allclose(augment.photo(x, PRE.mean, PRE.std), x.flip(-1), atol=1e-5)


def test_brightness_on_normalized_inputs_equals_brightness_on_raw_pixels(monkeypatch):
    _fixed(monkeypatch, flip=0.0, brightness=1.1)
    raw, x = _batch()
    expected = torch.from_numpy(PRE.apply(raw * 1.1))
    assert torch.allclose(augment.photo(x, PRE.mean, PRE.std), expected, atol=1e-5)


def test_default_augmentation_is_random_but_seeded():
    _, x = _batch()
    torch.manual_seed(3)
    first = augment.photo(x, PRE.mean, PRE.std)
    torch.manual_seed(3)
    again = augment.photo(x, PRE.mean, PRE.std)
    assert first.shape == x.shape and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.allclose(first, x, atol=1e-3)


def test_balancing_weights_and_sampler():
    y = np.array([0] * 400 + [1] * 3)
    weights, sampler = train._balancing(y, 2, "weights")
    assert sampler is None and weights.tolist() == pytest.approx([403 / 800, 403 / 6])
    weights, sampler = train._balancing(y, 2, "sampler")
    assert weights is None
    drawn = y[torch.multinomial(sampler, 4000, replacement=True, generator=torch.Generator().manual_seed(0)).numpy()]
    assert 0.45 < drawn.mean() < 0.55  # the 3 rare images are drawn half the time
    assert train._balancing(y, 2, "none") == (None, None)
