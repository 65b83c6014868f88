"""The backbones `model.encoder` can name: plain data, no TensorFlow (the config checks names against it)."""

from __future__ import annotations

ENCODER_STRIDE = 32
"""Every catalogued backbone down-samples by 32: images are padded (and crops sized) to a multiple of it."""

ENCODER_NAMES = ("resnet50", "efficientnetv2b0", "mobilenetv3small", "mobilenetv3large", "convnexttiny")
"""The names `model.encoder` accepts besides `none`."""
