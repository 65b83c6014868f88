"""Temperature scaling: one temperature T that makes a run's probabilities calibrated.

A model trained with class weights, focal or Tversky terms or high costs gives skewed
probabilities, and the least-cost rule `fp / (fp + fn)` is right only for calibrated ones.
Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fitted on a labelled
split; it changes no arg-max, only how sure the model says it is.

Formula:
    one output channel:  p_fg = sigmoid(z / T)          (K = 2 channels [1 - p_fg, p_fg])
    C >= 2 channels:     p    = softmax(z / T)
    T* = argmin_T  NLL(T) = -1/N sum_i log p_{y_i}(z_i / T)     over valid (non-ignored) pixels

NLL is convex in 1/T (a log-sum-exp of functions linear in 1/T minus a linear term), hence
unimodal in log T, so a golden-section search over log T in `TEMPERATURE_BOUNDS` finds the
minimum (NumPy only).

Expected calibration error, 15 equal-width bins over the top-class confidence:
    conf_i = max_k p_ik, pred_i = the arg-max class (two classes: foreground when p_fg >= 0.5, as
    `segtrain.decision` decides), B_m = {i : (m - 1) / M < conf_i <= m / M}, m = 1..M, M = 15,
    ECE = sum_m |B_m| / N * | acc(B_m) - conf(B_m) |
with acc(B_m) the share of B_m whose arg-max class is the true class and conf(B_m) the mean
confidence of B_m. With two classes the confidence is >= 0.5, so the bins below it stay empty.

How the logits are collected: through `Predictor.logits`, the same resize, reflect padding,
tiles, window and flips as `Predictor.probabilities`, blended as *logits*
(`segtrain.inference.predict_logits`). Prediction applies T to each tile's (and flip's) logits
before blending probabilities, so T is applied to exactly the logits it was fitted on for an
image of one tile without TTA (the usual case on a validation split), and in tile overlaps and
under TTA to the parts whose blend it was fitted on. At most `MAX_PIXELS` valid pixels are
kept: a seeded uniform sample without replacement (each pixel draws a random key, the smallest
keys are kept: bottom-k sampling), so memory stays flat whatever the split's size.

The result goes to the run folder as `calibration.json` (`CALIBRATION_FILE`); `Predictor.load`
reads it (unless `predict.calibrate: false`) only for the model file it was fitted on
(`model_sha256`), so a changed best.keras never gets an old temperature.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import click
import numpy as np

from segtrain.labels import IGNORE_INDEX

CALIBRATION_FILE = "calibration.json"
ECE_BINS = 15
MAX_PIXELS = 2_000_000
"""Valid pixels kept for the fit at most (a seeded uniform sample beyond that)."""
TEMPERATURE_BOUNDS = (0.01, 100.0)
SEED = 0


# ---------------------------------------------------------------------------- the math


def apply_temperature(logits, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (..., K) float64 of logits (..., C) divided by T: sigmoid -> [1 - p, p] for C == 1,
    softmax otherwise (the NumPy twin of `segtrain.decision.probabilities_tf` at T = 1)."""
    s = np.asarray(logits, dtype=np.float64) / float(temperature)
    if s.shape[-1] == 1:
        p = 1.0 / (1.0 + np.exp(-s))
        return np.concatenate([1.0 - p, p], axis=-1)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float:
    """Mean NLL of the true classes under the logits (N, C) divided by T; labels (N,) class indices.

    Formula (s = z / T):
        C == 1: log(1 + exp(s)) - y * s
        C >= 2: logsumexp(s) - s_y
    """
    s = np.asarray(logits, dtype=np.float64) / float(temperature)
    y = np.asarray(labels, dtype=np.int64)
    if s.shape[-1] == 1:
        s = s[..., 0]
        return float(np.mean(np.logaddexp(0.0, s) - y * s))
    top = s.max(axis=-1)
    lse = top + np.log(np.exp(s - top[:, None]).sum(axis=-1))
    return float(np.mean(lse - np.take_along_axis(s, y[:, None], axis=-1)[:, 0]))


