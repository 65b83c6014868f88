"""segtrain: train U-Net segmentation models on imbalanced, cost-sensitive data."""

__version__ = "0.1.0"
