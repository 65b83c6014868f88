"""Prior correction: undo the class weights a model trained with before its probabilities are decided on.

A model trained with class weights w estimates probabilities tilted by w (a weighted loss is an unweighted
one on data where class c is w_c times as frequent). Dividing undoes that (logit adjustment, Menon et al.,
ICLR 2021), with one optional log-bias b_c per class on top:

Formula:
```
q_c = s_c p_c / sum_j s_j p_j,      s_c = w_c**-tau * exp(b_c)        tau in [0, 1]
```
tau = 0 and no bias leave p as it is; tau = 1 undoes the weights fully. A class whose weight is 0 (the
loss never saw it) gets s_c = exp(b_c): w**-tau would be infinite there, and a weight of 0 carries no
tilt to undo.

With two classes the correction is a shift of the foreground cut (`foreground_cut`): a rule that takes
foreground when q_fg >= t takes it exactly when

    p_fg >= t s_0 / (t s_0 + (1 - t) s_1)

(t = 0.5 for arg-max, the tuned or configured threshold for rule `threshold`, fp / (fp + fn) for the
least-cost rule).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def prior_scale(weights: Optional[Sequence[float]], tau: float, bias=None) -> Optional[np.ndarray]:
    """s_c = w_c**-tau * exp(b_c) per class (module formula; weight 0 -> factor exp(b_c)), or None when all ones."""
    k = len(weights) if weights is not None else (len(bias) if bias is not None else 0)
    scale = np.ones(k)
    if tau and weights is not None:
        w = np.asarray(weights, np.float64)
        scale = np.where(w > 0, np.power(np.where(w > 0, w, 1.0), -float(tau)), 1.0)
    if bias is not None:
        scale = scale * np.exp(np.asarray(bias, np.float64))
    return None if k == 0 or np.all(scale == 1.0) else scale


def prior_adjust(probs: np.ndarray, weights, tau: float, bias=None) -> np.ndarray:
    """q (float64) from probabilities (..., K) (module formula); p itself when there is nothing to correct."""
    probs = np.asarray(probs)
    scale = prior_scale(weights, tau, bias)
    if scale is None:
        return probs
    q = probs.astype(np.float64) * scale
    return q / np.maximum(q.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)


def prior_adjust_tf(probs, weights, tau: float, bias=None):
    """TensorFlow twin of `prior_adjust` (float32), for the exported model."""
    import tensorflow as tf

    scale = prior_scale(weights, tau, bias)
    if scale is None:
        return probs
    q = tf.cast(probs, tf.float32) * tf.constant(scale, tf.float32)
    return q / tf.maximum(tf.reduce_sum(q, axis=-1, keepdims=True), 1e-30)


def foreground_cut(cut_on_q: float, weights, tau: float, bias=None) -> float:
    """The cut on p_fg equivalent to `q_fg >= cut_on_q` for two classes (module formula)."""
    scale = prior_scale(weights, tau, bias)
    if scale is None:
        return float(cut_on_q)
    t, s0, s1 = float(cut_on_q), float(scale[0]), float(scale[1])
    denominator = t * s0 + (1.0 - t) * s1
    return 1.0 if denominator == 0 else t * s0 / denominator
