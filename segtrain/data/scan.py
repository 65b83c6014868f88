"""One streaming pass over a split: decodes and checks every pair, and counts class pixels."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from tqdm import tqdm

from segtrain.class_weights import ClassCounter
from segtrain.config import DataConfig
from segtrain.data.discovery import Pair, find_pairs
from segtrain.data.images import image_channels, image_sample_type, image_size, read_image, read_raw_mask
from segtrain.data.masks import MaskMapping, UnmappedTally
from segtrain.errors import DataError


def load_mask(pair: Pair, mapping: MaskMapping, max_pixels: int) -> np.ndarray:
    """The class-index mask of a pair (int32 H x W), checked against the image's size; a value (colour) the config
    does not cover raises DataError naming the file."""
    return mapping.to_classes(_raw_mask(pair, mapping, max_pixels), pair.mask)


def _raw_mask(pair: Pair, mapping: MaskMapping, max_pixels: int) -> np.ndarray:
    raw = read_raw_mask(pair.mask, mapping.rgb, max_pixels)
    height, width = image_size(pair.image)
    if raw.shape[:2] != (height, width):
        raise DataError(
            f"{pair.mask}: mask is {raw.shape[1]}x{raw.shape[0]} but its image {pair.image.name} is "
            f"{width}x{height} (width x height). Masks must match their images pixel for pixel."
        )
    return raw


def labelled_images(pairs: list[Pair], mapping: MaskMapping, channels: int, max_pixels: int, desc: str):
    """(pair, image H x W x channels, class-index mask) of every pair in order, with a progress bar: the loop that
    evaluation, calibration and tuning run over a labelled split."""
    for pair in tqdm(pairs, desc=desc, unit="image", leave=False, disable=None):
        yield pair, read_image(pair.image, channels, max_pixels), load_mask(pair, mapping, max_pixels)


def check_pair(pair: Pair, mapping: MaskMapping, channels: int, max_pixels: int,
               reference: Optional[Path] = None) -> np.ndarray:
    """Decode the image fully (a truncated file fails here, not mid-training) and return the class mask.

    With `reference` (the image the data set's channels were read from), an image with another
    channel count is refused, naming both files.
    """
    classes, _, unmapped = _check_and_sample(pair, mapping, channels, max_pixels, reference)
    if unmapped:
        mapping.to_classes(_raw_mask(pair, mapping, max_pixels), pair.mask)  # raises, naming the file
    return classes


def _channels_text(channels: int) -> str:
    return {1: "1 channel (grayscale)", 3: "3 channels (colour)"}.get(channels, f"{channels} channels")


def _check_and_sample(pair: Pair, mapping: MaskMapping, channels: int, max_pixels: int,
                      reference: Optional[Path] = None, pixels=None, index: int = 0):
    """`check_pair`'s class mask (uncovered pixels ignored), the image's pixel sample when `pixels` (a PixelSampler)
    is given, and {value or colour: pixels} of the mask's values the config does not cover."""
    if reference is not None and image_channels(pair.image) != channels:
        raise DataError(
            f"{pair.image}: {_channels_text(image_channels(pair.image))}, but {reference} has "
            f"{_channels_text(channels)}. "
            "Every image of a data set needs the same channels: convert the odd ones (e.g. all to RGB) first."
        )
    image = read_image(pair.image, channels, max_pixels)
    sample = None if pixels is None else pixels.sample(image, index)
    classes, unmapped = mapping.classes_and_unmapped(_raw_mask(pair, mapping, max_pixels), pair.mask)
    return classes, sample, unmapped


def scan_pairs(pairs: list[Pair], mapping: MaskMapping, channels: int, max_pixels: int, counter=None,
               description: Optional[str] = None, reference: Optional[Path] = None, pixels=None) -> None:
    """Check all pairs (readable, same size, mask values covered, and the channels of `reference` when it is
    given); feed each class mask to `counter`, and each image's pixel sample to `pixels` (default
    `counter.pixels`; a `segtrain.data.normalization.PixelSampler`, for data.normalize: dataset), in file order.

    Files are decoded by a few threads (Pillow releases the GIL while decoding), in a
    bounded window, so memory does not grow with the data set; the first unreadable or mis-sized pair in
    file order is the one reported. Mask values (colours) the config does not cover are collected over every
    mask (counted as ignored meanwhile) and reported at the end in one DataError: each with its pixels and a file
    holding it (`segtrain.data.masks.unmapped_message`), so one run names them all.
    """
    workers = max(1, min(8, os.cpu_count() or 1))
    bar = tqdm(total=len(pairs), desc=description, unit="pair", leave=False,
               disable=True if description is None else None)
    if pixels is None:
        pixels = getattr(counter, "pixels", None)
    tally = UnmappedTally()

    def check(index: int):
        return _check_and_sample(pairs[index], mapping, channels, max_pixels, reference, pixels, index)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(pairs), 4 * workers):
            indices = range(start, min(len(pairs), start + 4 * workers))
            for index, (classes, sample, unmapped) in zip(indices, pool.map(check, indices)):
                tally.add(unmapped, pairs[index].mask)
                if counter is not None:
                    counter.update(classes)
                if pixels is not None:
                    pixels.add(sample)
                bar.update(1)
    bar.close()
    if tally:
        where = str(tally.first) if tally.files == 1 else _masks_folder(pairs)
        raise tally.error(mapping, where)


