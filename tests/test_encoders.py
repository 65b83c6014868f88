"""Encoder U-Nets (`model.encoder`): the backbones' preprocessing against Keras's own, weights from a local file,
an earlier run's .keras and Keras's ImageNet cache (and the message when it cannot download), first-convolution
kernels adapted to 1 and 5 bands, and every catalogued backbone on an odd image size through predict's padding."""

import numpy as np
import pytest

from segtrain.encoders.catalog import BACKBONES, ENCODER_NAMES, ENCODER_STRIDE
from segtrain.encoders.weights import adapt_kernel
from tests.helpers import invoke, make_stripes_dataset, write_config

SMALL = "mobilenetv3small"
FIRST_CONV = {"mobilenetv3small": "conv"}
NARROW = [8, 8, 8, 8, 8]
"""Decoder widths that keep the tests' models small (the encoder is what they are about)."""


def same_weights(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- arithmetic (no TensorFlow)


def test_adapted_kernels_sum_for_one_band_and_tile_scaled_for_five():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 4))
    gray = adapt_kernel(kernel, 1)
    np.testing.assert_allclose(gray[:, :, 0], kernel[:, :, 0] + kernel[:, :, 1] + kernel[:, :, 2])
    five = adapt_kernel(kernel, 5)
    for band, rgb in enumerate((0, 1, 2, 0, 1)):
        np.testing.assert_allclose(five[:, :, band], kernel[:, :, rgb] * 3 / 5)
    # a gray image x through the summed kernel answers as (x, x, x) through the RGB one; six bands of x as well
    x = np.random.default_rng(1).normal(size=3 * 3)
    rgb_response = sum(np.einsum("p,pf->f", x, kernel.reshape(9, 3, 4)[:, c]) for c in range(3))
    np.testing.assert_allclose(np.einsum("p,pf->f", x, gray.reshape(9, 4)), rgb_response)
    six = adapt_kernel(kernel, 6).reshape(9, 6, 4)
    np.testing.assert_allclose(sum(np.einsum("p,pf->f", x, six[:, c]) for c in range(6)), rgb_response)
    assert adapt_kernel(kernel, 3) is kernel


def test_every_catalogued_backbone_has_five_strides_and_an_imagenet_file():
    assert set(BACKBONES) == set(ENCODER_NAMES) and ENCODER_STRIDE == 32
    for name, entry in BACKBONES.items():
        assert len(entry.skips) == 5 and entry.skips[-1] is not None, name
        assert entry.preprocessing in ("caffe", "torch", "tf")
        assert entry.imagenet_url.endswith("/" + entry.imagenet_file) and entry.imagenet_file.endswith(".h5")


