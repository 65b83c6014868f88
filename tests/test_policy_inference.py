"""Tests for segtrain.policy.inference: tile layout, windows, the whole-image pass, tiles blended as logits, flip TTA,
and images of any size down to 1 px, each against a direct model call or an independent NumPy blend."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
from keras import layers

from segtrain.policy import inference
from segtrain.policy.inference import WINDOW_FLOOR, make_window, predict_logits, predict_probabilities, tile_positions

DIVISOR = 4  # the tiny U-Net below pools twice


def tiny_unet(in_channels, out_channels, seed=0, scale=1.0):
    """Two-level U-Net (Conv/MaxPool/UpSampling/Concatenate), logits out, fixed random init; `scale` multiplies the
    logits (10: logits up to about 8, so tiles that see different context disagree by about 1)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, in_channels))
    c1 = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    c2 = layers.Conv2D(16, 3, padding="same", activation="relu")(layers.MaxPooling2D()(c1))
    c3 = layers.Conv2D(16, 3, padding="same", activation="relu")(layers.MaxPooling2D()(c2))
    d2 = layers.Conv2D(16, 3, padding="same", activation="relu")(
        layers.Concatenate()([layers.UpSampling2D()(c3), c2])
    )
    d1 = layers.Conv2D(8, 3, padding="same", activation="relu")(
        layers.Concatenate()([layers.UpSampling2D()(d2), c1])
    )
    out = layers.Conv2D(out_channels, 1)(d1)
    return keras.Model(inp, out if scale == 1.0 else layers.Rescaling(scale)(out))


