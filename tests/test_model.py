import keras
import numpy as np
import pytest

from segtrain.model import build_unet, output_channels


@pytest.mark.parametrize("in_channels, out_channels, depth", [(1, 1, 2), (3, 4, 3)])
def test_unet_shapes_and_any_divisible_size(in_channels, out_channels, depth):
    model = build_unet(in_channels, out_channels, depth=depth, base_filters=4)
    for size in (2**depth * 2, 2**depth * 5):
        out = model(np.zeros((2, size, size + 2**depth, in_channels), "float32"))
        assert tuple(out.shape) == (2, size, size + 2**depth, out_channels)


def test_depth_sets_the_number_of_poolings():
    model = build_unet(3, 1, depth=3, base_filters=4)
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    transposes = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2DTranspose)]
    assert len(pools) == 3 and len(transposes) == 3


def test_logits_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_unet(3, 2, depth=2, base_filters=4)
        out = model(np.random.default_rng(0).uniform(0, 255, (1, 16, 16, 3)).astype("float32"))
        assert model.get_layer("down0_conv1").compute_dtype == "float16"
        assert out.dtype == "float32" and np.isfinite(np.asarray(out)).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_input_is_raw_pixels():
    """The model rescales 0..255 to -1..1 itself, so a saved .keras takes raw images."""
    model = build_unet(1, 1, depth=1, base_filters=2)
    scale = model.get_layer("scale")
    assert np.allclose(scale(np.array([[0.0, 127.5, 255.0]])), [[-1.0, 0.0, 1.0]])


def test_output_channels_rule():
    assert output_channels(2) == 1 and output_channels(3) == 3 and output_channels(5) == 5
