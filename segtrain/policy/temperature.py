"""Temperature scaling math: one temperature T, or one per class, for a segmentation model's logits.

Formula:
    one output channel:  p_fg = sigmoid(z / T)      T a scalar only
    C >= 2 channels:     p    = softmax(z / T)      T a scalar or a vector of C temperatures (z / T elementwise:
                                                    vector scaling without bias, Guo et al. 2017)
    NLL(T) = -1/N sum_i log p_{y_i}(z_i / T)        over the (valid) pixels given

A scalar T changes no arg-max; per-class temperatures can. `choose_temperature` decides between the two on
held-out images. NumPy + SciPy only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize

TEMPERATURE_BOUNDS = (0.01, 100.0)
PER_CLASS_MARGIN = 0.01
"""Per-class temperatures are chosen only when they lower the held-out NLL by more than this share: with one
true temperature the two fits differ by noise, and a strict comparison picked per-class about a third of the
time (tests/test_policy_temperature.py)."""


def _temperatures(temperature, channels: int):
    """T as a float64 scalar or (C,) array, checked against the channel count."""
    t = np.asarray(temperature, dtype=np.float64)
    if t.ndim > 0 and channels == 1:
        raise ValueError(f"one output channel (sigmoid) takes one scalar temperature, got shape {t.shape}")
    if t.ndim > 0 and t.shape != (channels,):
        raise ValueError(f"per-class temperatures must have shape ({channels},), got {t.shape}")
    if not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError(f"temperatures must be positive and finite, got {temperature!r}")
    return t


def apply_temperature(logits, temperature=1.0) -> np.ndarray:
    """Probabilities (..., K) float64 of logits (..., C) divided by T (a scalar, or (C,) for C >= 2):
    sigmoid -> [1 - p, p] for C == 1, softmax otherwise (the NumPy twin of
    `segtrain.decision.probabilities_tf` at T = 1)."""
    z = np.asarray(logits, dtype=np.float64)
    s = z / _temperatures(temperature, z.shape[-1])
    if s.shape[-1] == 1:
        p = 1.0 / (1.0 + np.exp(-s))
        return np.concatenate([1.0 - p, p], axis=-1)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def negative_log_likelihood(logits, labels, temperature=1.0) -> float:
    """Mean NLL of the true classes under the logits (N, C) divided by T (a scalar, or (C,) for C >= 2);
    labels (N,) class indices.

    Formula (s = z / T, elementwise for a vector T):
        C == 1: log(1 + exp(s)) - y * s
        C >= 2: logsumexp(s) - s_y
    """
    z = np.asarray(logits, dtype=np.float64)
    s = z / _temperatures(temperature, z.shape[-1])
    y = np.asarray(labels, dtype=np.int64)
    if s.shape[-1] == 1:
        s = s[..., 0]
        return float(np.mean(np.logaddexp(0.0, s) - y * s))
    top = s.max(axis=-1)
    lse = top + np.log(np.exp(s - top[:, None]).sum(axis=-1))
    return float(np.mean(lse - np.take_along_axis(s, y[:, None], axis=-1)[:, 0]))


def fit_temperature(logits, labels, bounds=TEMPERATURE_BOUNDS, tolerance: float = 1e-6) -> float:
    """T minimising `negative_log_likelihood` by golden-section search over log T within `bounds`.

    NLL is convex in 1/T (a log-sum-exp of functions linear in 1/T minus a linear term), hence unimodal
    in log T.

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


def _nll_and_gradient(inverse_t, logits, labels) -> tuple[float, np.ndarray]:
    """Mean NLL of softmax(a * z) (a = 1/T per class) and its gradient in a.

    Formula:
        NLL(a)     = mean_i logsumexp_k(a_k z_ik) - a_{y_i} z_{i y_i}
        dNLL/da_c  = mean_i (p_ic - [y_i == c]) * z_ic
    """
    s = logits * inverse_t
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    total = e.sum(axis=1)
    picked = np.take_along_axis(s, labels[:, None], axis=1)[:, 0]
    residual = e / total[:, None]
    residual[np.arange(len(labels)), labels] -= 1.0
    return float(np.mean(np.log(total) - picked)), (residual * logits).mean(axis=0)


