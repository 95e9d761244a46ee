"""Bootstrap intervals over seeds and test images, paired, and the plain verdict they support.

A study result varies for two reasons: the training seed (initialisation, shuffling, dropout
masks) and which test images happened to be drawn. Resampling only one of them understates the
uncertainty, so every interval here resamples both: each bootstrap replicate draws S seeds with
replacement and I test images with replacement, and recomputes the statistic on that
(S x I) table. A comparison of two variants is *paired*: the same seeds and images are drawn
for both in a replicate (their per-seed runs share data and initialisation seed), so the
interval is for the difference itself, not two overlapping intervals.

Numpy only; no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate on all the data and its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "level": LEVEL}


def resamples(seeds: int, images: int, reps: int, seed: int = 0):
    """`reps` pairs of index arrays (seed rows, image columns), each drawn with replacement."""
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        yield rng.integers(0, seeds, seeds), rng.integers(0, images, images)


def bootstrap(statistic: Callable[[np.ndarray, np.ndarray], float], seeds: int, images: int, reps: int,
              seed: int = 0, centred: bool = False) -> Interval:
    """Interval of `statistic(seed_rows, image_columns)`; the value is the statistic on all rows and columns.

    Percentile interval by default (right for means, which resampling does not bias). `centred=True` keeps the
    bootstrap's spread but centres it on the value (value - (median - q_low) .. value + (q_high - median)), for a
    statistic that resampling inflates, such as ECE: duplicated images make confidence bins noisier and a sum of
    |bin gaps| grows with noise, so for a well calibrated model every replicate can lie above the value (its
    percentile interval, and the basic interval mirrored from it, then exclude the value). Pass one fixed `seed`
    for every statistic that is compared, so their replicates draw the same rows and columns.
    """
    if seeds < 1 or images < 1:
        raise ValueError(f"a bootstrap needs at least one seed and one image, got {seeds} x {images}")
    value = float(statistic(np.arange(seeds), np.arange(images)))
    draws = np.array([statistic(rows, cols) for rows, cols in resamples(seeds, images, reps, seed)], dtype=np.float64)
    tail = 100 * (1 - LEVEL) / 2
    low, middle, high = np.percentile(draws, [tail, 50, 100 - tail])
    if centred:
        low, high = value - (middle - low), value + (high - middle)
    return Interval(value, float(low), float(high))


def mean_interval(table: np.ndarray, reps: int, seed: int = 0) -> Interval:
    """Interval of the mean of a (seeds x images) table, e.g. 0/1 correctness or per-image loss."""
    table = np.asarray(table, dtype=np.float64)
    return bootstrap(lambda r, c: table[r][:, c].mean(), *table.shape, reps, seed)


def paired_difference(table: np.ndarray, baseline: np.ndarray, reps: int, seed: int = 0) -> Interval:
    """Interval of mean(table) - mean(baseline), the same seeds and images drawn for both (paired)."""
    table, baseline = np.asarray(table, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if table.shape != baseline.shape:
        raise ValueError(f"a paired difference needs tables of one shape, got {table.shape} and {baseline.shape}")
    return mean_interval(table - baseline, reps, seed)


def verdict(interval: Interval, higher_is_better: bool = True) -> str:
    """'better' or 'worse' when the interval of a difference excludes 0, otherwise 'not resolved'."""
    if interval.low > 0:
        return "better" if higher_is_better else "worse"
    if interval.high < 0:
        return "worse" if higher_is_better else "better"
    return "not resolved"
