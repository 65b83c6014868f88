"""tf.data pipelines: parallel decode, cache, shuffle, crop and augment image and mask in one call.

Training randomness is stateless and keyed by (seed, element index), and the shuffle
order is fixed by the seed, so a resumed run that skips the elements it has already
seen sees exactly the same batches as an uninterrupted one. Class-aware sampling
(`data.sampling`) is drawn the same way (`sampled_centre`): each element carries the
index of its image, which selects that image's recorded class coordinates from a constant
table (`segtrain.data.sampling.ClassLocations`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tensorflow as tf

from segtrain.config import AugmentConfig, DataConfig, ElasticConfig
from segtrain.data import augment as aug
from segtrain.data.discovery import Pair
from segtrain.data.images import read_image
from segtrain.data.masks import MaskMapping
from segtrain.data.sampling import ClassLocations
from segtrain.data.scan import load_mask
from segtrain.labels import IGNORE_INDEX

AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class DataSpec:
    """What the pipelines need besides the config."""

    data: DataConfig
    mapping: MaskMapping
    channels: int
    divisor: int
    seed: int = 0
    locations: Optional[ClassLocations] = None
    """Where the sampled classes lie in the training images (with data.sampling), in the order of the pairs."""


def _decode_fn(spec: DataSpec):
    def decode(image_path, mask_path):
        pair = Pair(Path(image_path.decode()), Path(mask_path.decode()))
        image = read_image(pair.image, spec.channels, spec.data.max_image_pixels)
        mask = load_mask(pair, spec.mapping, spec.data.max_image_pixels)
        return image, mask

    def tf_decode(image_path, mask_path, *image_index):
        image, mask = tf.numpy_function(decode, [image_path, mask_path], [tf.float32, tf.int32], stateful=False)
        image.set_shape([None, None, spec.channels])
        mask.set_shape([None, None])
        if spec.data.resize is not None:
            size = spec.data.resize
            image = tf.image.resize(image, size, method="bilinear")
            mask = tf.image.resize(mask[..., None], size, method="nearest")[..., 0]
        return (image, mask, *image_index)

    return tf_decode


def _file_dataset(pairs: list[Pair], with_index: bool = False) -> tf.data.Dataset:
    """(image path, mask path), and the pair's index in `pairs` when `with_index`."""
    images = [str(p.image) for p in pairs]
    masks = [str(p.mask) for p in pairs]
    if with_index:
        return tf.data.Dataset.from_tensor_slices((images, masks, tf.range(len(pairs), dtype=tf.int32)))
    return tf.data.Dataset.from_tensor_slices((images, masks))


def _pad_to_at_least(image, mask, height, width):
    """Pad (bottom/right) so both sides reach the crop; padded mask pixels are ignored."""
    shape = tf.shape(mask)
    pad_h = tf.maximum(height - shape[0], 0)
    pad_w = tf.maximum(width - shape[1], 0)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
    mask = tf.pad(mask, [[0, pad_h], [0, pad_w]], constant_values=IGNORE_INDEX)
    return image, mask


