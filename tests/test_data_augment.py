"""data.augment: each transform of segtrain.data.augment moves image and mask together, keeps ignored pixels
ignored, ignores what it uncovers, is a pure function of (seed, element index), and is off by default.

The geometric checks read where each output pixel came from out of the image itself: channel 0 of the test
image is the row index and channel 1 the column index of the input pixel. Bilinear interpolation reproduces a
linear ramp exactly (up to float rounding), and the image's coordinates are clamped to the image, so an output
pixel's image value is its source coordinate s, clamped. The mask is sampled at the nearest pixel, round(s), and
|clamp(s) - round(s)| <= 0.5 whenever round(s) lies inside the image: the mask value must be the label of an
input pixel within 0.5 (+ 1e-3 for ties and float error) of the decoded coordinate in each axis.
"""

import numpy as np
import pytest
import tensorflow as tf

from segtrain.config import AugmentConfig, DataConfig, ElasticConfig, MaskConfig, config_from_dict
from segtrain.data import augment as aug
from segtrain.data.discovery import find_pairs
from segtrain.data.masks import MaskMapping
from segtrain.data.pipeline import DataSpec, augment, training_dataset
from segtrain.errors import ConfigError
from segtrain.labels import IGNORE_INDEX
from tests.helpers import invoke, write_config

N = 32
EPS = 1e-3


