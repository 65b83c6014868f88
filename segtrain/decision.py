"""Turn class probabilities into class indices: arg-max, least expected cost, or a threshold.

Rules:
```
argmax     y = argmax_j p_j
cost       y = argmin_j sum_i p_i C[i][j]          (expected cost of predicting j)
threshold  y = 1 if p_fg >= threshold else 0        (two classes only)
```
For two classes with `C = [[0, fp], [fn, 0]]` the cost rule predicts foreground exactly
when `p_fg > fp / (fp + fn)` (`binary_threshold`); at an exact tie it keeps class 0, while
the threshold rule (`>=`) picks foreground.

`probs` is (..., K); a last axis of size 1 is read as the foreground probability of a
binary (sigmoid) model, i.e. K = 2.
"""

import numpy as np

from segtrain.errors import ConfigError

RULES = ("argmax", "cost", "threshold")


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


def decide(probs, rule="argmax", threshold=None, cost_matrix=None):
    """Class index per pixel from probabilities (..., K) -> int64 array (...).

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
    if rule == "argmax":
        return np.argmax(probs, axis=-1)
    if rule == "threshold":
        return (probs[..., 1] >= float(threshold)).astype(np.int64)
    return np.argmin(probs @ matrix, axis=-1)


def decide_tf(probs, rule="argmax", threshold=None, cost_matrix=None):
    """TensorFlow twin of `decide` for use inside `tf.function` (int64 tensor)."""
    import tensorflow as tf

    probs = tf.cast(probs, tf.float32)
    if probs.shape[-1] == 1:
        probs = tf.concat([1.0 - probs, probs], axis=-1)
    k = probs.shape[-1]
    matrix = _check(rule, k, threshold, cost_matrix)
    if rule == "argmax":
        return tf.argmax(probs, axis=-1)
    if rule == "threshold":
        return tf.cast(probs[..., 1] >= float(threshold), tf.int64)
    expected = tf.tensordot(probs, tf.constant(matrix, tf.float32), axes=[[-1], [0]])
    return tf.argmin(expected, axis=-1)


def binary_threshold(cost_matrix):
    """Foreground threshold `fp / (fp + fn)` equivalent to the cost rule for two classes."""
    matrix = np.asarray(cost_matrix, np.float64)
    if matrix.shape != (2, 2):
        raise ConfigError(f"a threshold from costs needs a 2 x 2 cost matrix, got {matrix.shape}.")
    fp, fn = matrix[0, 1], matrix[1, 0]
    if fp + fn == 0:
        raise ConfigError("the cost matrix is all zeros: no threshold follows from it.")
    return float(fp / (fp + fn))