def pointwise_model(in_channels, out_channels, seed=1):
    """A 1x1-conv network: no spatial context, so every tiling must reproduce the whole-image pass."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, in_channels))
    h = layers.Conv2D(8, 1, activation="tanh")(inp)
    return keras.Model(inp, layers.Conv2D(out_channels, 1)(h))


def smooth_noise(rng, n, height, width, k=7):
    """Box-blurred Gaussian noise (N, H, W, 1), std about 1, blobs about 2k+1 pixels wide."""
    x = rng.normal(size=(n, height + 2 * k, width + 2 * k))
    c = np.cumsum(np.cumsum(np.pad(x, ((0, 0), (1, 0), (1, 0))), 1), 2)
    s = 2 * k + 1
    b = (c[:, s:, s:] - c[:, :-s, s:] - c[:, s:, :-s] + c[:, :-s, :-s]) / s
    return b[:, :height, :width, None].astype("float32")


def synthetic_labels(x, out_channels):
    """Binary: x > 0. Three classes: x below -0.5, between, above 0.5."""
    if out_channels == 1:
        return (x[..., 0] > 0).astype("float32")[..., None]
    return np.digitize(x[..., 0], [-0.5, 0.5]).astype("int32")


def probabilities(logits):
    """Independent NumPy reference: sigmoid -> [1 - p, p] for one channel, softmax otherwise."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[-1] == 1:
        p = 1.0 / (1.0 + np.exp(-logits))
        return np.concatenate([1.0 - p, p], axis=-1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def forward(model, image):
    """Direct whole-image forward pass: probabilities (H, W, K)."""
    return probabilities(model(image[None], training=False))[0]


def forward_logits(model, image):
    """Direct whole-image forward pass: logits (H, W, C), float64."""
    return np.asarray(model(image[None], training=False), np.float64)[0]


def pad_end(image, divisor, axes=(0, 1)):
    """Reflect-pad the END of `axes` to a multiple of `divisor` with np.pad (a 1-px side repeats its pixel): the
    values of segtrain.policy.padding's rule (tests/test_policy_padding.py)."""
    widths = [(0, 0)] * image.ndim
    for axis in axes:
        widths[axis] = (0, -(-image.shape[axis] // divisor) * divisor - image.shape[axis])
    return np.pad(image, widths, mode="reflect")


def padded_forward_logits(model, image, divisor=DIVISOR):
    """The exact whole-image pass, independently: pad the end to a multiple of `divisor`, one call, crop back."""
    height, width = image.shape[:2]
    return forward_logits(model, pad_end(image, divisor))[:height, :width]


def cosine_window(n):
    """sin^2(pi (i + 0.5) / n) over i = 0..n-1 (make_window's formula, written again)."""
    return np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2


def blend_reference(model, image, tile, overlap=0.25, divisor=DIVISOR, tta=False, blend="logits"):
    """Tiled prediction written out in NumPy: pad the sides no longer than a tile, cut tiles every
    round(tile * (1 - overlap)) with the last one on the border, run each tile alone (the mean of its three flips
    with `tta`), blend their logits (or, with blend="probabilities", their probabilities) with the floored,
    normalised cosine window, crop back."""
    height, width = image.shape[:2]
    x = pad_end(image, divisor, tuple(a for a in (0, 1) if image.shape[a] <= tile))
    ph, pw = x.shape[:2]
    th, tw = min(tile, ph), min(tile, pw)
    stride = int(round(tile * (1 - overlap)))

    def starts(length, size):
        if length <= size:
            return [0]
        return sorted(set(range(0, length - size, min(stride, size))) | {length - size})

    w = np.outer(cosine_window(th), cosine_window(tw))
    w = np.maximum(w / w.max(), WINDOW_FLOOR)[..., None]
    total, weight = 0.0, np.zeros((ph, pw, 1))
    for y in starts(ph, th):
        for x0 in starts(pw, tw):
            t = x[y : y + th, x0 : x0 + tw]
            z = forward_logits(model, t)
            if tta:
                z = (z + forward_logits(model, t[:, ::-1].copy())[:, ::-1]
                     + forward_logits(model, t[::-1].copy())[::-1]) / 3.0
            v = z if blend == "logits" else probabilities(z)
            acc = np.zeros((ph, pw, v.shape[-1]))
            acc[y : y + th, x0 : x0 + tw] = v * w
            total = total + acc
            weight[y : y + th, x0 : x0 + tw] += w
    return (total / weight)[:height, :width]


@pytest.fixture(scope="module", params=[1, 3], ids=["binary", "3-class"])
def unet(request):
    return tiny_unet(1, request.param)


@pytest.fixture(scope="module", params=[1, 3], ids=["binary", "3-class"])
def trained_unet(request):
    """The tiny U-Net after 12 Adam steps on 'threshold a smoothed noise image' (about 3 s on CPU)."""
    out_channels = request.param
    model = tiny_unet(1, out_channels)
    xs = smooth_noise(np.random.default_rng(0), 16, 64, 64)
    loss = (
        keras.losses.BinaryCrossentropy(from_logits=True)
        if out_channels == 1
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.compile(keras.optimizers.Adam(1e-2), loss)
    model.fit(xs, synthetic_labels(xs, out_channels), batch_size=8, epochs=6, verbose=0)
    return model


# ---------------------------------------------------------------- tile_positions / make_window


@pytest.mark.parametrize(
    "length, tile, stride, expected",
    [
        (200, 64, 48, [0, 48, 96, 136]),  # 0, 48, 96 (< 136), then the border tile at 200 - 64
        (64, 64, 48, [0]),  # fits in one tile
        (10, 64, 48, [0]),
        (65, 64, 48, [0, 1]),  # one pixel too long: a second tile aligned to the border
        (192, 64, 64, [0, 64, 128]),  # exact fit, no duplicate border tile
    ],
)
def test_tile_positions_worked_examples(length, tile, stride, expected):
    assert tile_positions(length, tile, stride) == expected


@pytest.mark.parametrize("length, tile, stride", [(1000, 256, 192), (257, 256, 1), (300, 17, 5)])
def test_tile_positions_cover_without_gaps(length, tile, stride):
    pos = tile_positions(length, tile, stride)
    assert pos[0] == 0 and pos[-1] == length - tile
    assert all(0 < b - a <= stride for a, b in zip(pos, pos[1:]))


def test_tile_positions_rejects_gaps():
    with pytest.raises(ValueError):
        tile_positions(100, 16, 17)


@pytest.mark.parametrize("kind", ["cosine", "gaussian"])
def test_window_shape_range_and_symmetry(kind):
    w = make_window((32, 48), kind)
    assert w.shape == (32, 48) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0, abs=1e-3) and w.min() >= WINDOW_FLOOR
    np.testing.assert_allclose(w, w[::-1, ::-1], atol=1e-7)
    # Centre weighs far more than the corner, where a tile sees padding instead of context.
    assert w[16, 24] > 0.9 and w[0, 0] < 0.01


def test_cosine_window_values():
    # N = 4: sin^2(pi * (n + 0.5) / 4) = [0.1464, 0.8536, 0.8536, 0.1464]; / max 0.8536 -> [0.1716, 1, 1, 0.1716]
    w = make_window(4, "cosine")
    np.testing.assert_allclose(w[1], [0.171573, 1.0, 1.0, 0.171573], atol=1e-5)
    np.testing.assert_allclose(w[0, 0], 0.171573**2, atol=1e-5)


def test_unknown_window_rejected():
    with pytest.raises(ValueError, match="window"):
        make_window(8, "box")


# ---------------------------------------------------------------- whole image: one exact forward pass


@pytest.mark.parametrize("shape", [(45, 61), (64, 64), (130, 97)])
def test_whole_image_path_equals_a_direct_call_on_the_padded_image(unet, shape):
    # tile_size None: images up to 2048 x 2048 go through whole, padded at the end and cropped back
    image = np.random.default_rng(12).normal(size=(*shape, 1)).astype("float32")
    got = predict_logits(unet, image, divisor=DIVISOR)
    assert got.shape == (*shape, unet.output_shape[-1]) and got.dtype == np.float32
    np.testing.assert_allclose(got, padded_forward_logits(unet, image), atol=1e-6)  # float32 forward passes
    if shape == (130, 97):  # larger than the tiles below: whole, not tiled (tiles would differ by ~0.1)
        assert np.abs(got - predict_logits(unet, image, tile_size=32, divisor=DIVISOR)).max() > 1e-2


def test_default_tiles_only_beyond_the_whole_image_limit(monkeypatch):
    # the limit is 2048 x 2048 padded pixels; shrunk here to 48 x 48 (and the default tile to 32) to test the rule
    monkeypatch.setattr(inference, "WHOLE_IMAGE_PIXELS", 48 * 48)
    monkeypatch.setattr(inference, "DEFAULT_TILE", 32)
    model = tiny_unet(1, 1, scale=10.0)
    rng = np.random.default_rng(13)
    fits = rng.normal(size=(45, 47, 1)).astype("float32")  # padded 48 x 48 = the limit: whole, although > a tile
    np.testing.assert_allclose(predict_logits(model, fits, divisor=DIVISOR), padded_forward_logits(model, fits),
                               atol=1e-5)
    over = rng.normal(size=(49, 48, 1)).astype("float32")  # padded 52 x 48 > 48 x 48: tiles of DEFAULT_TILE
    got = predict_logits(model, over, divisor=DIVISOR)
    np.testing.assert_array_equal(got, predict_logits(model, over, tile_size=32, divisor=DIVISOR))
    np.testing.assert_allclose(got, blend_reference(model, over, 32), atol=2e-5)
    assert np.abs(got - padded_forward_logits(model, over)).max() > 1e-2


# ---------------------------------------------------------------- an explicit tile that holds the image



@pytest.mark.parametrize("shape", [(48, 60), (64, 64)])
def test_single_tile_equals_direct_forward_pass(unet, shape):
    image = np.random.default_rng(2).normal(size=(*shape, 1)).astype("float32")
    got = predict_probabilities(unet, image, tile_size=64, divisor=DIVISOR)
    k = max(2, unet.output_shape[-1])
    assert got.shape == (*shape, k) and got.dtype == np.float32
    np.testing.assert_allclose(got, forward(unet, image), atol=1e-6)


def test_single_tile_not_divisible_is_reflect_padded_and_cropped(unet):
    image = np.random.default_rng(3).normal(size=(45, 61, 1)).astype("float32")
    got = predict_probabilities(unet, image, tile_size=64, divisor=DIVISOR)
    padded = np.pad(image, ((0, 3), (0, 3), (0, 0)), mode="reflect")  # 45 -> 48, 61 -> 64
    assert got.shape[:2] == (45, 61)
    np.testing.assert_allclose(got, forward(unet, padded)[:45, :61], atol=1e-6)


def test_binary_gives_two_channels_summing_to_one():
    model = tiny_unet(1, 1)
    image = np.random.default_rng(4).normal(size=(32, 40, 1)).astype("float32")
    got = predict_probabilities(model, image, tile_size=48, divisor=DIVISOR)  # one tile
    assert got.shape == (32, 40, 2)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
    logits = np.asarray(model(image[None], training=False))[0, ..., 0]
    np.testing.assert_allclose(got[..., 1], 1.0 / (1.0 + np.exp(-logits)), atol=1e-6)


# ---------------------------------------------------------------- tiled prediction


@pytest.mark.parametrize("out_channels", [1, 3])
@pytest.mark.parametrize("shape, overlap", [((40, 56), 0.25), ((70, 45), 0.5), ((30, 70), 0.25)],
                         ids=["2x2-tiles", "3x3-tiles", "short-rows-padded"])
def test_tiles_blend_logits_as_the_numpy_reference(shape, overlap, out_channels):
    # A U-Net with logits up to ~8 whose tiles disagree near their borders: any error in offsets, window, padding
    # of short sides, or blending probabilities instead of logits shows. (30, 70): rows shorter than a tile are
    # padded to 32, the columns tiled as they are.
    model = tiny_unet(1, out_channels, scale=10.0)
    image = np.random.default_rng(14).normal(size=(*shape, 1)).astype("float32")
    got = predict_logits(model, image, tile_size=32, overlap=overlap, divisor=DIVISOR)
    reference = blend_reference(model, image, 32, overlap)
    assert got.shape == (*shape, out_channels) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference, atol=2e-5)  # float32 sums of logits up to ~8 (measured: 4e-6)
    probs = predict_probabilities(model, image, tile_size=32, overlap=overlap, divisor=DIVISOR)
    np.testing.assert_allclose(probs, probabilities(reference), atol=1e-5)
    # blending probabilities instead would give other values
    assert np.abs(probs - blend_reference(model, image, 32, overlap, blend="probabilities")).max() > 1e-2




@pytest.mark.parametrize("window", ["cosine", "gaussian"])
@pytest.mark.parametrize("shape", [(131, 150), (30, 150), (97, 33)])
def test_tiling_reproduces_a_context_free_model_exactly(shape, window):
    # A 1x1 network predicts every pixel the same in any tile, so any error in offsets, window
    # normalisation, padding or cropping shows up. (30, 150): rows shorter than a tile.
    model = pointwise_model(3, 4)
    image = np.random.default_rng(5).normal(size=(*shape, 3)).astype("float32")
    got = predict_probabilities(model, image, tile_size=32, overlap=0.3, divisor=DIVISOR, window=window)
    assert got.shape == (*shape, 4)
    np.testing.assert_allclose(got, forward(model, image), atol=1e-5)


def test_tiled_argmax_agrees_with_whole_image_pass(trained_unet):
    # Measured (TF 2.21 CPU, 200x260, tile 64, overlap 0.25, cosine window), share of pixels
    # whose argmax matches the whole-image pass:
    #   random init:                  binary 98.5 %, 3-class 97.9 %  (near-zero logits, border effects)
    #   after 12 steps (this fixture): binary 99.93 %, 3-class 99.80 %  (printed below, see -s)
    image = smooth_noise(np.random.default_rng(6), 1, 200, 260)[0]
    got = predict_probabilities(trained_unet, image, tile_size=64, overlap=0.25, divisor=DIVISOR)
    whole = forward(trained_unet, image)
    agreement = float((got.argmax(-1) == whole.argmax(-1)).mean())
    print(f"argmax agreement tiled vs whole image ({whole.shape[-1]} classes): {agreement:.4%}")
    assert agreement >= 0.99
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_large_image_not_divisible_keeps_input_size(unet):
    image = np.random.default_rng(7).normal(size=(131, 97, 1)).astype("float32")
    got = predict_probabilities(unet, image, tile_size=64, divisor=DIVISOR)
    assert got.shape[:2] == (131, 97)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_batch_size_does_not_change_result(unet):
    image = np.random.default_rng(8).normal(size=(150, 110, 1)).astype("float32")  # 3 x 2 = 6 tiles
    ref = predict_probabilities(unet, image, tile_size=64, batch_size=1, divisor=DIVISOR)
    for batch_size in (4, 8):  # 4: last batch padded; 8: one padded batch
        got = predict_probabilities(unet, image, tile_size=64, batch_size=batch_size, divisor=DIVISOR)
        np.testing.assert_allclose(got, ref, atol=1e-5)


# ---------------------------------------------------------------- flip TTA


def test_tta_single_tile_is_the_mean_of_three_flips_logits(unet):
    image = np.random.default_rng(9).normal(size=(32, 48, 1)).astype("float32")
    got = predict_logits(unet, image, tile_size=64, tta=True, divisor=DIVISOR)
    expected = (
        forward_logits(unet, image)
        + forward_logits(unet, image[:, ::-1].copy())[:, ::-1]
        + forward_logits(unet, image[::-1].copy())[::-1]
    ) / 3.0
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(predict_probabilities(unet, image, tile_size=64, tta=True, divisor=DIVISOR),
                               probabilities(expected), atol=1e-6)  # probabilities of the mean logits
    assert not np.allclose(got, forward_logits(unet, image), atol=1e-4)  # the flips did something


def test_tta_with_tiles_averages_each_tiles_flipped_logits():
    model = tiny_unet(1, 3, scale=10.0)
    image = np.random.default_rng(11).normal(size=(40, 56, 1)).astype("float32")
    got = predict_logits(model, image, tile_size=32, tta=True, divisor=DIVISOR)
    np.testing.assert_allclose(got, blend_reference(model, image, 32, tta=True), atol=2e-5)


def test_tta_on_flip_symmetric_image_is_finite_and_normalised(unet):
    a = np.random.default_rng(10).normal(size=(100, 140, 1)).astype("float32")
    image = a + a[::-1] + a[:, ::-1] + a[::-1, ::-1]  # invariant under both flips
    got = predict_probabilities(unet, image, tile_size=64, tta=True, divisor=DIVISOR)
    assert got.shape[:2] == (100, 140) and np.isfinite(got).all()
    assert got.min() >= 0.0 and got.max() <= 1.0
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- tiny images


TINY_SHAPES = [(1, 1), (1, 2), (2, 1), (1, 5), (5, 1), (2, 3), (3, 4), (4, 4), (5, 5)]


@pytest.mark.parametrize("shape", TINY_SHAPES, ids=[f"{h}x{w}" for h, w in TINY_SHAPES])
def test_tiny_images_go_through_whole(unet, shape):
    image = np.random.default_rng(sum(shape)).normal(size=(*shape, 1)).astype("float32")
    expected = padded_forward_logits(unet, image)  # a 1-px side repeats its pixel; 5 -> 8 reflects 3
    for tile_size in (None, 32):
        got = predict_logits(unet, image, tile_size, divisor=DIVISOR)
        assert got.shape == (*shape, unet.output_shape[-1]) and np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=1e-6)
    probs = predict_probabilities(unet, image, divisor=DIVISOR)
    np.testing.assert_allclose(probs, probabilities(expected), atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 3)])
