"""Per-class results: precision, recall and support per class, the confusion matrix, and how a
variant's per-class recall compares with its parent's. numpy and scikit-learn only (no torch),
so the quantize gates and `predict`-side tools can use it.

Overall accuracy hides a rare class: with 400 images of one class and 3 of another, 98.8% can
mean the rare class is never recognised. These numbers are reported beside it, per split.
"""

from __future__ import annotations

import numpy as np


def per_class(y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, ...] | list[str]) -> dict:
    """{"classes": [{label, precision, recall, f1, support}], "confusion_matrix": rows = truth, columns = prediction}."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    index = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=index, zero_division=0)
    matrix = confusion_matrix(y_true, y_pred, labels=index)
    return {
        "classes": [{"label": str(label), "precision": round(float(p), 6), "recall": round(float(r), 6),
                     "f1": round(float(f), 6), "support": int(s)}
                    for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)],
        "confusion_matrix": matrix.tolist(),
    }


def recall_drops(reference: dict, candidate: dict, min_support: int) -> list[dict]:
    """Per class with at least `min_support` images: how many points the candidate's recall is below the reference's.

    Both arguments are `per_class` results on the same images. Sorted by drop, largest first.
    """
    drops = []
    for ours, theirs in zip(reference["classes"], candidate["classes"], strict=True):
        if ours["support"] >= min_support:
            drops.append({"label": ours["label"], "support": ours["support"], "reference_recall": ours["recall"],
                          "recall": theirs["recall"], "drop_points": round(100.0 * (ours["recall"] - theirs["recall"]), 4)})
    return sorted(drops, key=lambda d: -d["drop_points"])


def worst_recall_drop(y: np.ndarray, reference_pred: np.ndarray, candidate_pred: np.ndarray,
                      labels: tuple[str, ...] | list[str] | None, min_support: int) -> list[dict]:
    """`recall_drops` of a candidate's predictions against the reference's on the same labelled images.

    `labels` None names the classes by index.
    """
    if labels is None:
        labels = [str(i) for i in range(int(max(y.max(), reference_pred.max(), candidate_pred.max())) + 1)]
    return recall_drops(per_class(y, reference_pred, labels), per_class(y, candidate_pred, labels), min_support)
