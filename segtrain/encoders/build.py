"""The encoder U-Net: a `keras.applications` backbone (nested as the model's `encoder` layer), its own input
preprocessing in front, a U-Net decoder behind. Keras's own layers only, so `.keras` files load without segtrain."""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np
from keras import layers

from segtrain.encoders.backbones import build_encoder
from segtrain.encoders.catalog import CAFFE_MEAN_BGR, DEFAULT_DECODER_FILTERS, IMAGENET_MEAN, IMAGENET_STD, backbone
from segtrain.encoders.weights import load_encoder_weights
from segtrain.unet_blocks import conv_block, scale_input


def pixel_statistics(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet's per-channel mean and std in 0..255 pixels, RGB; for other than 3 channels their averages on every
    channel (the adapted first convolution sees each band as an average colour channel, `weights.adapt_kernel`)."""
    mean, std = np.asarray(IMAGENET_MEAN) * 255.0, np.asarray(IMAGENET_STD) * 255.0
    if channels != 3:
        mean, std = np.full(channels, mean.mean()), np.full(channels, std.mean())
    return mean.astype(np.float32), std.astype(np.float32)


def preprocessing(x, name: str, channels: int):
    """The backbone's own preprocessing of 0..255 pixels, as Keras layers computing in float32.

    caffe (ResNet50): RGB to BGR and minus caffe's ImageNet mean (a fixed, non-trainable 1x1 convolution; with
    other than 3 channels minus the mean's average); torch (EfficientNetV2, ConvNeXt): (x / 255 - mean) / std per
    channel; tf (MobileNetV3): x / 127.5 - 1.
    """
    kind = backbone(name).preprocessing
    mean, std = pixel_statistics(channels)
    if kind == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, dtype="float32", name="preprocess")(x)
    if kind == "torch":
        scale, offset = (1.0 / std).tolist(), (-mean / std).tolist()
        return layers.Rescaling(scale, offset=offset, dtype="float32", name="preprocess")(x)
    caffe_mean = np.asarray(CAFFE_MEAN_BGR, np.float32)
    if channels != 3:
        return layers.Rescaling(1.0, offset=[-float(caffe_mean.mean())] * channels, dtype="float32",
                                name="preprocess")(x)
    bgr = layers.Conv2D(3, 1, dtype="float32", trainable=False, name="preprocess")
    out = bgr(x)
    bgr.set_weights([np.eye(3, dtype=np.float32)[::-1].reshape(1, 1, 3, 3), -caffe_mean])
    return out


def _to_pixels(x, channels: int, normalization: dict):
    """data.normalize: dataset before a backbone: the data set's robust per-channel standardisation (as the plain
    U-Net's `scale_input`), then to ImageNet's pixel statistics, which the backbone's preprocessing expects."""
    z = scale_input(x, channels, normalization)
    mean, std = pixel_statistics(channels)
    return layers.Rescaling(std.tolist(), offset=mean.tolist(), dtype="float32", name="to_pixels")(z)


def build_encoder_unet(encoder: str, in_channels: int, out_channels: int,
                       decoder_filters: Optional[Sequence[int]] = None, batch_norm: bool = True,
                       dropout: float = 0.0, normalization: Optional[dict] = None,
                       weights: str = "none") -> keras.Model:
    """A U-Net on a pretrained backbone, taking raw pixels (0..255 scale) of any size divisible by 32 and returning
    logits of the same size.

    Decoder (as the usual U-Net on a backbone): from the stride-32 features, five levels of a 2x up-sampling (a
    2x2 transposed convolution, as the plain U-Net's), concatenation with the backbone's feature map at that stride
    (none at stride 1, nor where the backbone has none) and two 3x3 convolutions (+ BatchNorm) + ReLU, all of
    `decoder_filters[level]` widths (deepest first); a 1x1 convolution computing in float32 gives the logits.

    Args:
        encoder: a name of `segtrain.encoders.catalog.ENCODER_NAMES`.
        weights: `model.encoder_weights`: imagenet, a local file, or none (`segtrain.encoders.weights`).
        normalization: class_stats.json's "normalization" (data.normalize: dataset), else None.
    """

    filters = list(decoder_filters or DEFAULT_DECODER_FILTERS)
    inputs = keras.Input(shape=(None, None, in_channels), name="image")
    x = inputs
    if normalization is not None and normalization.get("method", "fixed") != "fixed":
        x = _to_pixels(x, in_channels, normalization)
    x = preprocessing(x, encoder, in_channels)
    encoder_model = build_encoder(encoder, in_channels)
    load_encoder_weights(encoder_model, encoder, weights)
    features = encoder_model(x)
    features = features if isinstance(features, (list, tuple)) else [features]
    by_stride = dict(zip([s for s, skip in zip((2, 4, 8, 16, 32), backbone(encoder).skips) if skip], features))
    x = by_stride[32]
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottom_dropout")(x)
    for level, stride in enumerate((16, 8, 4, 2, 1)):
        # a learned 2x2 up-sampling, as the plain U-Net's (Keras's UpSampling2D loses the channel count on
        # images of unknown size, nearest, or fails in graph mode, bilinear; TFLite needs it static)
        x = layers.Conv2DTranspose(filters[level], 2, strides=2, padding="same", name=f"decoder{level}_up")(x)
        if stride in by_stride:
            x = layers.Concatenate(name=f"decoder{level}_concat")([x, by_stride[stride]])
        x = conv_block(x, filters[level], batch_norm, f"decoder{level}")
    logits = layers.Conv2D(out_channels, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=f"unet_{encoder}")
