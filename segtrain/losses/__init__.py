"""Segmentation losses: class indices in, logits in, ignored pixels skipped, float32 math.

- `functional`: the math, one pure function per loss term returning unreduced losses, and
  `TERMS`, the terms a config can name.
- `classes`: Keras `Loss` wrappers storing a function's settings (`get_config`), and
  `build_loss`, the loss of a config's `loss` section.

Adding a loss term: write its function in `functional` (its keyword arguments, annotated, are
its settings) and add it to `TERMS`; the config schema and `build_loss` follow.
"""

import importlib

_LAZY = {
    **{name: "segtrain.losses.classes" for name in (
        "CombinedLoss", "CostSensitiveCrossEntropy", "CrossEntropy", "DiceLoss", "FocalLoss", "JaccardLoss",
        "SegmentationLoss", "TverskyLoss", "build_loss")},
    **{name: "segtrain.losses.functional" for name in (
        "TERMS", "cost_sensitive_cross_entropy", "cross_entropy", "dice", "focal", "jaccard", "tversky")},
}


def __getattr__(name):
    """Loss classes import TensorFlow, so they load on first use only."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segtrain.losses' has no attribute {name!r}")


__all__ = sorted(_LAZY)