def _fit_vector(logits, labels, bounds, start: float) -> np.ndarray:
    """Per-class T by L-BFGS-B over a = 1/T from T = `start` for every class."""
    a_bounds = [(1.0 / bounds[1], 1.0 / bounds[0])] * logits.shape[1]
    result = minimize(_nll_and_gradient, np.full(logits.shape[1], 1.0 / start), args=(logits, labels),
                      jac=True, method="L-BFGS-B", bounds=a_bounds,
                      options={"ftol": 1e-13, "gtol": 1e-9, "maxiter": 1000})
    return (1.0 / result.x).astype(np.float64)


def fit_class_temperatures(logits, labels, bounds=TEMPERATURE_BOUNDS) -> np.ndarray:
    """Per-class temperatures T (C,) float64 minimising the mean NLL of softmax(z / T), C >= 2.

    NLL is convex in a = 1/T (a log-sum-exp of functions linear in a minus a linear term), so L-BFGS-B
    over a within [1/bounds[1], 1/bounds[0]], with the analytic gradient (`_nll_and_gradient`), from the
    best scalar temperature, finds the global minimum.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"per-class temperatures need logits (N, C) with C >= 2, got shape {z.shape}")
    return _fit_vector(z, y, bounds, fit_temperature(z, y, bounds))


def _split_groups(groups, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel masks (fit, scored): the distinct groups, permuted by `seed`, first half fit, the rest scored."""
    groups = np.asarray(groups)
    distinct = np.random.default_rng(seed).permutation(np.unique(groups))
    fit = np.isin(groups, distinct[: (len(distinct) + 1) // 2])
    return fit, ~fit


def _accuracy(logits, labels, temperature) -> float:
    """Share of pixels whose arg-max class under z / T is the label (one channel: foreground when z >= 0)."""
    pred = (logits[:, 0] >= 0).astype(np.int64) if logits.shape[1] == 1 else np.argmax(logits / temperature, 1)
    return float(np.mean(pred == labels))


def choose_temperature(logits, labels, groups, seed: int = 0) -> dict:
    """One temperature or per-class temperatures, decided on held-out images, then refit on all pixels.

    The distinct `groups` (an image id per pixel) are split in two by a seeded permutation (an image's
    pixels stay together); both kinds are fit on half A and scored on half B. Per-class is chosen only when
    its held-out NLL is lower by more than `PER_CLASS_MARGIN` (1%); with C == 1 or fewer than 2 groups it is always the scalar (no
    held-out scores then for fewer than 2 groups). Accuracies are arg-max accuracies on half B.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    g = np.asarray(groups)
    if z.ndim != 2 or not len(z) == len(y) == len(g):
        raise ValueError(f"logits (N, C), labels (N,) and groups (N,) expected, got {z.shape}, {y.shape}, {g.shape}")
    n_groups = len(np.unique(g))
    heldout = {"groups_fit": n_groups, "groups_scored": 0, "nll_scalar": None, "nll_per_class": None,
               "accuracy_scalar": None, "accuracy_per_class": None}
    method = "scalar"
    if n_groups >= 2:
        fit, scored = _split_groups(g, seed)
        heldout["groups_fit"], heldout["groups_scored"] = len(np.unique(g[fit])), len(np.unique(g[scored]))
        t_scalar = fit_temperature(z[fit], y[fit])
        heldout["nll_scalar"] = negative_log_likelihood(z[scored], y[scored], t_scalar)
        heldout["accuracy_scalar"] = _accuracy(z[scored], y[scored], t_scalar)
        if z.shape[1] >= 2:
            t_class = _fit_vector(z[fit], y[fit], TEMPERATURE_BOUNDS, t_scalar)
            heldout["nll_per_class"] = negative_log_likelihood(z[scored], y[scored], t_class)
            heldout["accuracy_per_class"] = _accuracy(z[scored], y[scored], t_class)
            if heldout["nll_per_class"] < heldout["nll_scalar"] * (1.0 - PER_CLASS_MARGIN):
                method = "per_class"
    temperature = fit_temperature(z, y)
    if method == "per_class":
        temperature = _fit_vector(z, y, TEMPERATURE_BOUNDS, temperature).tolist()
    return {"method": method, "temperature": temperature, "heldout": heldout}
