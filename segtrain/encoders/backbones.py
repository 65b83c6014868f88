"""The `keras.applications` backbones as encoders: built without weights, cut at their skips, found in a U-Net."""

from __future__ import annotations

from typing import Optional

import keras

from segtrain.encoders.catalog import backbone

BATCH_NORM_MOMENTUM = 0.9
"""The moving-statistics momentum of every BatchNorm in a backbone, as in segtrain's plain U-Net. keras.applications
use 0.99 (ResNet50) and 0.999 (MobileNetV3): after a thousand steps of a short CPU run a third of MobileNetV3's
moving statistics is still its starting value, and inference-mode predictions are garbage (measured: an encoder U-Net
from scratch on epfl_roads predicted one class for 15 validated epochs while its training loss halved)."""

ENCODER_LAYER = "encoder"
"""The name of the nested encoder model inside an encoder U-Net (`model.get_layer(ENCODER_LAYER)`)."""


def build_backbone(name: str, channels: int) -> keras.Model:
    """The whole `keras.applications` backbone without its classifier, random weights, any size, `channels` bands,
    without its preprocessing layers (segtrain builds those in front, see `preprocessing`)."""
    entry = backbone(name)
    constructor = getattr(keras.applications, entry.constructor)
    model = constructor(include_top=False, weights=None, input_shape=(None, None, channels), **dict(entry.options))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BATCH_NORM_MOMENTUM
    return model


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
