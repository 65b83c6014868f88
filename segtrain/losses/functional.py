"""Pure loss functions for segmentation: tensors in, unreduced losses out, one function per loss term.

A loss term is a function `f(y_true, y_pred, <settings>, *, class_weights, ignore_false_negatives,
from_logits, ignore_index)` registered in `TERMS` under its config name. Its settings are the
keyword arguments between y_pred and `*`: their names, annotations (the types of
`segtrain.config`, e.g. `NonNegative`) and defaults are the term's config schema
(`segtrain.config.term_class`), and the Keras wrapper (`segtrain.losses.classes.SegmentationLoss`)
stores them and returns them from `get_config`. The four arguments after `*` are the same for
every term.

Conventions shared by every function here:

- `y_true`: class indices, shape (B, H, W) or (B, H, W, 1), any int or float dtype. Pixels
  equal to `ignore_index` (and any value outside [0, K)) are *invalid* and count nowhere.
- `y_pred`: logits (B, H, W, C), or probabilities when `from_logits=False`. C == 1 is a
  binary problem (sigmoid, K = 2 classes: 0 background, 1 foreground); C >= 2 is softmax
  over K = C classes. Everything is computed in float32 (float16 input is cast first).
- `class_weights`: None or K non-negative numbers (K = 2 for the one-channel case).
- `ignore_false_negatives`: class indices whose misses are free: pixels whose *true* class
  is one of them are "don't care" in every loss (the cost matrix row of the class is zero),
  while predicting the class on other pixels still costs as usual.

Per-pixel losses (`cross_entropy`, `cost_sensitive_cross_entropy`, `focal`) return
(B, H, W) with zeros at invalid pixels; overlap losses (`tversky`, `dice`, `jaccard`)
return (B,) per-image losses, or a scalar when pooled over the batch. The Keras wrapper
reduces each by its shape.

Under tf.distribute (inside `strategy.run`), pooled overlap counts are summed over the
replicas (`replica_sum`) before the ratio is taken, so every replica computes the loss of
the *global* batch, exactly as one device would.
"""

import functools
import inspect
from typing import Optional

import numpy as np

from segtrain.value_types import CostMatrix, Fraction, NonNegative, PerClass, Positive
from segtrain.decision import cost_matrix_from
from segtrain.labels import IGNORE_INDEX


class _TensorFlow:
    """`tf`, imported on first use: validating a config reads these functions' settings without TensorFlow."""

    def __getattr__(self, name):
        import tensorflow

        return getattr(tensorflow, name)


tf = _TensorFlow()

EPSILON = 1e-7
"""Clip for probabilities given with `from_logits=False`, and floor of overlap denominators."""

_TINY = float(np.finfo(np.float32).tiny)

COMMON_ARGS = ("class_weights", "ignore_false_negatives", "from_logits", "ignore_index")
"""Keyword arguments every loss function takes after `*`; not settings of its own."""


def num_classes(y_pred):
    """K for a prediction tensor: 2 for one sigmoid channel, else the channel count."""
    channels = y_pred.shape[-1]
    if channels is None:
        raise ValueError("y_pred needs a static channel dimension (B, H, W, C).")
    return 2 if channels == 1 else int(channels)


def prepare(y_true, y_pred, from_logits=True, ignore_index=IGNORE_INDEX):
    """Common preparation of labels and logits.

    Returns:
        labels: int32 (B, H, W), invalid pixels replaced by 0 (safe to gather/one-hot).
        valid: float32 (B, H, W), 1 at valid pixels, 0 at ignored ones.
        log_p: float32 (B, H, W, K), log class probabilities.
        log_1mp: float32 (B, H, W, K), log(1 - p) computed without cancellation.
    """
    y_pred = tf.cast(tf.convert_to_tensor(y_pred), tf.float32)
    labels, is_valid = valid_labels(y_true, y_pred, ignore_index)
    log_p, log_1mp = log_probabilities(y_pred, from_logits)
    return labels, tf.cast(is_valid, tf.float32), log_p, log_1mp


