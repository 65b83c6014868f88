import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from segtrain.config import AugmentConfig, DataConfig, MaskConfig, loss_config
from segtrain.data.discovery import find_pairs
from segtrain.data.masks import MaskMapping
from segtrain.data.pipeline import DataSpec, augment, evaluation_dataset, steps_per_epoch, training_dataset
from segtrain.labels import IGNORE_INDEX


def spec_for(root, **data_kwargs):
    data = DataConfig(root=str(root), classes=["bg", "stripe"], mask=MaskConfig(threshold=127), **data_kwargs)
    return DataSpec(data, MaskMapping(data.mask, data.classes), channels=3, divisor=8, seed=3)


def test_training_batches_shapes_and_labels(stripes):
    spec = spec_for(stripes, crop=16, batch_size=4)
    batch = next(iter(training_dataset(find_pairs(stripes, "train"), spec)))
    images, masks = batch
    assert images.shape == (4, 16, 16, 3) and images.dtype == tf.float32
    assert masks.shape == (4, 16, 16) and set(np.unique(masks.numpy())) <= {0, 1}
    # bright pixels are stripes: the image and the mask were cropped and flipped together
    bright = images.numpy().mean(axis=-1) > 120
    assert np.array_equal(bright, masks.numpy() == 1)


def test_same_seed_same_batches_and_resume_skips_exactly(stripes):
    spec = spec_for(stripes, crop=16, batch_size=2)
    pairs = find_pairs(stripes, "train")
    full = [b[1].numpy() for b in training_dataset(pairs, spec).take(5)]
    again = [b[1].numpy() for b in training_dataset(pairs, spec).take(5)]
    resumed = [b[1].numpy() for b in training_dataset(pairs, spec, start_element=3 * 2).take(2)]
    assert all(np.array_equal(a, b) for a, b in zip(full, again))
    assert np.array_equal(resumed[0], full[3]) and np.array_equal(resumed[1], full[4])


def test_streaming_without_cache(stripes):
    spec = spec_for(stripes, crop=16, batch_size=3, cache="none")
    images, masks = next(iter(training_dataset(find_pairs(stripes, "train"), spec)))
    assert images.shape == (3, 16, 16, 3)


def test_augment_moves_image_and_mask_together():
    image = tf.reshape(tf.range(16 * 16, dtype=tf.float32), [16, 16, 1])
    mask = tf.reshape(tf.range(16 * 16, dtype=tf.int32), [16, 16])
    for i in range(8):
        out_image, out_mask = augment(image, mask, tf.constant([1, i], tf.int64), 8, True, True)
        assert np.array_equal(out_image.numpy()[..., 0].astype(np.int32), out_mask.numpy())


def test_crop_larger_than_image_pads_with_ignore():
    image = tf.ones([4, 4, 1])
    mask = tf.zeros([4, 4], tf.int32)
    _, out_mask = augment(image, mask, tf.constant([0, 0], tf.int64), 8, False, False)
    assert (out_mask.numpy() == IGNORE_INDEX).sum() == 64 - 16


def test_evaluation_dataset_pads_to_divisor_with_ignore(tmp_path):
    from tests.helpers import write_pair

    write_pair(tmp_path, "val", "a", np.zeros((10, 13, 3), np.uint8), np.full((10, 13), 255, np.uint8))
    spec = spec_for(tmp_path)
    images, masks = next(iter(evaluation_dataset(find_pairs(tmp_path, "val"), spec, 2)))
    assert images.shape == (1, 16, 16, 3)
    assert (masks.numpy() == 1).sum() == 130 and (masks.numpy() == IGNORE_INDEX).sum() == 256 - 130


def test_steps_per_epoch():
    assert steps_per_epoch(10, 4, None) == 3
    assert steps_per_epoch(10, 4, 7) == 7
    assert steps_per_epoch(2, 4, None) == 1