def augment(image, mask, seed, crop: Optional[int], flip: bool, rotate90: bool, centre=None,
            options: Optional[AugmentConfig] = None):
    """Random crop, flips and 90-degree turns of image and mask by one call, from a stateless seed.

    `centre` (class-aware sampling, with a crop): `(centred, row, col)` tensors from `sampled_centre`; when
    `centred` is true the crop is centred on (row, col), clipped to the image, instead of placed uniformly.

    `options` (`data.augment`) adds the transforms of `segtrain.data.augment`, each with its own seed folded in
    from `seed`, in this order: a random scale of the whole image (the sampled centre follows it); the crop,
    flips and turns; a rotation and an elastic deformation (image and mask); brightness, contrast, gamma, blur
    and noise (image only). With a crop, rotation and elastic deformation act on a window `margin` pixels wider
    on each side, placed as the crop would be (the image's edge pixels repeated and the mask ignored beyond the
    image), and the crop is its centre: the crop's corners come from real pixels wherever the image has them, and
    only what lies beyond the image is ignored. With every new option off (the default) the output is bit for bit
    that of `augment` without `options`.
    """
    seeds = tf.random.experimental.stateless_split(seed, 5)
    options = options or AugmentConfig(flip=flip, rotate90=rotate90)
    if options.scale is not None:
        before = tf.shape(mask)
        image, mask = aug.random_scale(image, mask, aug.stream_seed(seed, aug.SCALE_STREAM), *options.scale)
        if centre is not None:
            centred, row, col = centre
            ratio = tf.cast(tf.shape(mask), tf.float32) / tf.cast(before, tf.float32)
            row = tf.cast(tf.floor((tf.cast(row, tf.float32) + 0.5) * ratio[0]), tf.int32)
            col = tf.cast(tf.floor((tf.cast(col, tf.float32) + 0.5) * ratio[1]), tf.int32)
            centre = (centred, row, col)
    margin = 0 if crop is None else warp_margin(crop, options)
    if crop is not None:
        window = crop + 2 * margin
        if margin:
            image, mask = _pad_edges(image, mask, margin)
        image, mask = _pad_to_at_least(image, mask, window, window)
        shape = tf.shape(mask)
        # the window's offsets over the padded image are the crop's over the image: same draws, same places
        top = tf.random.stateless_uniform([], seeds[0], 0, shape[0] - window + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([], seeds[1], 0, shape[1] - window + 1, dtype=tf.int32)
        if centre is not None:
            centred, row, col = centre
            top = tf.where(centred, tf.clip_by_value(row - crop // 2, 0, shape[0] - window), top)
            left = tf.where(centred, tf.clip_by_value(col - crop // 2, 0, shape[1] - window), left)
        image = image[top : top + window, left : left + window]
        mask = mask[top : top + window, left : left + window]
    stacked = tf.concat([image, tf.cast(mask[..., None], image.dtype)], axis=-1)
    if flip:
        stacked = tf.image.stateless_random_flip_left_right(stacked, seeds[2])
        stacked = tf.image.stateless_random_flip_up_down(stacked, seeds[3])
    if rotate90 and crop is not None:
        turns = tf.random.stateless_uniform([], seeds[4], 0, 4, dtype=tf.int32)
        stacked = tf.image.rot90(stacked, turns)
    image = stacked[..., :-1]
    mask = tf.cast(tf.round(stacked[..., -1]), tf.int32)
    image, mask = _warp(image, mask, seed, options)
    if margin:
        image = image[margin : margin + crop, margin : margin + crop]
        mask = mask[margin : margin + crop, margin : margin + crop]
    image = _photometric(image, seed, options)
    if crop is not None:
        image = tf.ensure_shape(image, [crop, crop, None])
        mask = tf.ensure_shape(mask, [crop, crop])
    return image, mask


def warp_margin(crop: int, options: AugmentConfig) -> int:
    """Pixels around a crop that its rotation (up to `options.rotate` degrees) and elastic deformation (4 alpha)
    read from: 0 without them."""
    margin = 0
    if options.rotate > 0:
        angle = math.radians(min(options.rotate, 45.0))  # the half-diagonal reach grows up to 45 degrees
        margin += math.ceil(crop * (math.cos(angle) + math.sin(angle) - 1.0) / 2.0) + 1
    elastic = _elastic(options)
    if elastic is not None:
        margin += math.ceil(4.0 * elastic.alpha) + 1
    return margin


def _elastic(options: AugmentConfig) -> Optional[ElasticConfig]:
    if options.elastic is True:
        return ElasticConfig()
    return options.elastic or None


def _pad_edges(image, mask, margin: int):
    """`margin` pixels on every side: the image's edge pixels repeated, the mask ignored."""
    shape = tf.shape(mask)
    rows = tf.clip_by_value(tf.range(-margin, shape[0] + margin), 0, shape[0] - 1)
    cols = tf.clip_by_value(tf.range(-margin, shape[1] + margin), 0, shape[1] - 1)
    image = tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)
    mask = tf.pad(mask, [[margin, margin], [margin, margin]], constant_values=IGNORE_INDEX)
    return image, mask


def _warp(image, mask, seed, options: AugmentConfig):
    """Rotation, then elastic deformation, where configured."""
    if options.rotate > 0:
        image, mask = aug.random_rotate(image, mask, aug.stream_seed(seed, aug.ROTATE_STREAM), options.rotate)
    elastic = _elastic(options)
    if elastic is not None:
        image, mask = aug.random_elastic(image, mask, aug.stream_seed(seed, aug.ELASTIC_STREAM), elastic.alpha,
                                         elastic.sigma)
    return image, mask


def _photometric(image, seed, options: AugmentConfig):
    """Brightness, contrast, gamma, blur and noise, in this order, where configured (image only)."""
    if options.brightness > 0:
        image = aug.random_brightness(image, aug.stream_seed(seed, aug.BRIGHTNESS_STREAM), options.brightness)
    if options.contrast > 0:
        image = aug.random_contrast(image, aug.stream_seed(seed, aug.CONTRAST_STREAM), options.contrast)
    if options.gamma > 0:
        image = aug.random_gamma(image, aug.stream_seed(seed, aug.GAMMA_STREAM), options.gamma)
    if options.blur is not None and options.blur[1] > 0:
        image = aug.random_blur(image, aug.stream_seed(seed, aug.BLUR_STREAM), *options.blur)
    if options.noise > 0:
        image = aug.random_noise(image, aug.stream_seed(seed, aug.NOISE_STREAM), options.noise)
    return image


class SamplingTable:
    """Class-aware sampling as constant tensors: each image's recorded coordinates per sampled class, their
    counts, and the cumulative shares."""

    def __init__(self, locations: ClassLocations):
        self.points = tf.constant(locations.points, tf.int32)  # (images, sampled classes, max points, 2)
        self.counts = tf.constant(locations.counts, tf.int32)  # (images, sampled classes)
        self.cumulative = tf.constant(list(_cumulative(locations.shares)), tf.float64)
        self.num_sampled = len(locations.classes)


def _cumulative(shares):
    total = 0.0
    for share in shares:
        total += share
        yield total


SAMPLING_STREAM = 1
"""fold_in key of the sampling draw: its own random stream beside the crop/flip/turn seeds of `augment`."""


def sampled_centre(seed, image_index, table: SamplingTable):
    """The class-aware draw of one element: `(centred, row, col)`.

    A stateless uniform u in [0, 1) picks sampled class j when `cum[j-1] <= u < cum[j]` (cum: the cumulative
    shares), or a uniform crop when u >= the sum of the shares; a second stateless draw picks one of the
    image's recorded coordinates of that class. `centred` is false for a uniform crop and for an image that
    holds none of the drawn class (the fallback). A pure function of (seed, image index) and the table.
    """
    key = tf.cast(tf.random.experimental.stateless_fold_in(seed, SAMPLING_STREAM), tf.int64)
    seeds = tf.random.experimental.stateless_split(key, 2)
    u = tf.random.stateless_uniform([], seeds[0], dtype=tf.float64)
    slot = tf.reduce_sum(tf.cast(u >= table.cumulative, tf.int32))  # == num_sampled: uniform
    clamped = tf.minimum(slot, table.num_sampled - 1)
    count = table.counts[image_index, clamped]
    centred = tf.logical_and(slot < table.num_sampled, count > 0)
    k = tf.random.stateless_uniform([], seeds[1], 0, tf.maximum(count, 1), dtype=tf.int32)
    point = table.points[image_index, clamped, k]
    return centred, point[0], point[1]


def steps_per_epoch(num_examples: int, batch_size: int, configured: Optional[int]) -> int:
    """Configured steps, or one pass over the training set (the last batch filled from the next pass)."""
    return configured or max(1, math.ceil(num_examples / batch_size))


def training_dataset(pairs: list[Pair], spec: DataSpec, cache_dir: Optional[Path] = None,
                     start_element: int = 0) -> tf.data.Dataset:
    """An endless dataset of augmented (image, mask) batches; `start_element` skips what was already seen."""
    data = spec.data
    decode = _decode_fn(spec)
    table = None if spec.locations is None else SamplingTable(spec.locations)
    if table is not None and spec.locations.num_images != len(pairs):
        raise ValueError(f"class locations of {spec.locations.num_images} images for {len(pairs)} training pairs")
    ds = _file_dataset(pairs, with_index=table is not None)
    if data.cache == "none":
        ds = ds.shuffle(len(pairs), seed=spec.seed, reshuffle_each_iteration=True).repeat()
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    elif data.cache == "memory":
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True).cache()
        ds = ds.shuffle(len(pairs), seed=spec.seed, reshuffle_each_iteration=True).repeat()
    else:
        # The cache file is written in a seeded random order, so a small buffer of decoded
        # images after it still mixes the whole set while memory stays flat.
        cache_dir.mkdir(parents=True, exist_ok=True)
        ds = ds.shuffle(len(pairs), seed=spec.seed, reshuffle_each_iteration=False)
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True).cache(str(cache_dir / "train"))
        buffer = min(len(pairs), data.shuffle_buffer)
        ds = ds.shuffle(buffer, seed=spec.seed, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().skip(start_element)
    crop, flip, rotate90 = data.crop, data.augment.flip, data.augment.rotate90
    base_seed = tf.constant([spec.seed, 0], dtype=tf.int64)

    def augment_indexed(index, example):
        image, mask, *image_index = example
        seed = base_seed + tf.stack([tf.constant(0, tf.int64), index])
        centre = None if table is None else sampled_centre(seed, image_index[0], table)
        return augment(image, mask, seed, crop, flip, rotate90, centre, data.augment)

    ds = ds.map(augment_indexed, num_parallel_calls=AUTOTUNE, deterministic=True)
    if crop is None:  # whole images, of any sizes
        ds = whole_image_batches(ds, spec, data.batch_size, drop_remainder=True)
    else:
        ds = ds.batch(data.batch_size, drop_remainder=True)
    return ds.prefetch(AUTOTUNE)


def _pad_to_multiple(image, mask, divisor: int):
    shape = tf.shape(mask)
    height = (shape[0] + divisor - 1) // divisor * divisor
    width = (shape[1] + divisor - 1) // divisor * divisor
    return _pad_to_at_least(image, mask, height, width)


def whole_image_batches(ds: tf.data.Dataset, spec: DataSpec, batch_size: int,
                        drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of (image, mask) pairs of any sizes, the one padding of whole images (training and evaluation).

    Each pair is padded (bottom/right) to a multiple of 2**depth, then the batch to its largest
    pair, itself a multiple, so the U-Net accepts every batch. Padded mask pixels are
    IGNORE_INDEX and count in no loss and no metric; padded image pixels are 0.
    """
    ds = ds.map(lambda image, mask: _pad_to_multiple(image, mask, spec.divisor), num_parallel_calls=AUTOTUNE,
                deterministic=True)
    return ds.padded_batch(
        batch_size,
        padded_shapes=([None, None, spec.channels], [None, None]),
        padding_values=(0.0, IGNORE_INDEX),
        drop_remainder=drop_remainder,
    )


def evaluation_dataset(pairs: list[Pair], spec: DataSpec, batch_size: int) -> tf.data.Dataset:
    """Whole images padded to a multiple of 2**depth (padding ignored), in order, cached in memory."""
    decode = _decode_fn(spec)
    ds = _file_dataset(pairs).map(decode, num_parallel_calls=AUTOTUNE, deterministic=True).cache()
    return whole_image_batches(ds, spec, batch_size).prefetch(AUTOTUNE)
