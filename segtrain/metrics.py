"""Evaluation metrics: one confusion matrix per split, and the numbers derived from it.

Everything here accumulates counts over the whole split and derives ratios at the end
(never a mean of per-batch ratios):

- `confusion_matrix_np` / `ConfusionMatrix`: K x K counts, rows = true class,
  columns = predicted class, ignored pixels skipped. The Keras metric works in a
  `tf.function` and under any `tf.distribute` strategy (SUM / ON_READ state).
- `metrics_from_confusion`: per-class IoU, Dice (= F1), precision, recall, support,
  mean IoU, pixel accuracy, frequency-weighted IoU and expected cost, JSON-ready.
- `ProbabilityHistogram` and `pr_curve` / `best_f1_threshold` /
  `least_cost_threshold`: a streaming binary precision-recall curve.
- `relaxed_precision_recall` / `RelaxedPrecisionRecall`: precision and recall with a
  distance tolerance for thin structures such as roads (Mnih & Hinton, 2010).

Undefined ratios are `None` (JSON null), never 0 or 1:
- precision is None when nothing is predicted as the class (tp + fp == 0);
- recall is None when the class is not in the truth (tp + fn == 0);
- IoU and Dice are None only when the class is absent from both truth and
  prediction (tp + fp + fn == 0); such a class has `present == False`.
"""

import math

import numpy as np
import keras
import tensorflow as tf

from segtrain.decision import decide_tf, probabilities_tf
from segtrain.labels import IGNORE_INDEX


# --------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------


