"""NLL, ECE, reliability bins, temperature scaling and the paired bootstrap, on crafted inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import calibration, intervals

# --- NLL and ECE --------------------------------------------------------------------------------


def test_nll_is_minus_log_of_the_true_class():
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1])
    got = calibration.nll(probs, labels)
    assert got[:2] == pytest.approx([math.log(2), -math.log(0.8)])
    # A zero probability on the true class is clipped, not infinite.
    assert got[2] == pytest.approx(-math.log(1e-12))


def test_ece_is_zero_when_confidence_matches_accuracy():
    # 10 images at confidence 0.8 of which 8 are right; 10 at 0.6 of which 6 are right.
    confidence = np.array([0.8] * 10 + [0.6] * 10)
    correct = np.array([1] * 8 + [0] * 2 + [1] * 6 + [0] * 4)
    assert calibration.ece_from(confidence, correct, bins=15) == pytest.approx(0.0, abs=1e-12)
    # Negative control: the same confidences, every image right -> gaps of 0.2 and 0.4, weighted equally.
    assert calibration.ece_from(confidence, np.ones(20), bins=15) == pytest.approx(0.3)


def test_ece_of_probabilities_uses_the_top_class():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])  # confidence 0.9 bin: 1 of 2 right; 0.8 bin: 2 of 2 right
    assert calibration.ece(probs, labels, bins=10) == pytest.approx((2 * abs(0.5 - 0.9) + 2 * abs(1.0 - 0.8)) / 4)


def test_reliability_bins_cover_every_image_once():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.1, 1.0, 500)
    confidence[0] = 1.0  # exactly 1 belongs to the last bin
    correct = rng.uniform(size=500) < confidence
    bins = calibration.reliability(confidence, correct, bins=15)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 500
    for b in bins:
        if b["count"]:
            assert b["low"] <= b["confidence"] <= b["high"]
    weighted = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / 500
    assert weighted == pytest.approx(calibration.ece_from(confidence, correct, 15))


def test_temperature_recovers_how_much_the_logits_were_sharpened():
    from pipeline.predict import softmax

    rng = np.random.default_rng(1)
    calibrated = rng.normal(0, 2, (20000, 5))
    # Labels drawn from softmax(calibrated): those logits are calibrated by construction.
    cumulative = softmax(calibrated).cumsum(axis=1)
    labels = (rng.uniform(size=(20000, 1)) > cumulative).sum(axis=1)
    assert calibration.fit_temperature(3.0 * calibrated, labels) == pytest.approx(3.0, rel=0.05)
    assert calibration.fit_temperature(calibrated, labels) == pytest.approx(1.0, rel=0.05)
    # Temperature scaling lowers the NLL of overconfident logits and never changes the argmax.
    t = calibration.fit_temperature(3.0 * calibrated, labels)
    assert calibration.nll(softmax(3.0 * calibrated / t), labels).mean() < calibration.nll(softmax(3.0 * calibrated), labels).mean()
    assert (softmax(3.0 * calibrated / t).argmax(1) == calibrated.argmax(1)).all()


# --- the bootstrap -------------------------------------------------------------------------------


def test_mean_interval_holds_the_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(2)
    small = (rng.uniform(size=(5, 200)) < 0.9).astype(float)
    large = (rng.uniform(size=(5, 5000)) < 0.9).astype(float)
    a, b = intervals.mean_interval(small, 500), intervals.mean_interval(large, 500)
    assert a.low <= a.value <= a.high and b.low <= b.value <= b.high
    assert a.value == pytest.approx(small.mean())
    assert b.high - b.low < (a.high - a.low) / 3
    assert b.low < 0.9 < b.high


def test_interval_counts_seed_variation_not_only_images():
    # Seeds that disagree (accuracy 0.7 .. 0.95): resampling only images would give a narrow interval.
    rng = np.random.default_rng(3)
    table = np.stack([(rng.uniform(size=2000) < p).astype(float) for p in (0.7, 0.75, 0.85, 0.9, 0.95)])
    wide = intervals.mean_interval(table, 1000)
    images_only = intervals.bootstrap(lambda r, c: table[:, c].mean(), *table.shape, 1000)
    assert (wide.high - wide.low) > 3 * (images_only.high - images_only.low)


def test_paired_difference_resolves_what_two_separate_intervals_cannot():
    # Seed effects shared by both variants dwarf a steady +2 point gain: paired, it is resolved.
    rng = np.random.default_rng(4)
    base_p = np.array([0.6, 0.7, 0.8, 0.9, 0.75])[:, None]
    u = rng.uniform(size=(5, 3000))
    baseline = (u < base_p).astype(float)
    better = (u < base_p + 0.02).astype(float)
    diff = intervals.paired_difference(better, baseline, 1000)
    assert diff.value == pytest.approx(better.mean() - baseline.mean())
    assert intervals.verdict(diff) == "better" and intervals.verdict(diff, higher_is_better=False) == "worse"
    separate = intervals.mean_interval(better, 1000), intervals.mean_interval(baseline, 1000)
    assert separate[0].low < separate[1].high  # the two marginal intervals overlap
    # Negative control: a variant identical to the baseline is not resolved.
    same = intervals.paired_difference(baseline, baseline, 200)
    assert (same.low, same.high) == (0.0, 0.0) and intervals.verdict(same) == "not resolved"
    # And the sign flips with the comparison.
    assert intervals.verdict(intervals.paired_difference(baseline, better, 1000)) == "worse"


def test_paired_difference_refuses_tables_of_different_shapes():
    with pytest.raises(ValueError, match="one shape"):
        intervals.paired_difference(np.zeros((5, 10)), np.zeros((4, 10)), 100)


def test_centred_interval_keeps_the_value_that_resampling_inflates():
    # A perfectly calibrated model: the ECE of any finite sample is > 0, and resampling inflates it further.
    rng = np.random.default_rng(5)
    confidence = rng.uniform(0.5, 1.0, (5, 2000))
    correct = (rng.uniform(size=(5, 2000)) < confidence).astype(float)

    def stat(r, c):
        return calibration.ece_from(confidence[r][:, c], correct[r][:, c], 15)

    percentile = intervals.bootstrap(stat, 5, 2000, 500)
    centred = intervals.bootstrap(stat, 5, 2000, 500, centred=True)
    # The bias this guards against: the percentile interval is centred well above the value (on MNIST it lay
    # wholly above it).
    assert (percentile.low + percentile.high) / 2 > 1.2 * percentile.value
    assert centred.low <= centred.value <= centred.high
    assert centred.high - centred.low == pytest.approx(percentile.high - percentile.low)
    # For a mean (no resampling bias) centring changes little: the two intervals nearly agree.
    table = correct
    plain = intervals.bootstrap(lambda r, c: table[r][:, c].mean(), 5, 2000, 500)
    moved = intervals.bootstrap(lambda r, c: table[r][:, c].mean(), 5, 2000, 500, centred=True)
    assert abs(plain.low - moved.low) < 0.1 * (plain.high - plain.low)
