"""segtrain: train U-Net segmentation models on imbalanced, cost-sensitive data.

From Python: `segtrain.fit(config, overrides=..., out=...)`, `segtrain.load(run_or_export)` (a `Segmenter`, or an
`ExportedSegmenter` for an export folder, whose `predict` takes a file path, an image array or a batch and gives
`Prediction`s), `segtrain.evaluate(run, split=...)` (see `segtrain.api`). They load TensorFlow on first use.
"""

from segtrain.version import __version__

_API = ("fit", "load", "evaluate", "Prediction", "FitResult", "Segmenter", "ExportedSegmenter")


def __getattr__(name):
    """The API loads from `segtrain.api` on first use only (its functions import TensorFlow when called)."""
    if name in _API:
        from segtrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'segtrain' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = ["__version__", *_API]
