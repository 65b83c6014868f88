"""The `keras.applications` backbones as encoders: built without weights, cut at their skips, found in a U-Net."""

from __future__ import annotations

from typing import Optional

import keras

from segtrain.encoders.catalog import backbone

ENCODER_LAYER = "encoder"
"""The name of the nested encoder model inside an encoder U-Net (`model.get_layer(ENCODER_LAYER)`)."""


def build_backbone(name: str, channels: int) -> keras.Model:
    """The whole `keras.applications` backbone without its classifier, random weights, any size, `channels` bands,
    without its preprocessing layers (segtrain builds those in front, see `preprocessing`)."""
    entry = backbone(name)
    constructor = getattr(keras.applications, entry.constructor)
    return constructor(include_top=False, weights=None, input_shape=(None, None, channels), **dict(entry.options))


def build_encoder(name: str, channels: int) -> keras.Model:
    """The backbone cut at its skip layers: a model from the image (preprocessed) to the feature maps at strides
    2..32 (one output per catalogued skip; a missing stride is left out)."""
    full = build_backbone(name, channels)
    outputs = [full.get_layer(skip).output for skip in backbone(name).skips if skip is not None]
    return keras.Model(full.input, outputs, name=ENCODER_LAYER)


def encoder_of(model: keras.Model) -> Optional[keras.Model]:
    """The nested encoder of an encoder U-Net, or None (a plain U-Net)."""
    try:
        return model.get_layer(ENCODER_LAYER)
    except ValueError:
        return None