def _flatten_labels(a):
    """Returns a 1-D int64 array from (B, H, W), (B, H, W, 1) or any shape."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        a = np.rint(a)
    return a.reshape(-1).astype(np.int64, copy=False)


def confusion_matrix_np(y_true, y_pred, num_classes, ignore_index=IGNORE_INDEX):
    """Counts pixels per (true class, predicted class), skipping ignored pixels.

    Formula:

    ```python
    cm[i, j] = number of pixels with y_true == i and y_pred == j  (y_true != ignore_index)
    ```

    Args:
        y_true: integer class map of any shape ((B, H, W) or (B, H, W, 1)); float dtypes
            holding integers are accepted. Pixels equal to `ignore_index` are skipped.
        y_pred: predicted class map with as many elements as `y_true`.
        num_classes: K, the number of classes.
        ignore_index: label of pixels that count nowhere. Defaults to `IGNORE_INDEX` (-1).

    Returns:
        (K, K) int64 array, rows = true class, columns = predicted class.

    Example:
        >>> confusion_matrix_np([0, 1, 1, -1], [0, 1, 0, 1], 2)
        array([[1, 0],
               [1, 1]])
    """
    t = _flatten_labels(y_true)
    p = _flatten_labels(y_pred)
    if t.size != p.size:
        raise ValueError(f"y_true has {t.size} pixels but y_pred has {p.size}")
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    k = int(num_classes)
    if t.size and (t.min() < 0 or t.max() >= k or p.min() < 0 or p.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}) or equal ignore_index={ignore_index}")
    return np.bincount(t * k + p, minlength=k * k).astype(np.int64).reshape(k, k)


def labels_from_logits(logits):
    """Turns logits (B, H, W, C) into a class map (B, H, W) of int32, by the argmax rule.

    C == 1 is binary: class 1 where sigmoid(logit) >= 0.5, i.e. logit >= 0 up to float32
    rounding (a logit of exactly 0 is foreground). C >= 2: the argmax of the softmax (ties to the lowest index).
    Computed in float32 (float16 logits welcome) through `segtrain.decision.probabilities_tf`
    and `decide_tf`, the same functions as prediction and evaluation, so a pixel gets the
    same label in validation as from `predict` / `evaluate`.
    """
    return tf.cast(decide_tf(probabilities_tf(logits), "argmax"), tf.int32)


class ConfusionMatrix(keras.metrics.Metric):
    """Streaming K x K confusion matrix over integer label maps (rows true, columns predicted).

    The state is one float64 variable (counts stay exact up to 2**53; float32 would stop
    counting at 2**24 = 16.7 M pixels). Like every Keras metric its variable is
    SUM-aggregated and ON_READ-synchronised, so under a `tf.distribute` strategy each
    replica counts its own pixels and reading `result()` in cross-replica context sums
    them. Each batch is counted in int32 (exact up to 2**31 pixels per batch) and then
    added to the float64 state. Only XLA-friendly ops are used (no boolean_mask).

    Args:
        num_classes: K.
        ignore_index: label of pixels skipped. Defaults to `IGNORE_INDEX` (-1).
        name: metric name.

    Example:
        >>> cm = ConfusionMatrix(2)
        >>> cm.update_state([[0, 1, -1]], [[0, 0, 1]])
        >>> cm.result().numpy()
        array([[1., 0.],
               [1., 0.]])
    """

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX, name="confusion_matrix", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype="float64",
            aggregation="sum",
            name="matrix",
        )

    def update_state(self, y_true, y_pred):
        """Adds one batch.

        Args:
            y_true: class indices (B, H, W) or (B, H, W, 1), `ignore_index` skipped;
                float dtypes holding integers are accepted.
            y_pred: predicted class indices (integers) with as many elements as y_true;
                turn logits into labels with `labels_from_logits` first.
        """
        y_pred = tf.convert_to_tensor(y_pred)
        if not (y_pred.dtype.is_integer or y_pred.dtype == tf.bool):
            raise TypeError(
                f"ConfusionMatrix.update_state expects integer predicted labels, got {y_pred.dtype}; "
                "convert logits with segtrain.metrics.labels_from_logits"
            )
        y_true = tf.convert_to_tensor(y_true)
        if y_true.dtype.is_floating:
            y_true = tf.round(y_true)
        t = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        p = tf.reshape(tf.cast(y_pred, tf.int32), [-1])
        k = self.num_classes
        valid = tf.not_equal(t, self.ignore_index)
        index = tf.where(valid, t * k + p, tf.zeros_like(t))
        counts = tf.math.unsorted_segment_sum(tf.cast(valid, tf.int32), index, k * k)
        self.matrix.assign_add(tf.cast(tf.reshape(counts, (k, k)), "float64"))

    def result(self):
        """The (K, K) float64 matrix of counts."""
        return tf.convert_to_tensor(self.matrix)

    def reset_state(self):
        self.matrix.assign(tf.zeros((self.num_classes, self.num_classes), "float64"))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "ignore_index": self.ignore_index}


# --------------------------------------------------------------------------------------
# Metrics derived from the confusion matrix
# --------------------------------------------------------------------------------------


def _ratio(num, den):
    return float(num) / float(den) if den > 0 else None


def metrics_from_confusion(cm, class_names, cost_matrix=None):
    """Per-class and overall metrics from a K x K confusion matrix, as a JSON-ready dict.

    Formula (per class c, tp = cm[c, c], fp = column sum - tp, fn = row sum - tp):

    ```python
    iou = tp / (tp + fp + fn)          # None when tp + fp + fn == 0 (absent class)
    dice = 2 tp / (2 tp + fp + fn)     # = F1; None when absent
    precision = tp / (tp + fp)         # None when nothing predicted as c
    recall = tp / (tp + fn)            # None when c not in the truth
    mean_iou = mean of the IoUs that are not None
    pixel_accuracy = trace(cm) / sum(cm)
    frequency_weighted_iou = sum_c (support_c / sum(cm)) * iou_c   (iou_c not None)
    expected_cost = sum(cm * C) / sum(cm)                           (cost_matrix given)
    ```

    Args:
        cm: (K, K) counts, rows true, columns predicted (NumPy, tensor or nested lists;
            float counts are rounded to integers).
        class_names: K names.
        cost_matrix: optional (K, K) `C[true][pred]`; adds "expected_cost", the mean
            cost per pixel.

    Returns:
        `{"per_class": {name: {"iou", "dice", "precision", "recall", "support",
        "present"}}, "mean_iou", "pixel_accuracy", "frequency_weighted_iou",
        ["expected_cost"], "confusion_matrix", "classes", "num_pixels"}`; overall values
        are None when the matrix is empty.

    Example:
        >>> m = metrics_from_confusion([[3, 1], [0, 2]], ["bg", "fg"])
        >>> m["per_class"]["fg"]["iou"]   # 2 / (2 + 1 + 0)
        0.6666666666666666
    """
    cm = np.rint(np.asarray(cm, dtype=np.float64)).astype(np.int64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected ({k}, {k}) for {k} class names")
    total = int(cm.sum())
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    per_class, ious, fw_iou = {}, [], 0.0
    for c, name in enumerate(class_names):
        m = per_class[str(name)] = class_metrics(int(tp[c]), int(predicted[c] - tp[c]), int(support[c] - tp[c]))
        if m["iou"] is not None:
            ious.append(m["iou"])
            fw_iou += (support[c] / total) * m["iou"]
    out = {
        "per_class": per_class,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "pixel_accuracy": _ratio(int(tp.sum()), total),
        "frequency_weighted_iou": float(fw_iou) if total > 0 else None,
    }
    if cost_matrix is not None:
        cost = np.asarray(cost_matrix, dtype=np.float64)
        if cost.shape != (k, k):
            raise ValueError(f"cost matrix has shape {cost.shape}, expected ({k}, {k})")
        out["expected_cost"] = _ratio(float((cm * cost).sum()), total)
    out["confusion_matrix"] = cm.tolist()
    out["classes"] = [str(n) for n in class_names]
    out["num_pixels"] = total
    return out


def class_metrics(tp, fp, fn):
    """The per-class entry of `metrics_from_confusion` from one class's counts."""
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "support": tp + fn,
        "present": (tp + fp + fn) > 0,
    }


