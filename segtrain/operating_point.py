"""A run's operating point: how its calibrated probabilities become labels beyond the config's rule.

Three settings, each optional, applied in this order after the temperature (`segtrain.calibration`):

1. prior correction: a model trained with class weights w estimates probabilities tilted by w
   (a weighted loss is an unweighted one on data where class c is w_c times as frequent). Dividing
   undoes that before the decision (logit adjustment, Menon et al., ICLR 2021):
   ```
   q_c = (p_c / w_c**tau) / sum_j (p_j / w_j**tau)        tau in [0, 1]
   ```
   tau = 0 leaves p as it is, tau = 1 undoes the weights fully. With two classes it is a threshold
   shift: foreground when p_fg >= w_fg**tau / (w_bg**tau + w_fg**tau) (`equivalent_threshold`).
   `predict.prior_correction`: none (tau 0), weights (tau 1), tuned (tau chosen by `segtrain tune`,
   and with three or more classes one bias b_c per class on top, q_c ∝ p_c / w_c**tau * exp(b_c):
   what the weights leave skewed class by class, e.g. one rare class that absorbs a common one).
2. the decision: the config's rule (argmax, least expected cost, threshold) on q, or, for two
   classes, a foreground threshold chosen by `segtrain tune` (p_fg >= threshold replaces the rule).
3. post-processing per class (`segtrain.postprocess`): min_size / max_hole, from the config's
   predict.min_size / predict.max_hole, replaced per class by tuned ones.

`segtrain tune` writes `operating_point.json` (`OPERATING_POINT_FILE`) into the run folder; eval and
predict read it unless `predict.tuned: false`, only for the model file and temperature it was tuned
with (a changed best.keras or a refitted temperature would make it stale: it is then ignored with a
warning), and report it (metrics.json `operating_point`, with the split it was tuned on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click
import numpy as np

OPERATING_POINT_FILE = "operating_point.json"


def _scale(weights, tau: float, bias) -> Optional[np.ndarray]:
    """w**-tau * exp(bias) per class, or None when it is all ones."""
    k = len(weights) if weights is not None else (len(bias) if bias is not None else 0)
    scale = np.ones(k)
    if tau and weights is not None:
        scale = scale * np.asarray(weights, np.float64) ** -float(tau)
    if bias is not None:
        scale = scale * np.exp(np.asarray(bias, np.float64))
    return None if k == 0 or np.all(scale == 1.0) else scale


def prior_adjust(probs: np.ndarray, weights, tau: float, bias=None) -> np.ndarray:
    """q = (p / w**tau * exp(bias)) normalised over the classes (module docstring); probs (..., K), weights and bias
    K (bias None: 0). tau 0 and no bias: p itself."""
    probs = np.asarray(probs)
    scale = _scale(weights, tau, bias)
    if scale is None:
        return probs
    q = probs.astype(np.float64) * scale
    return q / np.maximum(q.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)


def prior_adjust_tf(probs, weights, tau: float, bias=None):
    """TensorFlow twin of `prior_adjust` (float32), for the exported model."""
    import tensorflow as tf

    scale = _scale(weights, tau, bias)
    if scale is None:
        return probs
    scale = tf.constant(scale, tf.float32)
    q = tf.cast(probs, tf.float32) * scale
    return q / tf.maximum(tf.reduce_sum(q, axis=-1, keepdims=True), 1e-30)


def equivalent_threshold(weights, tau: float) -> float:
    """The foreground threshold on p_fg that prior correction with `tau` amounts to for two classes (argmax on q)."""
    w = np.asarray(weights, np.float64) ** float(tau)
    return float(w[1] / (w[0] + w[1]))


@dataclass
class OperatingPoint:
    """What `segtrain tune` chose (None / 0 / empty: not tuned) and where it came from (`info`)."""

    threshold: Optional[float] = None
    """Two classes: foreground when p_fg >= threshold, replacing the config's rule."""
    tau: Optional[float] = None
    """Prior-correction exponent (for predict.prior_correction: tuned)."""
    bias: Optional[list[float]] = None
    """Per-class log-biases on top of tau (three or more classes, predict.prior_correction: tuned)."""
    postprocess: dict[str, list[int]] = field(default_factory=dict)
    """class name -> [min_size, max_hole]."""
    info: dict = field(default_factory=dict)
    """objective, split, images, model, model_sha256, temperature, before / after figures."""

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "tau": self.tau, "bias": self.bias, "postprocess": self.postprocess,
                **self.info}

    @classmethod
    def from_dict(cls, data: dict) -> "OperatingPoint":
        data = dict(data)
        return cls(threshold=data.pop("threshold", None), tau=data.pop("tau", None), bias=data.pop("bias", None),
                   postprocess={str(k): [int(v[0]), int(v[1])] for k, v in (data.pop("postprocess", None) or {}).items()},
                   info=data)

    def summary(self) -> dict:
        """metrics.json's `operating_point`: the settings and where they were tuned."""
        keys = ("split", "objective", "images", "model", "temperature")
        return {"file": OPERATING_POINT_FILE, "threshold": self.threshold, "tau": self.tau, "bias": self.bias,
                "postprocess": self.postprocess, **{k: self.info.get(k) for k in keys}}


def load_operating_point(model_path: Path, config, temperature: float, log=click.echo) -> Optional[OperatingPoint]:
    """RUN/operating_point.json for this model file and temperature, or None (absent, predict.tuned false, stale)."""
    from segtrain.calibration import model_digest

    path = Path(model_path).parent / OPERATING_POINT_FILE
    if not config.predict.tuned or not path.is_file():
        return None
    point = OperatingPoint.from_dict(json.loads(path.read_text()))
    if point.info.get("model_sha256") != model_digest(Path(model_path)):
        log(f"warning: {path} was tuned for another model file ({point.info.get('model')}); it is ignored for "
            f"{Path(model_path).name}. Run `segtrain tune {Path(model_path).parent}` again.")
        return None
    tuned_with = point.info.get("temperature")
    if tuned_with is not None and not np.isclose(float(tuned_with), float(temperature), rtol=1e-9, atol=0.0):
        log(f"warning: {path} was tuned with temperature {tuned_with:.6g}, the run now has {temperature:.6g} "
            f"(calibration.json changed); it is ignored. Run `segtrain tune {Path(model_path).parent}` again.")
        return None
    return point


def run_class_weights(run_dir: Path, num_classes: int) -> list[float]:
    """The class weights the run trained with (class_stats.json `class_weights`; ones when it had none)."""
    path = Path(run_dir) / "class_stats.json"
    weights = None
    if path.is_file():
        weights = json.loads(path.read_text()).get("class_weights")
    if weights is None:
        return [1.0] * num_classes
    return [1.0 if w is None else float(w) for w in weights]