def _masks_folder(pairs: list[Pair]) -> str:
    """The folder of the pairs' masks (their common folder when they differ)."""
    folders = {str(p.mask.parent) for p in pairs}
    return folders.pop() if len(folders) == 1 else os.path.commonpath(sorted(folders))


class TrainingSet(NamedTuple):
    """The checked training split: its pairs, how its masks read, its images' channels and its class pixel counts."""

    pairs: list[Pair]
    mapping: MaskMapping
    channels: int
    counter: ClassCounter


def scan_training_set(data: DataConfig, description: Optional[str] = None,
                      pairs: Optional[list[Pair]] = None) -> TrainingSet:
    """Find the pairs of `data.train_split` (or take `pairs`: the training part under data.val_fraction), check
    every one and count its class pixels, in one pass.

    The channels are those of the first image (every image is read with them). `description`
    labels a progress bar; None shows none. With `data.sampling`, the same pass records where
    each sampled class lies (`counter.locations`, a `segtrain.data.sampling.ClassLocations`); with
    `data.normalize: dataset` it samples pixel values for the normalisation statistics (`counter.pixels`, a
    `segtrain.data.normalization.PixelSampler`); with `fixed` it samples them too, and adds a warning to
    `counter.warnings` when the images use little of the fixed scale (`fixed_scale_warning`).
    """
    from segtrain.data.normalization import PixelSampler
    from segtrain.data.sampling import new_locations

    pairs = find_pairs(data.root, data.train_split) if pairs is None else pairs
    mapping = MaskMapping(data.mask, data.classes)
    channels = image_channels(pairs[0].image)
    counter = ClassCounter(len(data.classes), new_locations(data))
    pixels = PixelSampler(len(pairs))
    if data.normalize == "dataset":
        counter.pixels = pixels
    scan_pairs(pairs, mapping, channels, data.max_image_pixels, counter, description, reference=pairs[0].image,
               pixels=pixels)
    if data.normalize == "fixed":
        warning = fixed_scale_warning(pixels, image_sample_type(pairs[0].image))
        if warning:
            counter.warnings.append(warning)
    return TrainingSet(pairs, mapping, channels, counter)


LOW_RANGE_HIGH = 64.0
"""data.normalize: fixed warns when the images' 99.5th percentile is below this, on the 0..255 scale ..."""
LOW_RANGE_SHARE = 0.25
"""... or, for samples of more than 8 bits, when their 0.5-99.5 percentile range covers less than this share of it."""


def _sample_bits(sample_type: str) -> int:
    digits = "".join(ch for ch in sample_type if ch.isdigit())
    return int(digits) if digits else 8


def fixed_scale_warning(pixels, sample_type: str) -> Optional[str]:
    """The warning of data.normalize: fixed for images that use little of the 0..255 scale they are read on (e.g.
    12-bit data in 16-bit files: 0..16), from the statistics pass's pixel sample (a PixelSampler), or None."""
    from segtrain.data.normalization import HIGH_PERCENTILE, LOW_PERCENTILE, normalization_stats

    if not pixels.samples:
        return None
    stats = normalization_stats(np.concatenate(pixels.samples, axis=0))
    low, high = float(min(stats["low"])), float(max(stats["high"]))
    share = max(0.0, high - low) / 255.0
    if not (high < LOW_RANGE_HIGH or (_sample_bits(sample_type) > 8 and share < LOW_RANGE_SHARE)):
        return None
    return (
        f"data.normalize: fixed maps the 0..255 scale images are read on to the model's input, but the training "
        f"images ({sample_type} samples) use only {low:.1f}..{high:.1f} of it ({100 * share:.0f}% of the scale; "
        f"the {LOW_PERCENTILE:g}-{HIGH_PERCENTILE:g} percentiles of {stats['pixels_sampled']} sampled pixels), "
        "so the model's input varies over a small part of its usual range (as with 12-bit data stored in 16-bit files, "
        "or dark images). Set data.normalize: dataset to scale by the training set's own percentiles instead."
    )