# --------------------------------------------------------------------------------------
# Binary precision-recall curve from a streaming histogram
# --------------------------------------------------------------------------------------


class ProbabilityHistogram:
    """Streaming histograms of foreground probabilities, one for positives, one for negatives.

    Bins: `edges = arange(num_bins + 1) / num_bins`; bin i < num_bins holds
    `edges[i] <= p < edges[i + 1]`, and an extra last bin holds p == 1.0. So for every
    threshold t = edges[i] the count of pixels with p >= t is exactly the sum of bins
    >= i: the curve is exact at the bin edges. Memory is O(num_bins), never O(pixels).

    Args:
        num_bins: number of bins over [0, 1]. Defaults to 1000.
    """

    def __init__(self, num_bins=1000):
        if int(num_bins) < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = int(num_bins)
        self.edges = np.arange(self.num_bins + 1, dtype=np.float64) / self.num_bins
        self.positives = np.zeros(self.num_bins + 1, np.int64)
        self.negatives = np.zeros(self.num_bins + 1, np.int64)

    def _bin(self, p):
        n = self.num_bins
        idx = np.clip(np.floor(p * n).astype(np.int64), 0, n)
        # floor(p * n) can be off by one through rounding: fix it against the exact edges.
        idx -= self.edges[idx] > p
        idx += (idx < n) & (self.edges[np.minimum(idx + 1, n)] <= p)
        return idx

    def update(self, fg_prob, y_true, ignore_index=IGNORE_INDEX):
        """Adds pixels.

        Args:
            fg_prob: foreground probabilities in [0, 1], any shape.
            y_true: labels with as many elements: 1 foreground, 0 background,
                `ignore_index` skipped.
        """
        p = np.asarray(fg_prob, dtype=np.float64).reshape(-1)
        t = _flatten_labels(y_true)
        if p.size != t.size:
            raise ValueError(f"fg_prob has {p.size} pixels but y_true has {t.size}")
        keep = t != ignore_index
        p, t = p[keep], t[keep]
        if p.size == 0:
            return
        if not (np.all(p >= 0.0) and np.all(p <= 1.0)):  # also catches NaN
            raise ValueError("fg_prob must hold probabilities in [0, 1] (did you pass logits?)")
        if np.any((t != 0) & (t != 1)):
            raise ValueError("y_true must hold 0, 1 or ignore_index for a binary PR curve")
        idx = self._bin(p)
        size = self.num_bins + 1
        self.positives += np.bincount(idx[t == 1], minlength=size)
        self.negatives += np.bincount(idx[t == 0], minlength=size)

    def merge(self, other):
        """Adds the counts of another histogram with the same number of bins."""
        if other.num_bins != self.num_bins:
            raise ValueError("cannot merge histograms with different num_bins")
        self.positives += other.positives
        self.negatives += other.negatives

    def reset(self):
        self.positives[:] = 0
        self.negatives[:] = 0