def ramp_pair(n=N, ignore_block=True):
    """Image channels (row, col, 0); mask: 4x4 blocks of classes 0..2, one block of IGNORE_INDEX."""
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.float32)
    labels = ((rows // 4 + cols // 4) % 3).astype(np.int32)
    if ignore_block:
        labels[12:20, 8:16] = IGNORE_INDEX
    return image, labels


def _near(coordinate, size, reach=0.5):
    """Input pixel indices within reach + EPS of a decoded coordinate, clipped to the image."""
    low = int(np.floor(coordinate - reach - EPS)) + 1
    high = int(np.ceil(coordinate + reach + EPS)) - 1
    return {int(np.clip(i, 0, size - 1)) for i in range(low, high + 1)}


def check_moves_together(out_image, out_mask, labels, whole_input=True, reach=0.5):
    """Every mask pixel is the label of an input pixel next to where the image was read; an ignored output pixel
    either came from an ignored one or lies where the map left the image (its decoded coordinate clamped to the
    border; checked when the transform saw the `whole_input`, not a crop of it). Returns the count of ignored
    pixels the transform uncovered. Two nearest-neighbour maps in a row (a rotation, then an elastic deformation)
    round twice: `reach` 0.5 + 0.5 * sqrt(2) (the second rounding's half pixel, turned by up to 45 degrees)."""
    h, w = labels.shape
    uncovered = 0
    for y in range(out_mask.shape[0]):
        for x in range(out_mask.shape[1]):
            r, c = out_image[y, x, 0], out_image[y, x, 1]
            candidates = {labels[i, j] for i in _near(r, h, reach) for j in _near(c, w, reach)}
            value = out_mask[y, x]
            if value == IGNORE_INDEX and IGNORE_INDEX not in candidates:
                at_border = min(r, c) < 0.5 + EPS or r > h - 1.5 - EPS or c > w - 1.5 - EPS
                assert at_border or not whole_input, (y, x, r, c)
                uncovered += 1
            else:
                assert value in candidates, (y, x, r, c, value, candidates)
    return uncovered


def seed(i, base=3):
    return tf.constant([base, i], tf.int64)


# ---------------------------------------------------------------------------- geometric transforms


@pytest.mark.parametrize("i", range(4))
def test_rotation_moves_image_and_mask_together_and_ignores_the_corners(i):
    image, labels = ramp_pair()
    out_image, out_mask = aug.random_rotate(tf.constant(image), tf.constant(labels), seed(i), 40.0)
    out_image, out_mask = out_image.numpy(), out_mask.numpy()
    assert out_mask.shape == labels.shape
    check_moves_together(out_image, out_mask, labels)
    assert (out_mask == IGNORE_INDEX).sum() >= (labels == IGNORE_INDEX).sum() - 16  # the block stays (a rim may leave)


def test_rotation_uncovers_exactly_the_pixels_whose_source_is_outside():
    """45 degrees: the expected uncovered set, from the documented map, rounded to the nearest pixel."""
    image, labels = ramp_pair(ignore_block=False)
    out_image, out_mask = aug.rotate(tf.constant(image), tf.constant(labels), 45.0)
    out_mask = out_mask.numpy()
    a = np.pi / 4
    y, x = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    centre = (N - 1) / 2
    src_r = np.sin(a) * (x - centre) + np.cos(a) * (y - centre) + centre
    src_c = np.cos(a) * (x - centre) - np.sin(a) * (y - centre) + centre
    outside = (np.round(src_r) < 0) | (np.round(src_r) > N - 1) | (np.round(src_c) < 0) | (np.round(src_c) > N - 1)
    ties = (np.abs(np.abs(src_r % 1) - 0.5) < EPS) | (np.abs(np.abs(src_c % 1) - 0.5) < EPS)
    assert outside.sum() > 100  # the four corners
    assert np.array_equal((out_mask == IGNORE_INDEX)[~ties], outside[~ties])
    assert (out_mask[N // 2 - 4 : N // 2 + 4, N // 2 - 4 : N // 2 + 4] != IGNORE_INDEX).all()
    # the decoded source coordinates are the documented ones where they lie inside
    inside = ~outside & (src_r >= 0) & (src_r <= N - 1) & (src_c >= 0) & (src_c <= N - 1)
    np.testing.assert_allclose(out_image.numpy()[..., 0][inside], src_r[inside], atol=1e-3)
    np.testing.assert_allclose(out_image.numpy()[..., 1][inside], src_c[inside], atol=1e-3)


@pytest.mark.parametrize("i", range(4))
def test_elastic_moves_image_and_mask_together_and_ignores_what_it_uncovers(i):
    image, labels = ramp_pair()
    out_image, out_mask = aug.random_elastic(tf.constant(image), tf.constant(labels), seed(i), 3.0, 4.0)
    out_image, out_mask = out_image.numpy(), out_mask.numpy()
    uncovered = check_moves_together(out_image, out_mask, labels)
    moved = np.abs(out_image[..., 0] - image[..., 0]) + np.abs(out_image[..., 1] - image[..., 1])
    assert moved.mean() > 1.0  # alpha 3 pixels really moves them
    assert uncovered > 0  # border pixels pulled from outside the image


def test_elastic_alpha_is_the_displacement_std_in_pixels():
    """alpha 2: the measured displacement of interior pixels has a standard deviation near 2 pixels."""
    image, labels = ramp_pair(n=64, ignore_block=False)
    out_image, _ = aug.random_elastic(tf.constant(image), tf.constant(labels), seed(0), 2.0, 3.0)
    displacement = (out_image.numpy()[..., :2] - image[..., :2])[12:-12, 12:-12]
    assert 1.0 < displacement.std() < 3.0


@pytest.mark.parametrize("low,high", [(0.6, 0.8), (1.2, 1.6), (0.8, 1.25)])
def test_scale_moves_image_and_mask_together(low, high):
    image, labels = ramp_pair()
    for i in range(3):
        out_image, out_mask = aug.random_scale(tf.constant(image), tf.constant(labels), seed(i), low, high)
        out_image, out_mask = out_image.numpy(), out_mask.numpy()
        assert low * N - 1 <= out_mask.shape[0] <= high * N + 1 and out_mask.shape[0] == out_mask.shape[1]
        assert check_moves_together(out_image, out_mask, labels) == 0  # a resize uncovers nothing
        if IGNORE_INDEX in out_mask:  # the ignored block stays, scaled
            share = (out_mask == IGNORE_INDEX).mean()
            assert abs(share - (labels == IGNORE_INDEX).mean()) < 0.03


def test_zoom_out_before_the_crop_pads_with_ignore_and_keeps_the_crop_size():
    image, labels = ramp_pair()
    options = AugmentConfig(flip=False, rotate90=False, scale=[0.5, 0.5])
    out_image, out_mask = augment(tf.constant(image), tf.constant(labels), seed(0), 24, False, False,
                                  options=options)
    assert out_image.shape == (24, 24, 3) and out_mask.shape == (24, 24)
    out_mask = out_mask.numpy()
    assert (out_mask[16:, :] == IGNORE_INDEX).all() and (out_mask[:, 16:] == IGNORE_INDEX).all()
    # the zoomed image covers 16 x 16 and follows the mask there (pixel k reads input 2k + 0.5)
    check_moves_together(out_image.numpy()[:16, :16], out_mask[:16, :16], labels)


def test_sampled_centre_follows_the_scale():
    """Class-aware sampling centres the crop on a class pixel recorded before the zoom: it stays in the crop."""
    image = np.zeros((64, 64, 1), np.float32)
    labels = np.zeros((64, 64), np.int32)
    labels[40:42, 50:52] = 1
    image[40:42, 50:52] = 255
    for scale in ([0.5, 0.5], [2.0, 2.0], [0.7, 1.4]):
        options = AugmentConfig(flip=False, rotate90=False, scale=scale)
        for i in range(4):
            centre = (tf.constant(True), tf.constant(40), tf.constant(50))
            out_image, out_mask = augment(tf.constant(image), tf.constant(labels), seed(i), 8, False, False,
                                          centre=centre, options=options)
            assert (out_mask.numpy() == 1).any(), (scale, i)


# ---------------------------------------------------------------------------- photometric transforms


def _photo(name, value):
    image = np.random.default_rng(0).uniform(0, 255, (16, 16, 3)).astype(np.float32)
    return image, getattr(aug, f"random_{name}")


def test_brightness_adds_one_offset_within_the_range():
    image, fn = _photo("brightness", 0.1)
    offsets = []
    for i in range(8):
        diff = fn(tf.constant(image), seed(i), 0.1).numpy() - image
        np.testing.assert_allclose(diff, diff.flat[0], atol=1e-3)
        offsets.append(diff.flat[0])
    assert max(abs(o) for o in offsets) <= 25.5 + 1e-3 and np.std(offsets) > 1


def test_contrast_scales_deviations_from_the_mean():
    image, fn = _photo("contrast", 0.2)
    mean = image.mean(axis=(0, 1))
    factors = []
    for i in range(8):
        out = fn(tf.constant(image), seed(i), 0.2).numpy()
        factor = (out - mean) / (image - mean)
        np.testing.assert_allclose(factor, factor.flat[0], rtol=1e-3, atol=1e-3)
        factors.append(factor.flat[0])
    assert all(0.8 - 1e-4 <= f <= 1.2 + 1e-4 for f in factors) and np.std(factors) > 0.01


def test_gamma_is_a_power_in_the_range():
    image, fn = _photo("gamma", 0.2)
    for i in range(8):
        out = fn(tf.constant(image), seed(i), 0.2).numpy()
        gamma = np.log(out / 255) / np.log(image / 255)
        ok = np.abs(np.log(image / 255)) > 0.05  # away from 255, where both logs vanish
        np.testing.assert_allclose(gamma[ok], np.median(gamma[ok]), rtol=1e-3)
        assert 1 / 1.2 - 1e-4 <= np.median(gamma[ok]) <= 1.2 + 1e-4


def test_noise_has_the_configured_std():
    image = np.full((64, 64, 3), 100.0, np.float32)
    out = aug.random_noise(tf.constant(image), seed(0), 5.0).numpy()
    assert abs((out - image).std() - 5.0) < 0.3 and abs((out - image).mean()) < 0.3


def test_blur_keeps_flat_images_and_mass_and_spreads_an_impulse():
    flat = np.full((16, 16, 3), 80.0, np.float32)
    np.testing.assert_allclose(aug.random_blur(tf.constant(flat), seed(0), 0.5, 1.5).numpy(), 80.0, rtol=1e-5)
    impulse = np.zeros((17, 17, 1), np.float32)
    impulse[8, 8] = 100
    out = aug.random_blur(tf.constant(impulse), seed(0), 1.0, 1.0).numpy()
    assert abs(out.sum() - 100) < 1e-2 and 10 < out[8, 8, 0] < 25  # 1 / (2 pi) = 16% stays at sigma 1
    assert np.allclose(aug.random_blur(tf.constant(impulse), seed(0), 0.0, 0.0).numpy(), impulse)


# ---------------------------------------------------------------------------- through the pipeline's augment

EVERY = {
    "scale": AugmentConfig(scale=[0.8, 1.25]),
    "rotate": AugmentConfig(rotate=30.0),
    "elastic": AugmentConfig(elastic=ElasticConfig(alpha=2.0, sigma=4.0)),
    "brightness": AugmentConfig(brightness=0.1),
    "contrast": AugmentConfig(contrast=0.2),
    "gamma": AugmentConfig(gamma=0.2),
    "blur": AugmentConfig(blur=[0.0, 1.0]),
    "noise": AugmentConfig(noise=5.0),
}
IMAGE_ONLY = ("brightness", "contrast", "gamma", "blur", "noise")


@pytest.mark.parametrize("name", sorted(EVERY))
def test_each_option_is_keyed_by_seed_and_element_and_moves_image_and_mask_together(name):
    image, labels = ramp_pair()
    image[..., 2] = 100.0  # a third channel for the photometric transforms
    options = EVERY[name]

    def run(s, opts=options):
        out_image, out_mask = augment(tf.constant(image), tf.constant(labels), s, 16, True, True, options=opts)
        return out_image.numpy(), out_mask.numpy()

    first, again, other_element, other_seed = run(seed(5)), run(seed(5)), run(seed(6)), run(seed(5, base=4))
    plain = run(seed(5), AugmentConfig())
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    changed = [not np.array_equal(first[0], o[0]) or not np.array_equal(first[1], o[1])
               for o in (other_element, other_seed)]
    assert all(changed)
    assert not np.array_equal(first[0], plain[0])  # the option did something
    if name in IMAGE_ONLY:  # the crop, flips and turns are those of the plain run; the mask is untouched
        assert np.array_equal(first[1], plain[1])
    else:
        check_moves_together(first[0], first[1], labels)


@pytest.mark.parametrize("rotate,elastic", [(45.0, None), (0.0, ElasticConfig(3.0, 4.0)), (30.0, ElasticConfig())])
def test_warps_of_a_crop_read_real_pixels_around_it_and_ignore_only_beyond_the_image(rotate, elastic):
    """A crop inside the image comes out with no ignored pixel (the margin window feeds its corners); a crop
    covering a whole 16 x 16 image ignores what the warp brings in from beyond it, and the image and mask still
    agree everywhere (the ramp holds absolute image coordinates)."""
    options = AugmentConfig(rotate=rotate, elastic=elastic)
    reach = 0.5 + 0.5 * np.sqrt(2) if rotate and elastic else 0.5
    image, labels = ramp_pair(n=64, ignore_block=False)
    for i in range(4):
        centre = (tf.constant(True), tf.constant(32), tf.constant(32))
        out_image, out_mask = augment(tf.constant(image), tf.constant(labels), seed(i), 16, True, True,
                                      centre=centre, options=options)
        assert (out_mask.numpy() != IGNORE_INDEX).all()
        check_moves_together(out_image.numpy(), out_mask.numpy(), labels, reach=reach)
    small_image, small_labels = ramp_pair(n=16, ignore_block=False)
    uncovered = 0
    for i in range(6):
        out_image, out_mask = augment(tf.constant(small_image), tf.constant(small_labels), seed(i), 16, True, True,
                                      options=options)
        uncovered += check_moves_together(out_image.numpy(), out_mask.numpy(), small_labels, reach=reach)
    assert uncovered > 0


def test_the_warp_margin_keeps_the_crop_where_it_was(stripes):
    """A rotation by a hair changes nothing but the rounding: the window around the crop is placed by the same
    draws, also for a sampled centre."""
    image, labels = ramp_pair(n=40)
    hair = AugmentConfig(rotate=1e-4)
    for i in range(6):
        for centre in (None, (tf.constant(i % 2 == 0), tf.constant(5 * i), tf.constant(37 - 3 * i))):
            plain = augment(tf.constant(image), tf.constant(labels), seed(i), 16, True, True, centre=centre)
            turned = augment(tf.constant(image), tf.constant(labels), seed(i), 16, True, True, centre=centre,
                             options=hair)
            np.testing.assert_allclose(turned[0].numpy(), plain[0].numpy(), atol=1e-2)
            assert np.array_equal(turned[1].numpy(), plain[1].numpy())


def test_defaults_are_off_and_leave_the_output_bit_for_bit_unchanged(stripes):
    """The default data.augment is today's (flips and turns only); a pipeline built with every new option
    explicitly off gives the same bytes, and so does `augment` without options."""
    default = AugmentConfig()
    assert (default.scale, default.rotate, default.elastic, default.brightness, default.contrast, default.gamma,
            default.blur, default.noise) == (None, 0.0, None, 0.0, 0.0, 0.0, None, 0.0)
    off = AugmentConfig(flip=True, rotate90=True, scale=None, rotate=0.0, elastic=None, brightness=0.0,
                        contrast=0.0, gamma=0.0, blur=None, noise=0.0)
    pairs = find_pairs(stripes, "train")

    def batches(augment_config):
        data = DataConfig(root=str(stripes), classes=["bg", "stripe"], mask=MaskConfig(threshold=127), crop=16,
                          batch_size=2, augment=augment_config)
        spec = DataSpec(data, MaskMapping(data.mask, data.classes), channels=3, divisor=8, seed=3)
        return [(i.numpy(), m.numpy()) for i, m in training_dataset(pairs, spec).take(4)]

    for (a_image, a_mask), (b_image, b_mask) in zip(batches(DataConfig().augment), batches(off)):
        assert a_image.tobytes() == b_image.tobytes() and a_mask.tobytes() == b_mask.tobytes()
    image, labels = ramp_pair()
    for i in range(4):
        without = augment(tf.constant(image), tf.constant(labels), seed(i), 16, True, True)
        with_off = augment(tf.constant(image), tf.constant(labels), seed(i), 16, True, True, options=off)
        assert all(a.numpy().tobytes() == b.numpy().tobytes() for a, b in zip(without, with_off))


ALL_ON = {"scale": [0.8, 1.25], "rotate": 30, "elastic": {"alpha": 2, "sigma": 4}, "brightness": 0.1,
          "contrast": 0.2, "gamma": 0.2, "blur": [0, 1], "noise": 5}


def test_pipeline_with_every_augmentation_resumes_exactly(stripes):
    data = DataConfig(root=str(stripes), classes=["bg", "stripe"], mask=MaskConfig(threshold=127), crop=16,
                      batch_size=2, augment=AugmentConfig(**{**ALL_ON, "elastic": ElasticConfig(2.0, 4.0)}))
    spec = DataSpec(data, MaskMapping(data.mask, data.classes), channels=3, divisor=8, seed=3)
    pairs = find_pairs(stripes, "train")
    full = [(i.numpy(), m.numpy()) for i, m in training_dataset(pairs, spec).take(4)]
    resumed = [(i.numpy(), m.numpy()) for i, m in training_dataset(pairs, spec, start_element=2 * 2).take(2)]
    for (a_image, a_mask), (b_image, b_mask) in zip(full[2:], resumed):
        assert np.array_equal(a_image, b_image) and np.array_equal(a_mask, b_mask)
    for images, masks in full:
        assert images.shape == (2, 16, 16, 3) and set(np.unique(masks)) <= {IGNORE_INDEX, 0, 1}


# ---------------------------------------------------------------------------- config and the command


def _config(**augment_section):
    return config_from_dict({"data": {"root": "x", "augment": augment_section}})


def test_config_keys_defaults_and_checks():
    config = _config(**ALL_ON)
    assert config.data.augment.elastic == ElasticConfig(alpha=2.0, sigma=4.0)
    assert config.data.augment.scale == [0.8, 1.25] and config.data.augment.rotate == 30.0
    assert _config(elastic=True).data.augment.elastic == ElasticConfig()
    assert _config(elastic=False).data.augment.elastic is None
    for bad, key in [({"scale": [1.25, 0.8]}, "data.augment.scale"), ({"scale": [0.8]}, "data.augment.scale"),
                     ({"blur": [0, 20]}, "data.augment.blur"), ({"rotate": 200}, "data.augment.rotate"),
                     ({"contrast": 1.0}, "data.augment.contrast"), ({"noise": -1}, "data.augment.noise"),
                     ({"elastic": {"sigma": 0}}, "data.augment.elastic.sigma"),
                     ({"rotation": 10}, "data.augment.rotation")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _config(**bad)


def test_fit_with_every_augmentation_on(stripes, tmp_path, float32_policy):
    config = write_config(tmp_path / "config.yaml", stripes,
                          data={"classes": ["background", "stripe"], "mask": {"threshold": 127}, "crop": 16,
                                "batch_size": 4, "augment": {"flip": True, "rotate90": True, **ALL_ON}})
    result = invoke("fit", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "last.keras").exists()
