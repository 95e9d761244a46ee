"""Per-class results: the numbers a rare class hides behind overall accuracy."""

from __future__ import annotations

import numpy as np

from pipeline import metrics


def test_a_rare_class_is_visible_per_class():
    # 400 images of "common", 3 of "rare"; the model never says "rare": 99.26% overall.
    y_true = np.array([0] * 400 + [1] * 3)
    y_pred = np.zeros_like(y_true)
    result = metrics.per_class(y_true, y_pred, ("common", "rare"))
    common, rare = result["classes"]
    assert (common["label"], common["support"], common["recall"]) == ("common", 400, 1.0)
    assert (rare["label"], rare["support"], rare["recall"], rare["precision"]) == ("rare", 3, 0.0, 0.0)
    assert common["precision"] == round(400 / 403, 6)
    assert result["confusion_matrix"] == [[400, 0], [3, 0]]
    # A model that gets them all right: the negative control.
    perfect = metrics.per_class(y_true, y_true, ("common", "rare"))
    assert [c["recall"] for c in perfect["classes"]] == [1.0, 1.0]


def test_recall_drops_only_count_classes_with_enough_support():
    labels = ("a", "b", "c")
    y = np.array([0] * 50 + [1] * 50 + [2] * 4)
    reference = metrics.per_class(y, y, labels)
    worse = y.copy()
    worse[50:55] = 0   # b loses 5 of 50: 10 points
    worse[100] = 0     # c loses 1 of 4: 25 points, but only 4 images
    drops = metrics.recall_drops(reference, metrics.per_class(y, worse, labels), min_support=20)
    assert [(d["label"], d["drop_points"]) for d in drops] == [("b", 10.0), ("a", 0.0)]
    assert metrics.recall_drops(reference, metrics.per_class(y, worse, labels), min_support=1)[0]["label"] == "c"