def test_tiny_images_with_a_deep_divisor(shape):
    # divisor 16 (a depth-4 U-Net): a 1-px side padded to 16, a 5-px side by three reflections; a 1x1 network
    # must give every pixel its own value whatever the padding
    model = pointwise_model(3, 2)
    image = np.random.default_rng(15).normal(size=(*shape, 3)).astype("float32")
    got = predict_logits(model, image, divisor=16)
    np.testing.assert_allclose(got, forward_logits(model, image), atol=1e-6)
    np.testing.assert_allclose(got, padded_forward_logits(model, image, 16), atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 70), (70, 1), (3, 70)])
def test_a_thin_image_longer_than_a_tile(unet, shape):
    # the short side is padded to 4 px, the long one tiled: tiles of (4, 32) or (32, 4)
    image = np.random.default_rng(16).normal(size=(*shape, 1)).astype("float32")
    got = predict_logits(unet, image, tile_size=32, divisor=DIVISOR)
    assert got.shape == (*shape, unet.output_shape[-1]) and np.isfinite(got).all()
    np.testing.assert_allclose(got, blend_reference(unet, image, 32), atol=1e-5)
    pointwise = pointwise_model(1, 3)
    np.testing.assert_allclose(predict_logits(pointwise, image, tile_size=32, divisor=DIVISOR),
                               forward_logits(pointwise, image), atol=1e-5)


