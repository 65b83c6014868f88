"""Segmentation losses: class indices in, logits in, ignored pixels skipped, float32 math.

- `functional`: the math as pure functions returning unreduced losses.
- `classes`: Keras `Loss` subclasses storing settings (`get_config`).
- `config`: the `loss` config section: `normalize_loss_config`, `build_loss`,
  `cost_matrix_from_config`.
"""

import importlib

from segtrain.losses.config import (
    TERM_CLASS_NAMES,
    TERM_DEFAULTS,
    build_loss,
    cost_matrix_from_config,
    normalize_loss_config,
    shorthand_cost_matrix,
)

_LAZY = {
    **{name: "segtrain.losses.classes" for name in (
        "CombinedLoss", "CostSensitiveCrossEntropy", "CrossEntropy", "DiceLoss", "FocalLoss", "JaccardLoss",
        "SegmentationLoss", "TverskyLoss")},
    **{name: "segtrain.losses.functional" for name in (
        "cost_sensitive_cross_entropy", "cross_entropy", "dice", "focal", "jaccard", "tversky")},
}


def __getattr__(name):
    """Loss classes and functions import TensorFlow, so they load on first use only."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segtrain.losses' has no attribute {name!r}")


__all__ = [
    "CombinedLoss",
    "CostSensitiveCrossEntropy",
    "CrossEntropy",
    "DiceLoss",
    "FocalLoss",
    "JaccardLoss",
    "SegmentationLoss",
    "TverskyLoss",
    "TERM_CLASS_NAMES",
    "TERM_DEFAULTS",
    "build_loss",
    "cost_matrix_from_config",
    "normalize_loss_config",
    "shorthand_cost_matrix",
    "cost_sensitive_cross_entropy",
    "cross_entropy",
    "dice",
    "focal",
    "jaccard",
    "tversky",
]
