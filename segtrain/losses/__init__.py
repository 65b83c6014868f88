"""Segmentation losses: class indices in, logits in, ignored pixels skipped, float32 math.

- `functional`: the math as pure functions returning unreduced losses.
- `classes`: Keras `Loss` subclasses storing settings (`get_config`).
- `config`: the `loss` config section: `normalize_loss_config`, `build_loss`,
  `cost_matrix_from_config`.
"""

from segtrain.losses.classes import (
    CombinedLoss,
    CostSensitiveCrossEntropy,
    CrossEntropy,
    DiceLoss,
    FocalLoss,
    JaccardLoss,
    SegmentationLoss,
    TverskyLoss,
)
from segtrain.losses.config import (
    TERM_CLASSES,
    TERM_DEFAULTS,
    build_loss,
    cost_matrix_from_config,
    normalize_loss_config,
    shorthand_cost_matrix,
)
from segtrain.losses.functional import (
    cost_sensitive_cross_entropy,
    cross_entropy,
    dice,
    focal,
    jaccard,
    tversky,
)

__all__ = [
    "CombinedLoss",
    "CostSensitiveCrossEntropy",
    "CrossEntropy",
    "DiceLoss",
    "FocalLoss",
    "JaccardLoss",
    "SegmentationLoss",
    "TverskyLoss",
    "TERM_CLASSES",
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
