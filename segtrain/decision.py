"""Turn class probabilities into class indices: arg-max, least expected cost, or a threshold.

Rules:
```
argmax     y = argmax_j p_j                         (two classes: 1 if p_fg >= 0.5)
cost       y = argmin_j sum_i p_i C[i][j]          (expected cost of predicting j)
threshold  y = 1 if p_fg >= threshold else 0        (two classes only)
```
Ties, one rule everywhere: with two classes a tie goes to the foreground (class 1). So a
binary pixel is foreground exactly when p_fg >= 0.5 under argmax (a logit of exactly 0,
p_fg = 0.5, is foreground), when p_fg >= threshold under threshold, and when predicting
foreground costs no more than background under cost (with `C = [[0, fp], [fn, 0]]` that is
`p_fg >= fp / (fp + fn)`, `binary_threshold`). With three or more classes a tie goes to
the lowest class index (arg-max / arg-min order).

Logits become probabilities by `probabilities_tf` (sigmoid -> [1 - p, p] for one channel,
softmax otherwise, in float32) and probabilities labels by `decide` / `decide_tf`:
validation (`segtrain.metrics.labels_from_logits`), tiled prediction
(`segtrain.policy.inference`), evaluation and predict all go through them, so they label every
pixel alike. (In float32 a logit within about 6e-8 below 0 also has sigmoid exactly 0.5 and is
foreground: the rule is on the probability.)

`probs` is (..., K); a last axis of size 1 is read as the foreground probability of a
binary (sigmoid) model, i.e. K = 2.

Costs: `decision_cost_matrix(config)` is the matrix of rule "cost": predict's own costs, else
the cost_sensitive loss term's (`loss_cost_matrix`), the same matrix that term trains with.
"""

import numpy as np

from segtrain.errors import ConfigError

RULES = ("argmax", "cost", "threshold")


def shorthand_cost_matrix(fp_cost=None, fn_cost=None, num_classes=None):
    """The cost matrix of the `fp_cost` / `fn_cost` shorthand.

    Formula:
    ```
    C[t][p] = fn_cost[t] * fp_cost[p]   for p != t,     C[t][t] = 0
    ```
    fn_cost[c] is the price of missing c (a pixel of c predicted as anything else),
    fp_cost[c] the price of predicting c where it is not; unspecified costs are 1, so no
    costs at all give `1 - I`. For two classes set the foreground's costs:
    `C = [[0, fp_cost[fg]], [fn_cost[fg], 0]]`, i.e. fn_cost[fg] weighs positives and
    fp_cost[fg] negatives (background costs, if also given, multiply in).
    """
    k = num_classes or len(fp_cost if fp_cost is not None else fn_cost)
    fp = np.ones(k) if fp_cost is None else np.asarray(fp_cost, float)
    fn = np.ones(k) if fn_cost is None else np.asarray(fn_cost, float)
    return np.outer(fn, fp) * (1.0 - np.eye(k))


def cost_matrix_from(num_classes, cost_matrix=None, fp_cost=None, fn_cost=None, free_misses=()):
    """K x K costs `C[true][pred]`: `cost_matrix` if given, else the fp_cost / fn_cost shorthand.

    The rows of the classes in `free_misses` (ignore_false_negatives) are zero: missing them costs nothing.
    """
    if cost_matrix is None:
        matrix = shorthand_cost_matrix(fp_cost, fn_cost, num_classes)
    else:
        matrix = np.array(cost_matrix, float)
    matrix[[int(c) for c in free_misses], :] = 0.0
    return matrix


def loss_cost_matrix(loss, class_names):
    """The cost_sensitive term's K x K matrix of a `LossConfig` (free misses zeroed, as in training), or None."""
    for term in loss.terms:
        if term.name == "cost_sensitive":
            free = loss.free_misses(term, class_names)
            return cost_matrix_from(len(class_names), term.cost_matrix, term.fp_cost, term.fn_cost, free)
    return None


def decision_cost_matrix(config):
    """The K x K matrix for decision=cost: predict's own costs, else the cost_sensitive loss term's, else None."""
    predict, classes = config.predict, config.data.classes
    if any(costs is not None for costs in (predict.cost_matrix, predict.fp_cost, predict.fn_cost)):
        return cost_matrix_from(len(classes), predict.cost_matrix, predict.fp_cost, predict.fn_cost)
    return loss_cost_matrix(config.loss, classes)