def fit_temperature(logits, labels, bounds=TEMPERATURE_BOUNDS, tolerance: float = 1e-6) -> float:
    """T minimising `negative_log_likelihood` by golden-section search over log T within `bounds`.

    Args:
        logits: (N, C) logits of valid pixels (C == 1: binary).
        labels: (N,) their true class indices.
        bounds: (low, high) of T; the search ends within `tolerance` of log T.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no labelled pixels to fit a temperature on")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    f = lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t))  # noqa: E731
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tolerance:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return float(math.exp((lo + hi) / 2.0))


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
    """A seeded uniform sample of at most `limit` (logits, label) pixels, without replacement, in flat memory
    (bottom-k: every pixel draws a uniform key, the `limit` smallest keys are kept)."""

    def __init__(self, limit: int = MAX_PIXELS, seed: int = SEED):
        self.limit = int(limit)
        self.rng = np.random.default_rng(seed)
        self.keys = np.zeros(0, np.float64)
        self.logits: Optional[np.ndarray] = None
        self.labels = np.zeros(0, np.int64)
        self.seen = 0

    def add(self, logits: np.ndarray, truth: np.ndarray) -> None:
        valid = np.asarray(truth) != IGNORE_INDEX
        z = np.asarray(logits, np.float32)[valid]
        y = np.asarray(truth)[valid].astype(np.int64)
        keys = self.rng.random(len(y))
        self.seen += len(y)
        if len(self.keys) >= self.limit:  # only keys below the largest kept one can enter
            keep = keys < self.keys.max()
            z, y, keys = z[keep], y[keep], keys[keep]
        if self.logits is None:
            self.logits = np.zeros((0, z.shape[-1]), np.float32)
        self.keys = np.concatenate([self.keys, keys])
        self.logits = np.concatenate([self.logits, z])
        self.labels = np.concatenate([self.labels, y])
        if len(self.keys) > self.limit:
            kept = np.argpartition(self.keys, self.limit - 1)[: self.limit]
            self.keys, self.logits, self.labels = self.keys[kept], self.logits[kept], self.labels[kept]


def collect_logits(predictor, pairs, mapping, max_image_pixels: int, limit: int = MAX_PIXELS,
                   seed: int = SEED) -> PixelSample:
    """Logits and labels of a seeded sample of the valid pixels of `pairs`, through `predictor.logits`."""
    from segtrain.data.scan import labelled_images

    sample = PixelSample(limit, seed)
    for _, image, truth in labelled_images(pairs, mapping, predictor.channels, max_image_pixels, "calibrating"):
        sample.add(predictor.logits(image), truth)
    return sample


# ---------------------------------------------------------------------------- the run folder


def model_digest(model_path: Path) -> str:
    """sha256 of a model file: calibration.json applies to that file only."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fit_calibration(model_path: Path, config, pairs, mapping, run_dir: Path, split: str, log=click.echo,
                    limit: int = MAX_PIXELS) -> dict:
    """Fit T for the model on `pairs` (the labelled split `split`), write RUN/calibration.json, return it."""
    from segtrain.atomic import write_json
    from segtrain.errors import DataError
    from segtrain.predict import Predictor

    predictor = Predictor.load(Path(model_path), config, log=lambda *a, **k: None, temperature=1.0, tuned=False)
    sample = collect_logits(predictor, pairs, mapping, config.data.max_image_pixels, limit)
    if len(sample.labels) == 0:
        raise DataError(f"split {split!r}: no labelled (non-ignored) pixels to fit a temperature on.")
    temperature = fit_temperature(sample.logits, sample.labels)
    z, y = sample.logits, sample.labels
    result = {
        "temperature": temperature,
        "split": split,
        "pixels": int(len(y)),
        "valid_pixels_seen": int(sample.seen),
        "images": len(pairs),
        "nll_before": negative_log_likelihood(z, y, 1.0),
        "nll_after": negative_log_likelihood(z, y, temperature),
        "ece_before": expected_calibration_error(apply_temperature(z, 1.0), y),
        "ece_after": expected_calibration_error(apply_temperature(z, temperature), y),
        "ece_bins": ECE_BINS,
        "model": Path(model_path).name,
        "model_sha256": model_digest(Path(model_path)),
        "method": "temperature scaling: one T minimising the NLL of softmax(z / T) (sigmoid for one channel) "
                  "over a seeded sample of the split's valid pixels",
    }
    write_json(result, Path(run_dir) / CALIBRATION_FILE)
    if min(abs(math.log(temperature / b)) for b in TEMPERATURE_BOUNDS) < 0.01:
        log(f"warning: T = {temperature:.4g} is at the bound of the search {TEMPERATURE_BOUNDS}: the model's logits "
            "are far from calibrated (an undertrained model gives logits near 0); check the reliability diagram.")
    log(f"Calibration on {split} ({result['pixels']} pixels): T = {temperature:.4f}; NLL {result['nll_before']:.4f} "
        f"-> {result['nll_after']:.4f}, ECE {result['ece_before']:.4f} -> {result['ece_after']:.4f} "
        f"-> {Path(run_dir) / CALIBRATION_FILE}")
    return result


def load_temperature(model_path: Path, config, log=click.echo) -> float:
    """The temperature predict and eval use for `model_path`: calibration.json beside it when
    predict.calibrate is on and the file was fitted for this model file, else 1.0."""
    path = Path(model_path).parent / CALIBRATION_FILE
    if not config.predict.calibrate or not path.is_file():
        return 1.0
    info = json.loads(path.read_text())
    if info.get("model_sha256") != model_digest(Path(model_path)):
        log(f"warning: {path} was fitted for another model file ({info.get('model')}); {Path(model_path).name} is "
            f"used uncalibrated (T = 1). Run `segtrain calibrate {Path(model_path).parent}` to fit it again.")
        return 1.0
    return float(info["temperature"])


def calibrate_run(checkpoint, split: Optional[str] = None, log=click.echo) -> dict:
    """`segtrain calibrate RUN [--split S]`: fit T for the run's model on a labelled split (default: the run's
    data.val_split) and write RUN/calibration.json."""
    from segtrain.data.discovery import find_pairs
    from segtrain.data.masks import MaskMapping
    from segtrain.runs import resolve_checkpoint, run_config

    model_path, run_dir = resolve_checkpoint(checkpoint)
    config = run_config(run_dir)
    split = split or config.data.val_split
    pairs = find_pairs(config.data.root, split)
    result = fit_calibration(model_path, config, pairs, MaskMapping(config.data.mask, config.data.classes), run_dir,
                             split, log)
    if not config.predict.calibrate:
        log("warning: the run's config.yaml sets predict.calibrate: false, so predict, eval and export ignore "
            "calibration.json.")
    return result