# ---------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("name", ["resnet50", "efficientnetv2b0", "mobilenetv3small", "convnexttiny"])
def test_the_built_in_preprocessing_is_keras_applications_own(name):
    """0..255 RGB through segtrain's preprocessing layers against keras.applications' preprocess_input in the
    backbone's mode (caffe: BGR minus the mean; torch: ImageNet standardisation; tf: [-1, 1])."""
    import keras
    from keras.applications import imagenet_utils

    from segtrain.encoders.build import preprocessing

    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, preprocessing(inputs, name, 3))
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    expected = imagenet_utils.preprocess_input(pixels.copy(), mode=BACKBONES[name].preprocessing)
    np.testing.assert_allclose(model(pixels).numpy(), expected, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A MobileNetV3Small backbone as a user makes one (keras.applications' defaults, random weights) and the
    weights file its save_weights writes."""
    import keras

    keras.utils.set_random_seed(5)
    source = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(None, None, 3))
    path = tmp_path_factory.mktemp("weights") / "backbone.weights.h5"
    source.save_weights(path)
    return source, path


@pytest.mark.parametrize("channels", [3, 1, 5])
def test_a_local_weights_file_loads_into_the_encoder_layer_by_layer(backbone_file, channels):
    """Every encoder layer equals the saved backbone's; with 1 or 5 bands the first convolution holds the saved
    RGB kernels summed (1) or tiled and scaled by 3/5 (5), computed here from the saved ones."""
    from segtrain.encoders.backbones import encoder_of
    from segtrain.encoders.build import build_encoder_unet

    source, path = backbone_file
    model = build_encoder_unet(SMALL, channels, 1, NARROW, weights=str(path))
    encoder = encoder_of(model)
    weighted = [layer for layer in encoder.layers if layer.weights]
    assert len(weighted) > 50
    for layer in weighted:
        theirs = source.get_layer(layer.name).get_weights()
        if layer.name == FIRST_CONV[SMALL] and channels != 3:
            (kernel,) = theirs
            expected = kernel.sum(2, keepdims=True) if channels == 1 else kernel[:, :, [0, 1, 2, 0, 1]] * 3 / 5
            np.testing.assert_allclose(layer.get_weights()[0], expected, rtol=1e-6)
        else:
            assert same_weights(layer.get_weights(), theirs), layer.name
    assert model.output_shape == (None, None, None, 1)


def test_the_encoder_of_an_earlier_runs_keras_file_is_taken_and_the_decoder_left(tmp_path):
    import keras

    from segtrain.encoders.backbones import encoder_of
    from segtrain.encoders.build import build_encoder_unet

    keras.utils.set_random_seed(7)
    earlier = build_encoder_unet(SMALL, 3, 3, NARROW)
    earlier.save(tmp_path / "best.keras")
    keras.utils.set_random_seed(8)
    model = build_encoder_unet(SMALL, 3, 1, NARROW, weights=str(tmp_path))  # a run folder: its best.keras
    assert same_weights(encoder_of(model).get_weights(), encoder_of(earlier).get_weights())
    assert not same_weights(model.get_layer("decoder4_conv1").get_weights(),
                            earlier.get_layer("decoder4_conv1").get_weights())


def test_imagenet_weights_come_from_keras_cache_honouring_keras_home(tmp_path, monkeypatch, backbone_file):
    """A file in $KERAS_HOME/models under the name Keras downloads it as is used without a download (Keras's
    legacy .h5 format, as its ImageNet files are)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from segtrain.encoders.backbones import encoder_of
    from segtrain.encoders.build import build_encoder_unet
    from segtrain.encoders.weights import imagenet_cached

    source, _ = backbone_file
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    with h5py.File(tmp_path / "models" / BACKBONES[SMALL].imagenet_file, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    assert imagenet_cached(SMALL) and not imagenet_cached("resnet50")
    encoder = encoder_of(build_encoder_unet(SMALL, 3, 1, NARROW, weights="imagenet"))
    for layer in (layer for layer in encoder.layers if layer.weights):
        assert same_weights(layer.get_weights(), source.get_layer(layer.name).get_weights()), layer.name


def test_imagenet_offline_is_one_message_naming_the_file_and_the_folder_exit_2(tmp_path, monkeypatch):
    """Keras's get_file raises a bare Exception when the URL cannot be fetched (as here, offline); fit stops before
    creating the run folder with one message: which file, where to place it."""
    import keras

    def offline(fname, origin, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    root = make_stripes_dataset(tmp_path / "data", n_train=2, n_val=1)
    config = write_config(tmp_path / "c.yaml", root, model={"encoder": SMALL}, data={"crop": 32})
    result = invoke("fit", config, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    entry = BACKBONES[SMALL]
    assert "Traceback" not in result.output and result.output.count("Error:") == 1
    assert f"place it as {tmp_path / 'home' / 'models' / entry.imagenet_file}" in result.output
    assert entry.imagenet_url in result.output and "model.encoder_weights" in result.output
    assert not (tmp_path / "run").exists()


def test_a_missing_or_wrong_weights_file_is_a_config_error(tmp_path, backbone_file):
    from segtrain.encoders.build import build_encoder_unet
    from segtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="no such file"):
        build_encoder_unet(SMALL, 3, 1, NARROW, weights=str(tmp_path / "missing.weights.h5"))
    _, path = backbone_file  # MobileNetV3Small's weights are not MobileNetV3Large's
    with pytest.raises(ConfigError, match="model.encoder_weights"):
        build_encoder_unet("mobilenetv3large", 3, 1, NARROW, weights=str(path))


# ---------------------------------------------------------------------------- every backbone, odd sizes


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_every_encoder_gives_logits_of_the_input_size_on_odd_sizes(name):
    """45 x 67 through predict's padding (to 64 x 96, divisor 32) and back; the skips sit at strides 2..32."""
    import keras

    from segtrain.encoders.backbones import encoder_of
    from segtrain.encoders.build import build_encoder_unet
    from segtrain.policy.inference import predict_logits
    from segtrain.policy.padding import pad_to_multiple_np

    keras.utils.set_random_seed(0)
    model = build_encoder_unet(name, 3, 3, NARROW)
    image = np.random.default_rng(0).integers(0, 256, (45, 67, 3)).astype(np.float32)
    logits = predict_logits(model, image, divisor=ENCODER_STRIDE)
    assert logits.shape == (45, 67, 3) and np.isfinite(logits).all()
    padded = pad_to_multiple_np(image, ENCODER_STRIDE)
    assert padded.shape[:2] == (64, 96)
    np.testing.assert_allclose(logits, model(padded[None]).numpy()[0, :45, :67], rtol=1e-4, atol=1e-4)
    features = encoder_of(model)(padded[None])
    strides = [s for s, skip in zip((2, 4, 8, 16, 32), BACKBONES[name].skips) if skip]
    assert [(f.shape[1], f.shape[2]) for f in features] == [(64 // s, 96 // s) for s in strides]
    # every BatchNorm (the backbone's, 0.99 / 0.999 in keras.applications, and the decoder's) follows its batches
    # at 0.9, or a short run's inference-mode statistics lag far behind (backbones.BATCH_NORM_MOMENTUM)
    norms = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
             if isinstance(layer, keras.layers.BatchNormalization)]
    in_backbone = [layer for layer in norms if layer in encoder_of(model).layers]
    assert (len(in_backbone) > 0) == (name != "convnexttiny")  # ConvNeXt normalises with LayerNorm
    assert all(layer.momentum == 0.9 for layer in norms) and all(layer.get_config()["momentum"] == 0.9 for layer in norms)


def test_dataset_normalization_reaches_the_backbone_as_the_data_sets_own_z_scores(tmp_path):
    """data.normalize: dataset before a torch-style backbone (ConvNeXt): the data set's standardisation, given
    ImageNet's pixel statistics, then the backbone's standardisation by them: the backbone sees the z-scores
    themselves. The model saves and loads (every constant a plain number)."""
    import keras

    from segtrain.encoders.build import build_encoder_unet

    stats = {"method": "dataset", "low": [0.0, 10.0, 20.0], "high": [200.0, 250.0, 240.0],
             "mean": [90.0, 120.0, 100.0], "std": [30.0, 40.0, 25.0]}
    model = build_encoder_unet("convnexttiny", 3, 1, NARROW, normalization=stats)
    pixels = np.random.default_rng(3).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    probe = keras.Model(model.input, [model.get_layer("normalize").output, model.get_layer("preprocess").output])
    z, seen = (t.numpy() for t in probe(pixels))
    clipped = np.clip(pixels, stats["low"], stats["high"])
    np.testing.assert_allclose(z, (clipped - stats["mean"]) / np.asarray(stats["std"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(seen, z, rtol=1e-4, atol=1e-4)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(loaded(pixels).numpy(), model(pixels).numpy(), rtol=1e-5, atol=1e-5)