def pr_curve(hist):
    """Precision, recall and F1 at every bin edge of a `ProbabilityHistogram`.

    A pixel is predicted foreground when p >= threshold.

    Returns:
        dict of float64 arrays of length num_bins + 1: "thresholds" (0, 1/n, ..., 1),
        "precision" (NaN where nothing is predicted), "recall" (NaN when no positives),
        "f1" (NaN where undefined; 0 where tp == 0 and something is predicted or
        positive), and the counts "tp", "fp", "fn", "tn" (int64).
    """
    # tp[i] = positives with p >= edges[i] = sum of bins >= i
    tp = np.cumsum(hist.positives[::-1])[::-1]
    fp = np.cumsum(hist.negatives[::-1])[::-1]
    n_pos, n_neg = hist.positives.sum(), hist.negatives.sum()
    fn, tn = n_pos - tp, n_neg - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(n_pos > 0, tp / max(n_pos, 1), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return {
        "thresholds": hist.edges.copy(),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def _pick(thresholds, score, prefer):
    """Index of the best (lowest) score; ties go to the threshold closest to `prefer`."""
    best = np.nanmin(score)
    ties = np.flatnonzero(score == best)
    return int(ties[np.argmin(np.abs(thresholds[ties] - prefer))])


def best_f1_threshold(hist):
    """The bin edge with the highest F1: returns (threshold, f1).

    Ties (thresholds inside empty bins give equal F1) go to the threshold closest to 0.5.
    Returns (0.5, None) when the histogram is empty.
    """
    curve = pr_curve(hist)
    f1 = curve["f1"]
    if np.all(np.isnan(f1)):
        return 0.5, None
    i = _pick(curve["thresholds"], -np.nan_to_num(f1, nan=-1.0), 0.5)
    return float(curve["thresholds"][i]), float(f1[i])


def least_cost_threshold(hist, fp_cost, fn_cost):
    """The bin edge minimising `fp_cost * FP + fn_cost * FN` on the histogram's data.

    Returns (threshold, total_cost). Ties (equal cost inside empty bins) go to the
    threshold closest to the Bayes threshold `fp_cost / (fp_cost + fn_cost)`, the rule a
    calibrated model would use.
    """
    if fp_cost < 0 or fn_cost < 0 or fp_cost + fn_cost <= 0:
        raise ValueError("fp_cost and fn_cost must be >= 0 and not both 0")
    curve = pr_curve(hist)
    cost = fp_cost * curve["fp"].astype(np.float64) + fn_cost * curve["fn"].astype(np.float64)
    i = _pick(curve["thresholds"], cost, fp_cost / (fp_cost + fn_cost))
    return float(curve["thresholds"][i]), float(cost[i])


# --------------------------------------------------------------------------------------
# Relaxed precision / recall for thin structures
# --------------------------------------------------------------------------------------


def _disk_offsets(rho):
    """Offsets (dy, dx) with dy**2 + dx**2 <= rho**2 (Euclidean disk, centre included)."""
    r = int(math.floor(rho))
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= rho * rho]


def _dilate(mask, rho):
    """Binary dilation of (B, H, W) masks by a Euclidean disk of radius rho, per image."""
    r = int(math.floor(rho))
    if r == 0:
        return mask.copy()
    b, h, w = mask.shape
    padded = np.zeros((b, h + 2 * r, w + 2 * r), bool)
    padded[:, r:r + h, r:r + w] = mask
    out = np.zeros_like(mask)
    for dy, dx in _disk_offsets(rho):
        out |= padded[:, r + dy:r + dy + h, r + dx:r + dx + w]
    return out


def _as_batch(a, name):
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (H, W), (B, H, W) or (B, H, W, 1), got {a.shape}")
    return a.astype(bool)


def relaxed_precision_recall(pred_mask, true_mask, rho, ignore_mask=None):
    """Relaxed precision/recall counts (Mnih & Hinton, 2010) for thin structures.

    A predicted foreground pixel is correct when a true foreground pixel lies within
    Euclidean distance rho (dy**2 + dx**2 <= rho**2, a disk); a true foreground pixel is
    recalled when a predicted foreground pixel lies within rho. rho = 0 gives the
    ordinary pixel-exact counts. Distances never cross image borders or the batch axis.
    Ignored pixels are removed from both masks first: they are neither counted nor used
    as neighbours.

    Formula:

    ```python
    tp_pred = sum(pred & dilate(true, rho)); n_pred = sum(pred)
    tp_true = sum(true & dilate(pred, rho)); n_true = sum(true)
    relaxed precision = tp_pred / n_pred; relaxed recall = tp_true / n_true
    ```

    Args:
        pred_mask: predicted foreground, (H, W), (B, H, W) or (B, H, W, 1), bool-like.
        true_mask: true foreground, same shape.
        rho: tolerance in pixels (>= 0, may be fractional).
        ignore_mask: optional, True where pixels count nowhere.

    Returns:
        (tp_pred, n_pred, tp_true, n_true) as Python ints, to sum over a split.
    """
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    pred = _as_batch(pred_mask, "pred_mask")
    true = _as_batch(true_mask, "true_mask")
    if pred.shape != true.shape:
        raise ValueError(f"pred_mask {pred.shape} and true_mask {true.shape} differ in shape")
    if ignore_mask is not None:
        keep = ~_as_batch(ignore_mask, "ignore_mask")
        if keep.shape != pred.shape:
            raise ValueError(f"ignore_mask {keep.shape} and pred_mask {pred.shape} differ in shape")
        pred, true = pred & keep, true & keep
    tp_pred = int(np.count_nonzero(pred & _dilate(true, rho)))
    tp_true = int(np.count_nonzero(true & _dilate(pred, rho)))
    return tp_pred, int(np.count_nonzero(pred)), tp_true, int(np.count_nonzero(true))


class RelaxedPrecisionRecall:
    """Accumulates relaxed precision/recall counts over a split.

    Args:
        rho: tolerance in pixels (see `relaxed_precision_recall`).
    """

    def __init__(self, rho):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.rho = rho
        self.reset()

    def reset(self):
        self.tp_pred = self.n_pred = self.tp_true = self.n_true = 0

    def update(self, pred_mask, true_mask, ignore_mask=None):
        """Adds masks (see `relaxed_precision_recall`)."""
        counts = relaxed_precision_recall(pred_mask, true_mask, self.rho, ignore_mask)
        self.tp_pred += counts[0]
        self.n_pred += counts[1]
        self.tp_true += counts[2]
        self.n_true += counts[3]

    def update_labels(self, y_true, y_pred, positive_class=1, ignore_index=IGNORE_INDEX):
        """Adds label maps: foreground is `positive_class`; `ignore_index` pixels count nowhere."""
        y_true = np.asarray(y_true)
        if y_true.dtype.kind == "f":
            y_true = np.rint(y_true)
        y_pred = np.asarray(y_pred)
        self.update(y_pred == positive_class, y_true == positive_class, y_true == ignore_index)

    def result(self):
        """{"precision", "recall", "f1", "rho"}; None where undefined."""
        p = _ratio(self.tp_pred, self.n_pred)
        r = _ratio(self.tp_true, self.n_true)
        f1 = None if p is None or r is None else (0.0 if p + r == 0 else 2 * p * r / (p + r))
        return {"precision": p, "recall": r, "f1": f1, "rho": self.rho}
