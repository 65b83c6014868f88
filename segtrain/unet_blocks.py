"""The pieces every segtrain U-Net is built from, Keras layers only: the input scaling (raw 0..255 pixels to the
network's scale) and the two-convolution block."""

from __future__ import annotations

from typing import Optional

import numpy as np
from keras import layers


def scale_input(inputs, in_channels: int, normalization: Optional[dict]):
    """Raw pixels to the network's scale: 0..255 -> [-1, 1] (`data.normalize: fixed`), or the training set's
    robust statistics (`dataset`, `segtrain.data.normalization`): Rescaling maps [low, high] to [0, 1] per
    channel, ReLU(max_value=1) clips, Normalization standardises. Keras layers only: no custom objects."""
    if normalization is None or normalization.get("method", "fixed") == "fixed":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
    scale, offset, mean, variance = model_normalization(normalization)
    if len(scale) != in_channels:
        raise ValueError(f"normalization statistics for {len(scale)} channels, but the model takes {in_channels}")
    x = layers.Rescaling(scale, offset=offset, name="normalize_range")(inputs)
    x = layers.ReLU(max_value=1.0, name="normalize_clip")(x)
    return layers.Normalization(axis=-1, mean=mean, variance=variance, name="normalize")(x)


def model_normalization(stats: dict) -> tuple[list, list, list, list]:
    """(scale, offset, mean, variance) per channel for the model's layers (`scale_input`):
    x * scale + offset maps [low, high] to [0, 1]; mean and variance standardise that [0, 1] scale.

    A channel with high == low (one value) is scaled by 0, so every pixel becomes 0; a std of 0 (below 1e-8 of the
    span) gets variance 1, so no division by zero."""
    low, high, mean, std = (np.asarray(stats[key], dtype=np.float64) for key in ("low", "high", "mean", "std"))
    flat = ~(high > low)
    span = np.where(flat, 1.0, high - low)
    scale = np.where(flat, 0.0, 1.0 / span)
    offset = np.where(flat, 0.0, -low / span)
    m = np.where(flat, 0.0, (mean - low) / span)
    s = std / span
    variance = np.where(s > 1e-8, s * s, 1.0)
    return scale.tolist(), offset.tolist(), m.tolist(), variance.tolist()


def conv_block(x, filters: int, batch_norm: bool, name: str):
    """Two 3x3 convolutions, each with BatchNorm (momentum 0.9) and ReLU: a U-Net level (encoder or decoder)."""
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm, name=f"{name}_conv{i}")(x)
        if batch_norm:
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x
