"""The raw-mask pass: each image's header and each mask's raw values, read once over a split (the fingerprint's
first pass), and `RawMasks`, what it found.

`read_raw_masks(pairs)` reads every image's size, channels and sample type from its header
(`segtrain.data.images`) and every mask *raw* (`read_raw_mask`, before any mapping: 8-bit, 16-bit, palette indices,
or RGB colours when a mask's channels differ) into one pixel count per raw value or colour. The mask encoding
(`encoding.py`) is decided from those counts.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from segtrain.data.discovery import Pair
from segtrain.data.images import DEFAULT_MAX_PIXELS, image_channels, image_sample_type, image_size, read_raw_mask
from segtrain.errors import DataError

MAX_COLOURS = 64
"""More distinct colours than this in RGB masks is no class palette (JPEG or anti-aliased masks)."""


@dataclass
class RawMasks:
    """The raw mask values of a split, before any mapping.

    `kind` is "values" (single-channel masks: 8-bit, 16-bit or palette indices) or "colours" (RGB masks whose channels
    differ); `counts` maps a raw value (int) or a colour ((r, g, b) tuple) to its pixels over the split.
    """

    kind: str
    bits: int
    counts: dict
    masks: int

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    def share(self, key) -> float:
        total = self.total
        return self.counts.get(key, 0) / total if total else 0.0

    def describe(self, key) -> str:
        return describe_raw(key)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "masks": self.masks, "pixels": self.total,
                "counts": {describe_raw(k): int(v) for k, v in sorted(self.counts.items())}}


def describe_raw(key) -> str:
    """A raw value as written in the config: 255, or [r, g, b]."""
    return f"[{key[0]}, {key[1]}, {key[2]}]" if isinstance(key, tuple) else str(key)


# ---------------------------------------------------------------------------- pass 1: headers and raw mask values


def _raw_mask(path: Path, max_pixels: int) -> np.ndarray:
    """A mask's raw values: H x W (values) or H x W x 3 (an RGB mask whose channels differ)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            colour = image.mode in ("RGB", "RGBA")
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the mask ({exc}). Replace or remove the corrupt file.") from None
    if colour:
        array = read_raw_mask(path, True, max_pixels)
        if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
            return array[..., 0]
        return array
    return read_raw_mask(path, False, max_pixels)


def _header_and_values(pair: Pair, max_pixels: int):
    height, width = image_size(pair.image)
    raw = _raw_mask(pair.mask, max_pixels)
    if raw.ndim == 3:
        code = (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
        keys, counts = np.unique(code, return_counts=True)
        values = {(int(k) >> 16, (int(k) >> 8) & 255, int(k) & 255): int(n) for k, n in zip(keys, counts)}
        bits = 8
    else:
        if raw.dtype == np.uint8:
            counts = np.bincount(raw.ravel(), minlength=256)
            values = {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
        else:
            keys, counts = np.unique(raw, return_counts=True)
            values = {int(k): int(n) for k, n in zip(keys, counts)}
        bits = 16 if raw.dtype == np.uint16 else 8
    return (height, width), image_channels(pair.image), image_sample_type(pair.image), raw.ndim == 3, bits, values


def read_raw_masks(pairs: list[Pair], max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True):
    """(RawMasks, heights, widths, channels of each image, sample-type counts) of a split's pairs (pass 1)."""
    gray: Counter = Counter()
    colours: Counter = Counter()
    heights, widths, channels, types = [], [], [], Counter()
    bits = 8
    workers = max(1, min(8, os.cpu_count() or 1))
    bar = tqdm(total=len(pairs), desc="mask values", unit="mask", leave=False, disable=None if progress else True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (height, width), chans, sample_type, colour, mask_bits, values in pool.map(
                lambda p: _header_and_values(p, max_pixels), pairs):
            heights.append(height)
            widths.append(width)
            channels.append(chans)
            types[sample_type] += 1
            bits = max(bits, mask_bits)
            (colours if colour else gray).update(values)
            if len(colours) > 4096:
                raise DataError(f"{pairs[0].mask.parent}: the RGB masks hold more than 4096 colours, which is no "
                                "class palette (JPEG or anti-aliased masks?). Save masks as PNG class values or with "
                                "one exact colour per class.")
            bar.update(1)
    bar.close()
    if colours:  # some masks are in colour: every mask is read as colours (a gray mask's value v is (v, v, v))
        for value, n in gray.items():
            colours[(value, value, value)] += n
        raw = RawMasks("colours", 8, dict(colours), len(pairs))
    else:
        raw = RawMasks("values", bits, dict(gray), len(pairs))
    return raw, heights, widths, channels, types