# ---------------------------------------------------------------- temperature


def test_probabilities_are_the_tempered_logits(unet):
    image = np.random.default_rng(17).normal(size=(40, 56, 1)).astype("float32")
    for tile_size in (None, 32):
        z = predict_logits(unet, image, tile_size, divisor=DIVISOR)
        for temperature in (1.0, 0.3, 2.5):
            got = predict_probabilities(unet, image, tile_size, temperature, divisor=DIVISOR)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, probabilities(z / temperature), atol=1e-6)
    if unet.output_shape[-1] == 3:  # per-class temperatures divide each channel by its own T
        vector = [0.5, 1.0, 4.0]
        got = predict_probabilities(unet, image, None, vector, divisor=DIVISOR)
        z = predict_logits(unet, image, divisor=DIVISOR)
        np.testing.assert_allclose(got, probabilities(z / np.array(vector)), atol=1e-6)
    for bad in (0.0, -1.0, [1.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match="temperature"):
            predict_probabilities(unet, image, None, bad, divisor=DIVISOR)


# ---------------------------------------------------------------- misc


def test_progress_bar_counts_tiles(capsys):
    model = pointwise_model(1, 2)
    image = np.zeros((70, 70, 1), dtype="float32")  # positions [0, 24, 38] per axis -> 9 tiles
    predict_probabilities(model, image, tile_size=32, divisor=DIVISOR, progress=True)
    assert "0/9" in capsys.readouterr().err  # the bar's total is the number of tiles


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tile_size": 30}, "multiple of divisor"),
        ({"tile_size": 32, "overlap": 1.0}, "overlap"),
        ({"tile_size": 32, "batch_size": 0}, "batch_size"),
        ({"tile_size": 32, "window": "box"}, "window"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    model = pointwise_model(1, 2)
    with pytest.raises(ValueError, match=match):
        predict_probabilities(model, np.zeros((40, 40, 1), "float32"), divisor=DIVISOR, **kwargs)


def test_zero_logit_is_foreground_in_prediction_as_in_validation():
    # An identity "model": the image is the logit map. A logit of exactly 0 must be labelled
    # the same by prediction (probabilities -> decide) as by validation (labels_from_logits).
    from segtrain.decision import decide
    from segtrain.metrics import labels_from_logits

    inp = keras.Input((None, None, 1))
    model = keras.Model(inp, layers.Identity()(inp))
    logits = np.zeros((8, 8, 1), np.float32)
    logits[0, :4, 0] = [-1.0, 1.0, -1e-8, -1e-6]
    probs = predict_probabilities(model, logits, tile_size=8, divisor=DIVISOR)
    assert probs[1, 1, 1] == 0.5  # sigmoid(0) exactly
    labels = decide(probs)
    np.testing.assert_array_equal(labels, labels_from_logits(logits[None]).numpy()[0])
    assert labels[1:].all() and labels[0, 4:].all()  # every exact 0 is foreground
    assert labels[0, :4].tolist() == [0, 1, int(probs[0, 2, 1] >= 0.5), 0]
    np.testing.assert_array_equal(decide(probs, "threshold", threshold=0.5), labels)
