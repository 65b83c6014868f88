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
from segtrain.data.images import image_channels, image_size, read_image, read_raw_mask
from segtrain.data.masks import MaskMapping
from segtrain.errors import DataError


def load_mask(pair: Pair, mapping: MaskMapping, max_pixels: int) -> np.ndarray:
    """The class-index mask of a pair (int32 H x W), checked against the image's size."""
    raw = read_raw_mask(pair.mask, mapping.rgb, max_pixels)
    height, width = image_size(pair.image)
    if raw.shape[:2] != (height, width):
        raise DataError(
            f"{pair.mask}: mask is {raw.shape[1]}x{raw.shape[0]} but its image {pair.image.name} is "
            f"{width}x{height} (width x height). Masks must match their images pixel for pixel."
        )
    return mapping.to_classes(raw, pair.mask)


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
    return _check_and_sample(pair, mapping, channels, max_pixels, reference)[0]


def _channels_text(channels: int) -> str:
    return {1: "1 channel (grayscale)", 3: "3 channels (colour)"}.get(channels, f"{channels} channels")


def _check_and_sample(pair: Pair, mapping: MaskMapping, channels: int, max_pixels: int,
                      reference: Optional[Path] = None, pixels=None, index: int = 0):
    """`check_pair`'s class mask, and the image's pixel sample when `pixels` (a PixelSampler) is given."""
    if reference is not None and image_channels(pair.image) != channels:
        raise DataError(
            f"{pair.image}: {_channels_text(image_channels(pair.image))}, but {reference} has "
            f"{_channels_text(channels)}. "
            "Every image of a data set needs the same channels: convert the odd ones (e.g. all to RGB) first."
        )
    image = read_image(pair.image, channels, max_pixels)
    sample = None if pixels is None else pixels.sample(image, index)
    return load_mask(pair, mapping, max_pixels), sample


def scan_pairs(pairs: list[Pair], mapping: MaskMapping, channels: int, max_pixels: int, counter=None,
               description: Optional[str] = None, reference: Optional[Path] = None) -> None:
    """Check all pairs (readable, same size, mask values covered, and the channels of `reference` when it is
    given); feed each class mask to `counter`, and each image's pixel sample to `counter.pixels` when it is set
    (a `segtrain.data.normalization.PixelSampler`, for data.normalize: dataset), in file order.

    Files are decoded by a few threads (Pillow releases the GIL while decoding), in a
    bounded window, so memory does not grow with the data set; the first bad pair in
    file order is the one reported.
    """
    workers = max(1, min(8, os.cpu_count() or 1))
    bar = tqdm(total=len(pairs), desc=description, unit="pair", leave=False,
               disable=True if description is None else None)
    pixels = getattr(counter, "pixels", None)

    def check(index: int):
        return _check_and_sample(pairs[index], mapping, channels, max_pixels, reference, pixels, index)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(pairs), 4 * workers):
            for classes, sample in pool.map(check, range(start, min(len(pairs), start + 4 * workers))):
                if counter is not None:
                    counter.update(classes)
                if pixels is not None:
                    pixels.add(sample)
                bar.update(1)
    bar.close()


class TrainingSet(NamedTuple):
    """The checked training split: its pairs, how its masks read, its images' channels and its class pixel counts."""

    pairs: list[Pair]
    mapping: MaskMapping
    channels: int
    counter: ClassCounter


def scan_training_set(data: DataConfig, description: Optional[str] = None) -> TrainingSet:
    """Find the pairs of `data.train_split`, check every one and count its class pixels, in one pass.

    The channels are those of the first image (every image is read with them). `description`
    labels a progress bar; None shows none. With `data.sampling`, the same pass records where
    each sampled class lies (`counter.locations`, a `segtrain.data.sampling.ClassLocations`); with
    `data.normalize: dataset` it samples pixel values for the normalisation statistics (`counter.pixels`, a
    `segtrain.data.normalization.PixelSampler`).
    """
    from segtrain.data.sampling import new_locations

    pairs = find_pairs(data.root, data.train_split)
    mapping = MaskMapping(data.mask, data.classes)
    channels = image_channels(pairs[0].image)
    counter = ClassCounter(len(data.classes), new_locations(data))
    if data.normalize == "dataset":
        from segtrain.data.normalization import PixelSampler

        counter.pixels = PixelSampler(len(pairs))
    scan_pairs(pairs, mapping, channels, data.max_image_pixels, counter, description, reference=pairs[0].image)
    return TrainingSet(pairs, mapping, channels, counter)
