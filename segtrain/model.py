"""The U-Net: built from Keras's own layers only, so `.keras` files load without segtrain."""

from __future__ import annotations

from typing import Optional

import keras
from keras import layers

from segtrain.unet_blocks import conv_block, scale_input


def build_unet(in_channels: int, out_channels: int, depth: int = 4, base_filters: int = 16,
               batch_norm: bool = True, dropout: float = 0.0, normalization: Optional[dict] = None) -> keras.Model:
    """A U-Net taking raw pixel values (0..255 scale) of any size divisible by 2**depth and returning logits.

    Args:
        in_channels: the image's channels: 1 (grayscale), 3 (RGB) or any other band count (multispectral).
        out_channels: 1 for a binary problem (sigmoid), else the number of classes (softmax).
        depth: number of 2x down-sampling steps.
        base_filters: filters at the first level, doubled at each level down.
        batch_norm: batch normalisation after each convolution.
        dropout: dropout rate at the bottleneck.
        normalization: None (or method "fixed"): 0..255 is mapped to [-1, 1]; the "normalization" entry of
            class_stats.json (method "dataset"): per-channel robust statistics built in (`segtrain.unet_blocks.scale_input`).

    The last layer computes in float32 so that logits stay float32 under mixed precision.
    """
    inputs = keras.Input(shape=(None, None, in_channels), name="image")
    x = scale_input(inputs, in_channels, normalization)
    skips = []
    for level in range(depth):
        x = conv_block(x, base_filters * 2**level, batch_norm, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = conv_block(x, base_filters * 2**depth, batch_norm, "bottom")
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottom_dropout")(x)
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"up{level}_transpose")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = conv_block(x, filters, batch_norm, f"up{level}")
    logits = layers.Conv2D(out_channels, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=f"unet_d{depth}_f{base_filters}")


def output_channels(num_classes: int) -> int:
    """One sigmoid channel for two classes, one softmax channel per class otherwise."""
    return 1 if num_classes == 2 else num_classes


def build_model(model_config, in_channels: int, out_channels: int, normalization: Optional[dict] = None,
                load_weights: bool = True) -> keras.Model:
    """The network `model` (a ModelConfig) describes: the plain U-Net above, or with `model.encoder` a U-Net on a
    pretrained backbone (`segtrain.encoders.build`), its `model.encoder_weights` loaded unless `load_weights` is
    False (a resumed run restores every weight from its checkpoint)."""
    if model_config.encoder == "none":
        return build_unet(in_channels, out_channels, model_config.depth, model_config.base_filters,
                          model_config.batch_norm, model_config.dropout, normalization=normalization)
    from segtrain.encoders.build import build_encoder_unet

    return build_encoder_unet(model_config.encoder, in_channels, out_channels, model_config.decoder_filters,
                              model_config.batch_norm, model_config.dropout, normalization,
                              weights=model_config.encoder_weights if load_weights else "none")
