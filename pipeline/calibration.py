"""How much a model's confidence can be trusted: NLL, expected calibration error, temperature scaling.

- NLL: -log p(true class) per image (a proper scoring rule: rewards confident right answers and
  punishes confident wrong ones).
- ECE (Guo et al. 2017, "On Calibration of Modern Neural Networks"): the test images are
  binned by confidence (the top probability) into equal-width bins; ECE is the image-weighted
  mean over bins of |accuracy - mean confidence|. 0 is perfectly calibrated.
- Temperature scaling: logits / T with one T > 0 fitted to minimize NLL on the VALIDATION split;
  it never changes the argmax, so accuracy is untouched. It is the cheap baseline MC dropout
  must beat to be worth N forward passes.

Numpy (and scipy for the 1-D fit) only; no torch.
"""

from __future__ import annotations

import numpy as np

from pipeline.predict import softmax

_TINY = 1e-12


def nll(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-image negative log-likelihood of the true class, in nats (probabilities clipped at 1e-12)."""
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return -np.log(np.clip(picked, _TINY, 1.0))


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    # Equal-width bins over (0, 1]; a confidence of exactly 1 goes in the last bin.
    return np.minimum((np.asarray(confidence, dtype=np.float64) * bins).astype(np.int64), bins - 1)


def ece_from(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE of flat arrays of top-class confidence and 0/1 correctness (any shape; flattened)."""
    confidence, correct = np.ravel(confidence).astype(np.float64), np.ravel(correct).astype(np.float64)
    index = _bin_index(confidence, bins)
    gap = np.abs(np.bincount(index, correct, minlength=bins) - np.bincount(index, confidence, minlength=bins))
    return float(gap.sum() / max(len(confidence), 1))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of class probabilities against integer labels."""
    probs = np.asarray(probs)
    return ece_from(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[dict]:
    """Per bin: its edges, image count, mean confidence and accuracy (None for an empty bin): the reliability diagram."""
    confidence, correct = np.ravel(confidence).astype(np.float64), np.ravel(correct).astype(np.float64)
    index = _bin_index(confidence, bins)
    count = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, confidence, minlength=bins)
    correct_sum = np.bincount(index, correct, minlength=bins)
    return [{"low": b / bins, "high": (b + 1) / bins, "count": int(count[b]),
             "confidence": float(conf_sum[b] / count[b]) if count[b] else None,
             "accuracy": float(correct_sum[b] / count[b]) if count[b] else None} for b in range(bins)]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimizing the mean NLL of softmax(logits / T) on these (validation) logits and labels."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)

    def loss(log_t: float) -> float:
        return float(nll(softmax(logits / np.exp(log_t)), labels).mean())

    # log T in [ln 0.05, ln 20]: wide enough for any sane network, bounded so a separable split cannot run off.
    result = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))
