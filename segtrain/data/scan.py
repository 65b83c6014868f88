"""One streaming pass over a split: checks every pair and counts class pixels."""

from __future__ import annotations

from typing import Optional

import numpy as np
from tqdm import tqdm

from segtrain.data.discovery import Pair
from segtrain.data.images import image_size, read_raw_mask
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


def scan_pairs(pairs: list[Pair], mapping: MaskMapping, max_pixels: int, counter=None,
               description: Optional[str] = None) -> None:
    """Check all pairs (readable, same size, mask values covered); feed each class mask to `counter`."""
    iterator = tqdm(pairs, desc=description, unit="mask", leave=False, disable=True if description is None else None)
    for pair in iterator:
        classes = load_mask(pair, mapping, max_pixels)
        if counter is not None:
            counter.update(classes)
