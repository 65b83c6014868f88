"""The decision policy: everything that turns a model's logits into a mask, as one object.

In order (each step optional):
```
p      = softmax(z / T)          (sigmoid for one channel; T one temperature or one per class)
q      = prior correction of p   (q_c ∝ p_c w_c**-tau exp(b_c): `segtrain.policy.prior`)
labels = rule(q)                 (argmax, threshold on q_fg, or least expected cost: `segtrain.decision`)
labels = postprocess(labels)     (per class: remove small components, fill small holes)
```
plus `tta`, which says how the logits z are produced (flip averaging, `segtrain.policy.inference`).
q is what the rule reads: it is what eval's threshold marks, `predict --probabilities` and the API's
`Prediction.probabilities` are made of (it equals p when no prior correction is set).

`DecisionPolicy.apply` is the one function from logits to (q, labels) that eval, predict, tune, the
Python API use; `tf_scores_and_labels` is its TensorFlow twin for the exported model (post-processing
has no TensorFlow op and stays outside, `segtrain.export` says so). Where its values come from (the
run's config.yaml, its policy.json, the command line) is `segtrain.policy.store`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Union

import numpy as np

from segtrain.policy.postprocess import postprocess as apply_postprocess
from segtrain.policy.postprocess import second_choice
from segtrain.policy.prior import foreground_cut, prior_adjust, prior_adjust_tf
from segtrain.decision import decide, decide_tf
from segtrain.policy.temperature import apply_temperature

Temperature = Union[float, list]


@dataclass
class DecisionPolicy:
    """Logits -> q -> labels (module docstring). Two classes may come from a one-channel (sigmoid) model."""

    classes: list
    temperature: Temperature = 1.0
    """One T, or one per class (per-class temperatures, three or more classes)."""
    class_weights: Optional[list] = None
    """The weights the model trained with, which prior correction divides by (None: it trained without)."""
    tau: float = 0.0
    bias: Optional[list] = None
    rule: str = "argmax"
    threshold: Optional[float] = None
    """Rule `threshold`: foreground when q_fg >= threshold (two classes)."""
    cost_matrix: Optional[np.ndarray] = None
    """Rule `cost`: C[true][pred]."""
    postprocess: dict = field(default_factory=dict)
    """{class index: (min_size, max_hole)}, applied in class order after the rule."""
    tta: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ------------------------------------------------------------------ NumPy

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated p (..., K) float64 from logits (..., C)."""
        return apply_temperature(logits, self._temperature_array())

    def scores(self, probabilities: np.ndarray) -> np.ndarray:
        """q (..., K): what the rule reads (p when there is no prior correction)."""
        return prior_adjust(probabilities, self.class_weights, self.tau, self.bias)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """The rule alone on q, int64 labels."""
        return decide(scores, self.rule, threshold=self.threshold, cost_matrix=self.cost_matrix)

    def labels(self, scores: np.ndarray) -> np.ndarray:
        """The rule, then post-processing (on an H x W map), from q."""
        labels = self.decide(scores)
        if self.postprocess:
            labels = apply_postprocess(labels, second_choice(scores, labels), self.postprocess)
        return labels

    def apply(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(q, labels) of one image's logits H x W x C: the whole policy."""
        scores = self.scores(self.probabilities(logits))
        return scores, self.labels(scores)

    # ------------------------------------------------------------------ TensorFlow (export)

    def tf_scores_and_labels(self, logits):
        """(q float32, labels int64) inside a TensorFlow graph: temperature, prior correction and rule
        (no post-processing)."""
        import tensorflow as tf

        from segtrain.decision import probabilities_tf

        z = tf.cast(logits, tf.float32)
        temperature = self._temperature_array()
        if not np.all(temperature == 1.0):
            z = z / tf.constant(temperature, tf.float32)
        q = prior_adjust_tf(probabilities_tf(z), self.class_weights, self.tau, self.bias)
        return q, decide_tf(q, self.rule, self.threshold, self.cost_matrix)

    # ------------------------------------------------------------------ reading it

    def _temperature_array(self) -> np.ndarray:
        return np.asarray(self.temperature, np.float64)

    @property
    def per_class_temperature(self) -> bool:
        return np.ndim(self.temperature) > 0

    def foreground_cut(self) -> Optional[float]:
        """Two classes: the cut on the calibrated p_fg that prior correction and the rule amount to; else None."""
        if self.num_classes != 2:
            return None
        if self.rule == "threshold":
            cut = float(self.threshold)
        elif self.rule == "cost":
            matrix = np.asarray(self.cost_matrix, np.float64)
            fp, fn = matrix[0, 1], matrix[1, 0]
            cut = fp / (fp + fn) if fp + fn > 0 else 0.5
        else:
            cut = 0.5
        return foreground_cut(cut, self.class_weights, self.tau, self.bias)

    def without_postprocess(self) -> "DecisionPolicy":
        return replace(self, postprocess={})

    def describe(self) -> str:
        """The policy in words, for log lines."""
        parts = [self.rule + (f" {self.threshold:.4g}" if self.rule == "threshold" else "")]
        if self.per_class_temperature:
            parts.append("per-class temperatures " + ", ".join(f"{t:.3g}" for t in np.ravel(self.temperature)))
        elif float(self.temperature) != 1.0:
            parts.append(f"temperature {float(self.temperature):.4f}")
        if self.tau:
            parts.append(f"prior correction tau {self.tau:.3g}")
        if self.bias is not None and any(self.bias):
            parts.append("class biases " + ", ".join(f"{n} {b:+.2f}" for n, b in zip(self.classes, self.bias) if b))
        cut = self.foreground_cut()
        if cut is not None and (self.tau or self.bias is not None) and self.rule != "cost":
            parts.append(f"foreground where calibrated p >= {cut:.4g}")
        if self.postprocess:
            parts.append("post-processing " + ", ".join(f"{self.classes[c]} min_size {n} max_hole {m}"
                                                        for c, (n, m) in sorted(self.postprocess.items())))
        if self.tta:
            parts.append("flip TTA")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """JSON-ready settings (metrics.json `decision`, metadata.json)."""
        temperature = np.asarray(self.temperature, np.float64)
        return {
            "rule": self.rule, "threshold": self.threshold,
            "cost_matrix": None if self.cost_matrix is None else np.asarray(self.cost_matrix).tolist(),
            "temperature": temperature.tolist(),
            "prior_correction": {"tau": float(self.tau), "bias": self.bias,
                                 "class_weights": self.class_weights if (self.tau or self.bias) else None},
            "postprocess": {self.classes[c]: [int(n), int(m)] for c, (n, m) in sorted(self.postprocess.items())},
            "tta": bool(self.tta),
            "foreground_cut": self.foreground_cut(),
        }
