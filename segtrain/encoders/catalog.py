"""The backbones `model.encoder` can name: plain data, no TensorFlow (the config checks names against it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ENCODER_STRIDE = 32
"""Every catalogued backbone down-samples by 32: images are padded (and crops sized) to a multiple of it."""

ENCODER_NAMES = ("resnet50", "efficientnetv2b0", "mobilenetv3small", "mobilenetv3large", "convnexttiny")
"""The names `model.encoder` accepts besides `none`."""

DEFAULT_DECODER_FILTERS = (256, 128, 64, 32, 16)
"""The decoder's widths from the deepest level up (`model.decoder_filters: null`)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet's RGB statistics on the 0..1 scale, which the backbones' own preprocessing uses."""
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
"""The ImageNet mean in 0..255 pixels, BGR, that caffe-style preprocessing (ResNet50) subtracts."""

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Backbone:
    """One `keras.applications` backbone as a U-Net encoder.

    skips: the layers whose outputs feed the decoder, at strides 2, 4, 8, 16 and 32 (None: the backbone has no
        feature map at that stride; the decoder then up-samples without a skip there). Each is the last layer at
        its stride, so the skip carries everything the backbone computed at that resolution.
    preprocessing: what the backbone's own preprocessing does to 0..255 RGB pixels: "caffe" (RGB to BGR, minus
        the ImageNet mean in pixels), "torch" (0..1, minus the ImageNet mean, over its std) or "tf" (to [-1, 1]).
    """

    constructor: str
    """The `keras.applications` function."""
    skips: tuple
    preprocessing: str
    imagenet_file: str
    """The ImageNet weights without the classifier (include_top=False), as Keras names it in its cache."""
    imagenet_folder: str
    """Its folder under KERAS_WEIGHTS_URL."""
    options: tuple = ()
    """Extra constructor arguments, as (name, value) pairs."""

    @property
    def imagenet_url(self) -> str:
        return KERAS_WEIGHTS_URL + self.imagenet_folder + "/" + self.imagenet_file


BACKBONES = {
    "resnet50": Backbone(
        "ResNet50", ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
        "caffe", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet"),
    "efficientnetv2b0": Backbone(
        "EfficientNetV2B0", ("block1a_project_activation", "block2b_add", "block4a_expand_activation",
                             "block6a_expand_activation", "top_activation"),
        "torch", "efficientnetv2-b0_notop.h5", "efficientnet_v2", (("include_preprocessing", False),)),
    # MobileNetV3's activations are unnamed (their names change with what else a session built): its skips are
    # block outputs, which MobileNetV3 keeps linear (no activation) by design; the stem's is its BatchNorm.
    "mobilenetv3small": Backbone(
        "MobileNetV3Small", ("conv_bn", "expanded_conv_project_bn", "expanded_conv_2_add", "expanded_conv_7_add",
                             "expanded_conv_10_add"),
        "tf", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", "mobilenet_v3",
        (("include_preprocessing", False),)),
    "mobilenetv3large": Backbone(
        "MobileNetV3Large", ("expanded_conv_add", "expanded_conv_2_add", "expanded_conv_5_add",
                             "expanded_conv_11_add", "expanded_conv_14_add"),
        "tf", "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", "mobilenet_v3",
        (("include_preprocessing", False),)),
    # ConvNeXt's stem is a 4x4 convolution of stride 4: no stride-2 feature map.
    "convnexttiny": Backbone(
        "ConvNeXtTiny", (None, "convnext_tiny_stage_0_block_2_identity", "convnext_tiny_stage_1_block_2_identity",
                         "convnext_tiny_stage_2_block_8_identity", "convnext_tiny_stage_3_block_2_identity"),
        "torch", "convnext_tiny_notop.h5", "convnext", (("include_preprocessing", False),)),
}
"""What segtrain needs to know of each backbone in ENCODER_NAMES."""


def backbone(name: str) -> Optional[Backbone]:
    """The catalogue entry of `model.encoder` (None for `none`)."""
    return None if name == "none" else BACKBONES[name]