def valid_labels(y_true, y_pred, ignore_index=IGNORE_INDEX):
    """int32 labels (B, H, W) with invalid pixels set to 0, and the bool mask of valid ones."""
    k = num_classes(y_pred)
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == y_pred.shape.rank:
        y_true = tf.squeeze(y_true, axis=-1)
    if y_true.dtype.is_floating:
        y_true = tf.round(y_true)
    y_true = tf.cast(y_true, tf.int32)
    is_valid = (y_true != ignore_index) & (y_true >= 0) & (y_true < k)
    return tf.where(is_valid, y_true, tf.zeros_like(y_true)), is_valid


def log_probabilities(y_pred, from_logits=True):
    """log(p) and log(1 - p), each (..., K), for sigmoid (C == 1) or softmax (C >= 2).

    Formula:
    ```
    sigmoid: log p_fg = -softplus(-x), log p_bg = -softplus(x) = log(1 - p_fg)
    softmax: log(1 - p_j) = logsumexp_{j' != j}(x) - logsumexp(x)
    ```
    The sum over j' != j is taken directly for the largest logit (no `1 - p` cancellation)
    and as `S - e_j` for the others, where it is at least 1 after shifting by the maximum.
    """
    y_pred = tf.cast(y_pred, tf.float32)
    if y_pred.shape[-1] == 1:
        if from_logits:
            x = y_pred
        else:
            p = tf.clip_by_value(y_pred, EPSILON, 1.0 - EPSILON)
            x = tf.math.log(p) - tf.math.log1p(-p)
        log_fg = tf.math.log_sigmoid(x)
        log_bg = tf.math.log_sigmoid(-x)
        return tf.concat([log_bg, log_fg], -1), tf.concat([log_fg, log_bg], -1)
    if from_logits:
        x = y_pred
    else:
        x = tf.math.log(tf.clip_by_value(y_pred, EPSILON, 1.0))
    k = y_pred.shape[-1]
    shifted = x - tf.stop_gradient(tf.reduce_max(x, axis=-1, keepdims=True))
    e = tf.exp(shifted)
    total = tf.reduce_sum(e, axis=-1, keepdims=True)
    is_max = tf.one_hot(tf.argmax(x, axis=-1), k, dtype=tf.float32)
    others_of_max = tf.reduce_sum(e * (1.0 - is_max), axis=-1, keepdims=True)
    others = tf.where(is_max > 0, others_of_max, total - e)
    log_total = tf.math.log(total)
    log_p = shifted - log_total
    log_1mp = tf.math.log(tf.maximum(others, _TINY)) - log_total
    return log_p, log_1mp