def test_disk_cache_streams_the_same_examples_in_a_seeded_order(stripes, tmp_path):
    spec = spec_for(stripes, crop=None, batch_size=1, cache="disk", augment=AugmentConfig(flip=False, rotate90=False))
    pairs = find_pairs(stripes, "train")
    first = [m.numpy() for _, m in training_dataset(pairs, spec, tmp_path / "c1").take(len(pairs))]
    again = [m.numpy() for _, m in training_dataset(pairs, spec, tmp_path / "c2").take(len(pairs))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # one pass holds every training mask exactly once
    expected = sorted((np.asarray(Image.open(p.mask)) > 127).tobytes() for p in pairs)
    assert sorted(m[0].astype(bool).tobytes() for m in first) == expected


WHOLE_SIZES = {"tall": (20, 12), "wide": (9, 26)}
"""Two image sizes, neither a multiple of 8; padded to (24, 16) and (16, 32), a batch of both to (24, 32)."""


def _write_two_sizes(root):
    from tests.helpers import write_pair

    rng = np.random.default_rng(5)
    for stem, (h, w) in WHOLE_SIZES.items():
        image = rng.integers(1, 255, (h, w, 3)).astype(np.uint8)  # no 0: padded pixels are told apart
        mask = np.where(rng.random((h, w)) < 0.3, 255, 0).astype(np.uint8)
        for split in ("train", "val"):
            write_pair(root, split, stem, image, mask)
    return root


def _originals(root, split):
    return {p.image.stem: (np.asarray(Image.open(p.image), np.float32), (np.asarray(Image.open(p.mask)) > 127))
            for p in find_pairs(root, split)}


def _check_whole_image_batch(images, masks, originals):
    """Each element is its original image at the top left, then image 0 and mask IGNORE_INDEX."""
    assert images.shape == (2, 24, 32, 3) and masks.shape == (2, 24, 32)  # multiples of 8
    seen = set()
    for image, mask in zip(images.numpy(), masks.numpy()):
        stem = next(s for s, (h, w) in WHOLE_SIZES.items() if (mask != IGNORE_INDEX).sum() == h * w)
        h, w = WHOLE_SIZES[stem]
        original_image, original_mask = originals[stem]
        assert np.array_equal(image[:h, :w], original_image) and np.array_equal(mask[:h, :w], original_mask)
        padded = np.ones(mask.shape, bool)
        padded[:h, :w] = False
        assert (mask[padded] == IGNORE_INDEX).all() and (image[padded] == 0).all()
        seen.add(stem)
    assert seen == set(WHOLE_SIZES)


def test_whole_images_of_two_sizes_are_padded_per_batch_to_a_multiple(tmp_path):
    root = _write_two_sizes(tmp_path)
    spec = spec_for(root, crop=None, batch_size=2, augment=AugmentConfig(flip=False, rotate90=False))
    images, masks = next(iter(training_dataset(find_pairs(root, "train"), spec)))
    _check_whole_image_batch(images, masks, _originals(root, "train"))
    images, masks = next(iter(evaluation_dataset(find_pairs(root, "val"), spec, 2)))
    _check_whole_image_batch(images, masks, _originals(root, "val"))


def test_padding_of_whole_image_batches_does_not_change_the_loss(tmp_path):
    from segtrain.losses import build_loss

    root = _write_two_sizes(tmp_path)
    spec = spec_for(root, crop=None, batch_size=2, augment=AugmentConfig(flip=False, rotate90=False))
    _, masks = next(iter(training_dataset(find_pairs(root, "train"), spec)))
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (*masks.shape, 1)).astype(np.float32)
    labels = masks.numpy()
    valid = labels != IGNORE_INDEX
    logits[~valid] = 50.0  # padded pixels would weigh heavily if they counted
    assert valid.sum() == sum(h * w for h, w in WHOLE_SIZES.values())

    # cross-entropy: the mean over the valid pixels, computed here with numpy
    cross_entropy = build_loss(loss_config({"terms": [{"name": "cross_entropy"}]}, ["bg", "stripe"]), ["bg", "stripe"])
    z, y = logits[..., 0][valid].astype(np.float64), labels[valid]
    log_sigmoid = -np.logaddexp(0, -z)
    log_one_minus = -np.logaddexp(0, z)
    expected = -np.mean(np.where(y == 1, log_sigmoid, log_one_minus))
    assert float(cross_entropy(masks, logits)) == pytest.approx(expected, rel=1e-5)

    # the configured sum with a pooled overlap term: the same as over the valid pixels alone, unpadded
    combined = build_loss(loss_config({"terms": [{"name": "cross_entropy"}, {"name": "jaccard", "weight": 0.5}]},
                                     ["bg", "stripe"]), ["bg", "stripe"])
    only_valid = float(combined(tf.constant(y[None, None, :].astype(np.int32)),
                                tf.constant(logits[valid][None, None, :, :])))
    assert float(combined(masks, logits)) == pytest.approx(only_valid, rel=1e-5)