def _check(rule, k, threshold, cost_matrix):
    if rule not in RULES:
        raise ConfigError(f"decision rule {rule!r} is unknown; choose from {', '.join(RULES)}.")
    if rule == "cost":
        if cost_matrix is None:
            raise ConfigError(
                "decision rule 'cost' needs a cost matrix: add a cost_sensitive loss term "
                "(cost_matrix or fp_cost/fn_cost) or choose rule 'argmax'."
            )
        matrix = np.asarray(cost_matrix, np.float64)
        if matrix.shape != (k, k):
            raise ConfigError(
                f"decision cost matrix has shape {matrix.shape}, "
                f"expected ({k}, {k}) for {k} classes."
            )
        return matrix
    if rule == "threshold":
        if k != 2:
            raise ConfigError(
                f"decision rule 'threshold' is for two classes, the model has {k}; "
                "use 'argmax' or 'cost'."
            )
        if threshold is None or not 0.0 <= float(threshold) <= 1.0:
            raise ConfigError(
                f"decision rule 'threshold' needs a threshold in [0, 1], got {threshold!r}."
            )
    return None


def _two_class(probs):
    if probs.shape[-1] == 1:
        return np.concatenate([1.0 - probs, probs], axis=-1)
    return probs


def probabilities_tf(logits):
    """Logits (..., C) -> float32 probabilities (..., K): C == 1 is binary (sigmoid, K = 2
    channels [1 - p, p]), C >= 2 softmax (K = C). Every path from logits to labels uses it."""
    import tensorflow as tf

    logits = tf.cast(logits, tf.float32)
    if logits.shape[-1] == 1:
        p = tf.sigmoid(logits)
        return tf.concat([1.0 - p, p], axis=-1)
    return tf.nn.softmax(logits, axis=-1)


def decide(probs, rule="argmax", threshold=None, cost_matrix=None):
    """Class index per pixel from probabilities (..., K) -> int64 array (...).

    Two classes: foreground when p_fg >= 0.5 (argmax), p_fg >= threshold (threshold), or
    when its expected cost is <= that of background (cost); ties go to class 1 (module doc).

    Args:
        probs: class probabilities, last axis K (or 1 = foreground probability).
        rule: "argmax", "cost" or "threshold".
        threshold: foreground threshold for rule "threshold" (two classes).
        cost_matrix: K x K `C[true][pred]` for rule "cost".

    Raises:
        ConfigError: unknown rule, "cost" without a (matching) matrix, "threshold" without
        a threshold or with more than two classes.
    """
    probs = _two_class(np.asarray(probs, np.float64))
    k = probs.shape[-1]
    matrix = _check(rule, k, threshold, cost_matrix)
    if k == 2 and rule != "cost":
        cut = 0.5 if rule == "argmax" else float(threshold)
        return (probs[..., 1] >= cut).astype(np.int64)
    if rule == "argmax":
        return np.argmax(probs, axis=-1)
    expected = probs @ matrix
    if k == 2:
        return (expected[..., 1] <= expected[..., 0]).astype(np.int64)
    return np.argmin(expected, axis=-1)


def decide_tf(probs, rule="argmax", threshold=None, cost_matrix=None):
    """TensorFlow twin of `decide` for use inside `tf.function` (int64 tensor), same ties."""
    import tensorflow as tf

    probs = tf.cast(probs, tf.float32)
    if probs.shape[-1] == 1:
        probs = tf.concat([1.0 - probs, probs], axis=-1)
    k = probs.shape[-1]
    matrix = _check(rule, k, threshold, cost_matrix)
    if k == 2 and rule != "cost":
        cut = 0.5 if rule == "argmax" else float(threshold)
        return tf.cast(probs[..., 1] >= cut, tf.int64)
    if rule == "argmax":
        return tf.argmax(probs, axis=-1)
    expected = tf.tensordot(probs, tf.constant(matrix, tf.float32), axes=[[-1], [0]])
    if k == 2:
        return tf.cast(expected[..., 1] <= expected[..., 0], tf.int64)
    return tf.argmin(expected, axis=-1)


def binary_threshold(cost_matrix):
    """Foreground threshold `fp / (fp + fn)` equivalent to the cost rule for two classes
    (foreground when p_fg >= it, up to rounding)."""
    matrix = np.asarray(cost_matrix, np.float64)
    if matrix.shape != (2, 2):
        raise ConfigError(f"a threshold from costs needs a 2 x 2 cost matrix, got {matrix.shape}.")
    fp, fn = matrix[0, 1], matrix[1, 0]
    if fp + fn == 0:
        raise ConfigError("the cost matrix is all zeros: no threshold follows from it.")
    return float(fp / (fp + fn))
