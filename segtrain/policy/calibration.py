"""How calibrated a model's probabilities are, and the pixels a temperature is fitted on.

Temperature scaling (Guo et al., 2017; the math in `segtrain.policy.temperature`) divides the logits by one
T, or by one T per class, fitted on a labelled split. A model trained with class weights, focal or Tversky
terms or high costs gives skewed probabilities, and the least-cost rule `fp / (fp + fn)` is right only for
calibrated ones.

Expected calibration error, 15 equal-width bins over the top-class confidence:
    conf_i = max_k p_ik, pred_i = the arg-max class (two classes: foreground when p_fg >= 0.5, as
    `segtrain.decision` decides), B_m = {i : (m - 1) / M < conf_i <= m / M}, m = 1..M, M = 15,
    ECE = sum_m |B_m| / N * | acc(B_m) - conf(B_m) |
with acc(B_m) the share of B_m whose arg-max class is the true class and conf(B_m) the mean
confidence of B_m. With two classes the confidence is >= 0.5, so the bins below it stay empty.

The pixels: at most `MAX_PIXELS` valid pixels of a split's logits are kept (`PixelSample`), a seeded
uniform sample without replacement (each pixel draws a random key, the smallest keys are kept: bottom-k
sampling), each with the index of its image, so memory stays flat whatever the split's size and a
held-out check can keep an image's pixels together.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from segtrain.labels import IGNORE_INDEX

ECE_BINS = 15
MAX_PIXELS = 500_000
"""Valid pixels kept for the fit at most (a seeded uniform sample beyond that): one to eleven temperatures are
fitted, and 2 million pixels made CamVid's calibration take a minute for nothing (benchmarks/eval_speed.py)."""
SEED = 0


# ---------------------------------------------------------------------------- reliability


def top_class(probs) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, its probability) per pixel of probabilities (..., K); two classes: foreground
    when p_fg >= 0.5 (the decision module's tie rule)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[-1] == 2:
        pred = (probs[..., 1] >= 0.5).astype(np.int64)
    else:
        pred = np.argmax(probs, axis=-1)
    return pred, np.take_along_axis(probs, pred[..., None], axis=-1)[..., 0]


class ReliabilityBins:
    """Streaming reliability counts over `bins` equal-width confidence bins: pixels, summed confidence and
    correct pixels per bin (module docstring for the bins and the ECE)."""

    def __init__(self, bins: int = ECE_BINS):
        self.bins = int(bins)
        self.count = np.zeros(self.bins, np.int64)
        self.confidence = np.zeros(self.bins, np.float64)
        self.correct = np.zeros(self.bins, np.int64)

    def update(self, probs, truth) -> None:
        """Count the pixels of probabilities (..., K) whose truth (...) is not IGNORE_INDEX."""
        truth = np.asarray(truth)
        valid = truth != IGNORE_INDEX
        pred, conf = top_class(np.asarray(probs)[valid])
        index = np.clip(np.ceil(conf * self.bins).astype(np.int64) - 1, 0, self.bins - 1)
        self.count += np.bincount(index, minlength=self.bins)
        self.confidence += np.bincount(index, weights=conf, minlength=self.bins)
        self.correct += np.bincount(index, weights=pred == truth[valid], minlength=self.bins).astype(np.int64)

    def ece(self) -> Optional[float]:
        """Expected calibration error; None when nothing was counted."""
        n = self.count.sum()
        if n == 0:
            return None
        return float(np.abs(self.correct - self.confidence).sum() / n)  # sum_m |B_m|/N |acc - conf|

    def curve(self) -> dict:
        """Per bin: edges, mean confidence and accuracy (None for empty bins) and pixel count."""
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.where(self.count > 0, self.confidence / np.maximum(self.count, 1), np.nan)
            acc = np.where(self.count > 0, self.correct / np.maximum(self.count, 1), np.nan)
        as_list = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731
        return {"edges": np.linspace(0.0, 1.0, self.bins + 1).tolist(), "confidence": as_list(conf),
                "accuracy": as_list(acc), "count": self.count.tolist()}


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> Optional[float]:
    """ECE of probabilities (..., K) against class indices (...) (IGNORE_INDEX pixels skipped)."""
    counts = ReliabilityBins(bins)
    counts.update(probs, labels)
    return counts.ece()


# ---------------------------------------------------------------------------- collecting logits


class PixelSample:
    """A seeded uniform sample of at most `limit` (logits, label, image index) pixels, without replacement, in flat
    memory (bottom-k: every pixel draws a uniform key, the `limit` smallest keys are kept)."""

    def __init__(self, limit: int = MAX_PIXELS, seed: int = SEED):
        self.limit = int(limit)
        self.rng = np.random.default_rng(seed)
        self.keys = np.zeros(0, np.float64)
        self.logits: Optional[np.ndarray] = None
        self.labels = np.zeros(0, np.int64)
        self.groups = np.zeros(0, np.int32)
        self.seen = 0
        self.images = 0

    def add(self, logits: np.ndarray, truth: np.ndarray) -> None:
        """Offer one image's valid pixels (logits H x W x C, truth H x W); its index is the count of images so far."""
        valid = np.asarray(truth) != IGNORE_INDEX
        z = np.asarray(logits, np.float32)[valid]
        y = np.asarray(truth)[valid].astype(np.int64)
        g = np.full(len(y), self.images, np.int32)
        self.images += 1
        keys = self.rng.random(len(y))
        self.seen += len(y)
        if len(self.keys) >= self.limit:  # only keys below the largest kept one can enter
            keep = keys < self.keys.max()
            z, y, g, keys = z[keep], y[keep], g[keep], keys[keep]
        if self.logits is None:
            self.logits = np.zeros((0, z.shape[-1]), np.float32)
        self.keys = np.concatenate([self.keys, keys])
        self.logits = np.concatenate([self.logits, z])
        self.labels = np.concatenate([self.labels, y])
        self.groups = np.concatenate([self.groups, g])
        if len(self.keys) > self.limit:
            kept = np.argpartition(self.keys, self.limit - 1)[: self.limit]
            self.keys, self.logits, self.labels, self.groups = (self.keys[kept], self.logits[kept], self.labels[kept],
                                                                self.groups[kept])
