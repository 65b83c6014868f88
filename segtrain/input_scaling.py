"""The first layers of every segtrain model: raw pixels (0..255) to the network's scale, with Keras layers only."""

from __future__ import annotations

from typing import Optional

from keras import layers


def scale_input(inputs, in_channels: int, normalization: Optional[dict]):
    """Raw pixels to the network's scale: 0..255 -> [-1, 1] (`data.normalize: fixed`), or the training set's
    robust statistics (`dataset`, `segtrain.data.normalization`): Rescaling maps [low, high] to [0, 1] per
    channel, ReLU(max_value=1) clips, Normalization standardises. Keras layers only: no custom objects."""
    if normalization is None or normalization.get("method", "fixed") == "fixed":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
    from segtrain.data.normalization import model_normalization

    scale, offset, mean, variance = model_normalization(normalization)
    if len(scale) != in_channels:
        raise ValueError(f"normalization statistics for {len(scale)} channels, but the model takes {in_channels}")
    x = layers.Rescaling(scale, offset=offset, name="normalize_range")(inputs)
    x = layers.ReLU(max_value=1.0, name="normalize_clip")(x)
    return layers.Normalization(axis=-1, mean=mean, variance=variance, name="normalize")(x)
