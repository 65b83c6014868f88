"""segtrain: train U-Net segmentation models on imbalanced, cost-sensitive data.

From Python: `segtrain.fit(config, overrides=..., out=...)`, `segtrain.load(run_or_export)`,
`segtrain.evaluate(run, split=...)` (see `segtrain.api`). They load TensorFlow on first use.
"""

__version__ = "0.1.0"

_API = ("fit", "load", "evaluate")


def __getattr__(name):
    """The API functions import TensorFlow, so they load on first use only."""
    if name in _API:
        from segtrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'segtrain' has no attribute {name!r}")


__all__ = ["__version__", *_API]