def replica_sum(x):
    """`x` (a tensor or nested structure) summed over the replicas of a tf.distribute step.

    Outside `strategy.run`, or with one replica, `x` itself. Differentiable: the gradient
    of an all-reduce sum is the all-reduce sum of the incoming gradients.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_reduce(tf.distribute.ReduceOp.SUM, x)


def _pixel_weights(labels, valid, k, class_weights, ignore_false_negatives):
    """Per-pixel factor w[y] * valid, with zero weight for classes in ignore_false_negatives."""
    w = np.ones(k, np.float32) if class_weights is None else np.asarray(class_weights, np.float32)
    if w.shape != (k,):
        raise ValueError(f"class_weights has {w.size} entries, the prediction has {k} classes.")
    w = w.copy()
    for c in ignore_false_negatives or ():
        w[int(c)] = 0.0
    return tf.gather(tf.constant(w), labels) * valid


def cross_entropy(
    y_true,
    y_pred,
    label_smoothing: Fraction = 0.0,
    *,
    class_weights=None,
    ignore_false_negatives=None,
    from_logits=True,
    ignore_index=IGNORE_INDEX,
):
    """Per-pixel class-weighted cross-entropy (binary cross-entropy for one channel).

    Formula:
    ```
    q = (1 - label_smoothing) * one_hot(y) + label_smoothing / K
    loss[b, h, w] = w[y] * -sum_j q_j * log p_j        (0 at ignored pixels)
    ```
    For one channel this is exactly Keras's `binary_crossentropy` (its smoothing pulls the
    target towards 0.5 = 1/K). The mean over valid pixels is taken by the Keras class.

    Args:
        label_smoothing: float in [0, 1). Defaults to 0.
        class_weights: None or K weights; `w[y]` multiplies the pixel's loss.
        ignore_false_negatives: class indices whose true pixels cost nothing.

    Returns:
        (B, H, W) float32.
    """
    labels, valid, log_p, _ = prepare(y_true, y_pred, from_logits, ignore_index)
    k = log_p.shape[-1]
    target = tf.one_hot(labels, k, dtype=tf.float32)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / k
    ce = -tf.reduce_sum(target * log_p, axis=-1)
    return ce * _pixel_weights(labels, valid, k, class_weights, ignore_false_negatives)


def cost_sensitive_cross_entropy(
    y_true,
    y_pred,
    cost_matrix: Optional[CostMatrix] = None,
    fp_cost: Optional[PerClass] = None,
    fn_cost: Optional[PerClass] = None,
    *,
    class_weights=None,
    ignore_false_negatives=None,
    from_logits=True,
    ignore_index=IGNORE_INDEX,
):
    """Cost-sensitive cross-entropy: each wrong class is pushed down by what it costs.

    Formula:
    ```
    loss[b, h, w] = w[y] * sum_j C[y][j] * -log(1 - p_j)
    ```
    `C[true][pred]` has a zero diagonal. With two classes and `C = [[0, fp], [fn, 0]]` this
    is BCE with `fn` on positives and `fp` on negatives; with `C = 1 - I` it is exactly BCE.

    Args:
        cost_matrix: K x K non-negative costs, zero diagonal. Defaults to the shorthand below.
        fp_cost: K prices of predicting each class where it is not (shorthand, see
            `segtrain.decision.shorthand_cost_matrix`). Defaults to ones.
        fn_cost: K prices of missing each class. Defaults to ones; no costs at all give
            `C = 1 - I`, which for two classes is exactly binary cross-entropy.
        class_weights: None or K weights multiplying each pixel's loss by w[y].
        ignore_false_negatives: class indices whose rows are zeroed (their misses are free).

    Returns:
        (B, H, W) float32.
    """
    labels, valid, log_p, log_1mp = prepare(y_true, y_pred, from_logits, ignore_index)
    k = log_p.shape[-1]
    costs = cost_matrix_from(k, cost_matrix, fp_cost, fn_cost, ignore_false_negatives or ()).astype(np.float32)
    if costs.shape != (k, k):
        raise ValueError(f"cost_matrix has shape {costs.shape}, the prediction has {k} classes.")
    row = tf.gather(tf.constant(costs), labels)
    pixel = -tf.reduce_sum(row * log_1mp, axis=-1)
    return pixel * _pixel_weights(labels, valid, k, class_weights, None)


def focal(
    y_true,
    y_pred,
    gamma: NonNegative = 2.0,
    *,
    class_weights=None,
    ignore_false_negatives=None,
    from_logits=True,
    ignore_index=IGNORE_INDEX,
):
    """Focal loss (Lin et al., 2017); class weights play the role of the per-class alpha.

    Formula:
    ```
    loss[b, h, w] = w[y] * (1 - p_y) ** gamma * -log p_y
    ```
    `(1 - p_y) ** gamma` is computed as `exp(gamma * log(1 - p_y))`, finite with finite
    gradients for every gamma >= 0 and every logit. gamma = 0 gives `cross_entropy`.
    The binary alpha of the paper is `class_weights=[1 - alpha, alpha]`.

    Args:
        gamma: focusing exponent >= 0. Defaults to 2.

    Returns:
        (B, H, W) float32.
    """
    labels, valid, log_p, log_1mp = prepare(y_true, y_pred, from_logits, ignore_index)
    k = log_p.shape[-1]
    target = tf.one_hot(labels, k, dtype=tf.float32)
    log_pt = tf.reduce_sum(target * log_p, axis=-1)
    log_1mpt = tf.reduce_sum(target * log_1mp, axis=-1)
    modulating = tf.exp(gamma * log_1mpt) if gamma else 1.0
    weights = _pixel_weights(labels, valid, k, class_weights, ignore_false_negatives)
    return -modulating * log_pt * weights


def overlap_counts(
    y_true,
    y_pred,
    per_image=False,
    ignore_false_negatives=None,
    from_logits=True,
    ignore_index=IGNORE_INDEX,
):
    """Soft true positives, false positives and false negatives per class.

    Returns:
        tp, fp, fn, present: each (B, K) when `per_image`, else (K,) summed over the whole
        batch, and over all replicas inside a distributed step (the global batch).
        `present` is 1 for a class that has a true pixel or is the arg-max prediction of
        some pixel (the metrics' rule). Pixels whose true class is in
        ignore_false_negatives add to that class's TP (hits are still rewarded) but to no
        FN and no FP: missing them is free.
    """
    labels, valid, log_p, log_1mp = prepare(y_true, y_pred, from_logits, ignore_index)
    k = log_p.shape[-1]
    counted = valid
    for c in ignore_false_negatives or ():
        counted = counted * tf.cast(labels != int(c), tf.float32)
    valid = valid[..., None]
    counted = counted[..., None]
    t = tf.one_hot(labels, k, dtype=tf.float32) * valid
    p = tf.exp(log_p) * valid
    q = tf.exp(log_1mp) * valid  # 1 - p, accurate also where p is close to 1
    hard = tf.one_hot(tf.argmax(log_p, axis=-1), k, dtype=tf.float32) * valid
    axes = [1, 2] if per_image else [0, 1, 2]
    tp = tf.reduce_sum(t * p, axis=axes)
    fp = tf.reduce_sum((counted - t * counted) * p, axis=axes)
    fn = tf.reduce_sum(t * counted * q, axis=axes)
    support = tf.reduce_sum(t + hard, axis=axes)
    if not per_image:
        tp, fp, fn, support = replica_sum((tp, fp, fn, support))
    return tp, fp, fn, tf.cast(support > 0, tf.float32)


def tversky(
    y_true,
    y_pred,
    alpha: NonNegative = 0.5,
    beta: NonNegative = 0.5,
    gamma: Positive = 1.0,
    smooth: NonNegative = 1.0,
    per_image: bool = False,
    include_background: bool = False,
    *,
    class_weights=None,
    ignore_false_negatives=None,
    from_logits=True,
    ignore_index=IGNORE_INDEX,
):
    """Tversky loss, the general soft-overlap loss (Salehi et al., 2017); focal with gamma.

    Formula:
    ```
    TI_c   = (TP_c + smooth) / (TP_c + alpha * FP_c + beta * FN_c + smooth)
    loss_c = (1 - TI_c) ** gamma
    loss   = sum_c w_c * present_c * loss_c / sum_c w_c * present_c
    ```
    with soft counts `TP_c = sum p_c * [y = c]`, `FP_c = sum p_c * [y != c]`,
    `FN_c = sum (1 - p_c) * [y = c]` over valid pixels (of one image when `per_image`, of
    the whole batch otherwise). **alpha weighs false positives, beta false negatives**
    (Keras < 3.16's `keras.losses.Tversky` has them the other way round).
    alpha = beta = 0.5 is Dice, alpha = beta = 1 is Jaccard (soft IoU).

    Absent classes: a class with no true pixel and no pixel predicted as it (arg-max, the
    same rule as the metrics) is left out of the average, so the loss keeps its scale
    whatever the number of classes in a batch; with none present the loss is 0. A class
    with false positives only is present: its loss tends to 1 as they grow.

    Smoothing: `smooth` (default 1, in pixels) is added to numerator and denominator, so a
    perfect prediction scores exactly 0 and a false-positive-only class still has a
    gradient; the denominator is also floored at 1e-7 so `smooth=0` stays finite.

    Args:
        alpha: weight of false positives (>= 0). Defaults to 0.5.
        beta: weight of false negatives (>= 0). Defaults to 0.5.
        gamma: exponent (> 0); gamma != 1 is the focal Tversky loss (Abraham & Khan's
            exponent 1/gamma = 3/4 is `gamma=0.75` here). Defaults to 1.
        smooth: additive smoothing (>= 0). Defaults to 1.
        per_image: score each image, then average over classes per image (B,);
            otherwise pool the counts over the batch (scalar). Defaults to False.
        include_background: average over all K classes (for one channel: [bg, fg]).
            Defaults to False: class 0 (the background) is left out and the foreground
            classes are scored, as Keras's Dice/Tversky on one channel, SMP's binary mode
            and nnU-Net do; averaging in the background's score would cancel the
            asymmetry alpha and beta set (a false positive of the foreground is a false
            negative of the background).
        class_weights: None or K weights for the average over classes.

    Returns:
        (B,) float32 when `per_image`, else a float32 scalar.
    """
    tp, fp, fn, present = overlap_counts(
        y_true, y_pred, per_image, ignore_false_negatives, from_logits, ignore_index
    )
    k = tp.shape[-1]
    index = tf.maximum(tp + alpha * fp + beta * fn + smooth, EPSILON)
    loss = 1.0 - (tp + smooth) / index
    if gamma != 1:
        floor = EPSILON if gamma < 1 else 0.0
        loss = tf.pow(tf.maximum(loss, floor), gamma)
    w = np.ones(k, np.float32) if class_weights is None else np.array(class_weights, np.float32)
    if w.shape != (k,):
        raise ValueError(f"class_weights has {w.size} entries, the prediction has {k} classes.")
    if not include_background:
        w[0] = 0.0
    weight = tf.constant(w) * present
    return tf.math.divide_no_nan(
        tf.reduce_sum(weight * loss, axis=-1), tf.reduce_sum(weight, axis=-1)
    )


def special_case(general, **fixed):
    """Decorator: the decorated loss is `general` with the `fixed` settings; its settings are general's others.

    Example: `@special_case(tversky, alpha=0.5, beta=0.5)` over `def dice(y_true, y_pred, **settings)`.
    """

    def wrap(declared):
        @functools.wraps(declared)
        def loss(y_true, y_pred, **settings):
            return general(y_true, y_pred, **fixed, **settings)

        signature = inspect.signature(general)
        loss.__signature__ = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name not in fixed]
        )
        return loss

    return wrap


@special_case(tversky, alpha=0.5, beta=0.5)
def dice(y_true, y_pred, **settings):
    """Soft Dice loss: `tversky` with alpha = beta = 0.5, i.e. 1 - 2TP / (2TP + FP + FN)."""


@special_case(tversky, alpha=1.0, beta=1.0)
def jaccard(y_true, y_pred, **settings):
    """Soft Jaccard (IoU) loss: `tversky` with alpha = beta = 1, i.e. 1 - TP / (TP + FP + FN)."""


TERMS = {
    "cross_entropy": cross_entropy,
    "cost_sensitive": cost_sensitive_cross_entropy,
    "focal": focal,
    "jaccard": jaccard,
    "dice": dice,
    "tversky": tversky,
}
"""The loss terms a config can name (`loss.terms[i].name`): config name -> loss function."""


def term_settings(fn) -> list:
    """The settings of loss function `fn`: its `inspect.Parameter`s after (y_true, y_pred), less COMMON_ARGS."""
    parameters = list(inspect.signature(fn, eval_str=True).parameters.values())[2:]
    return [p for p in parameters if p.name not in COMMON_ARGS and p.kind is not p.VAR_KEYWORD]
