"""The fingerprint of a data set: what the plan's rules need to know about it, read in one pass over the split.

`fingerprint(root)` reads `ROOT/train` with segtrain's own readers:

1. **Headers and raw mask values** (`raw.read_raw_masks`): each image's size, channels and sample type from its
   header, and each mask read *raw* (`read_raw_mask`, before any mapping: 8-bit, 16-bit, palette indices, or RGB
   colours when a mask's channels differ) into one pixel count per raw value or colour. Masks are small; this is
   the only part that reads them twice.
2. The **mask encoding** is decided from those raw values (`encoding.ignore_values`, `encoding.mask_encoding`,
   `encoding.class_names`): the class statistics below are about classes, not raw values.
3. **The statistics pass** (`segtrain.data.scan.scan_pairs`, with its progress bar: every image decoded, every mask
   mapped to classes) feeds each class mask to a `_ClassStatistics` and each image's seeded pixel sample to a
   `segtrain.data.normalization.PixelSampler` (the very sample `data.normalize: dataset` uses; at most 2 million
   pixels, so memory stays flat). Per class:

```
pixels, share            labelled pixels of the class / all labelled (not ignored) pixels
images                   images holding at least one pixel of the class
objects                  8-connected components (scipy.ndimage.label), counted over the images
object area              median / p90 / max pixels per object
object width             the diameter of the largest disc inside an object, 2 d_max - 1 (d: below), per object;
                         `width_p90`: 90% of the class's pixels lie in objects at most this wide (area-weighted)
thickness                2 d - 1 at the ridge pixels of the class (local maxima of d): median and p95
                         (a line 3 px wide has d = 2 on its centre line: thickness 3; even widths read 1 less)
mean_row                 mean row of the class's pixels, 0 (top) .. 1 (bottom)
crop_presence[s]         P(a uniformly placed s x s crop holds a pixel of the class), averaged over the images
```
d is the distance to the nearest class boundary plus one (`scipy.ndimage.distance_transform_edt` of the
non-boundary pixels, one transform per image for every class; a boundary pixel has d = 1). Crop presence is computed
on a grid coarsened by `_block` (4 x 4 px cells from 256 px images on; a cell holds the class when any of its pixels
does) for the sides in `CROP_SIZES`; `crop_presence_at` interpolates between them. Distributions are kept as
fixed-size histograms, so memory does not grow with the data set.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from segtrain.data.discovery import find_pairs
from segtrain.data.images import DEFAULT_MAX_PIXELS, image_channels, image_size
from segtrain.errors import DataError
from segtrain.labels import IGNORE_INDEX
from segtrain.planning.encoding import Decision, class_names, ignore_values, mask_encoding, mask_section
from segtrain.planning.raw import RawMasks, read_raw_masks

CROP_SIZES = (32, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 1024)
"""Crop sides at which the chance that a random crop holds a class is measured."""
_WIDTH_BINS = 4096
"""Object widths and thicknesses are counted in whole pixels up to this (larger ones in the last bin)."""
_AREA_BINS_PER_OCTAVE = 8


# ---------------------------------------------------------------------------- what the fingerprint holds


@dataclass
class ClassStats:
    """One class's statistics over the split (module doc)."""

    name: str
    index: int
    pixels: int = 0
    share: float = 0.0
    images: int = 0
    image_pixels: int = 0
    """Pixels of the images holding the class (for median-frequency weights)."""
    objects: int = 0
    area_median: float = 0.0
    area_p90: float = 0.0
    area_max: int = 0
    width_median: float = 0.0
    width_p90: float = 0.0
    """Area-weighted: 90% of the class's pixels lie in objects at most this wide."""
    width_max: int = 0
    thickness_median: float = 0.0
    thickness_p95: float = 0.0
    mean_row: float = 0.5
    crop_presence: dict = field(default_factory=dict)
    """Crop side -> P(a random crop of that side holds the class)."""

    def crop_presence_at(self, side: int) -> float:
        """P(a random side x side crop holds the class), interpolated linearly between the measured sides."""
        sides = sorted(int(s) for s in self.crop_presence)
        if not sides:
            return 0.0
        values = [self.crop_presence[s] if s in self.crop_presence else self.crop_presence[str(s)] for s in sides]
        return float(np.interp(side, sides, values))


@dataclass
class Fingerprint:
    """What `fingerprint` found (module doc); `to_dict` is JSON-serialisable."""

    root: str
    split: str
    pairs: int
    val_split: Optional[str]
    """"val" when ROOT/val holds pairs, else None."""
    val_pairs: int
    heights: list
    widths: list
    channels: int
    sample_types: dict
    intensity: dict
    """The pixel sample's statistics per channel on the 0..255 scale (`normalization_stats`: low = p0.5,
    high = p99.5, mean, std)."""
    raw: RawMasks
    ignore: Decision
    """The raw values ignored (given by --ignore, or void-like)."""
    encoding: Decision
    """The mask encoding (an encoding.Encoding)."""
    names: Decision
    """The class names."""
    classes: list
    """ClassStats per class, in class-index order."""
    labelled_pixels: int
    ignored_pixels: int
    train_pixels: int
    val_pixel_count: int
    seconds: float = 0.0

    @property
    def median_height(self) -> int:
        return int(np.median(self.heights))

    @property
    def median_width(self) -> int:
        return int(np.median(self.widths))

    @property
    def median_side(self) -> int:
        """The smaller side of the median image."""
        return min(self.median_height, self.median_width)

    @property
    def sample_type(self) -> str:
        """The most common sample type of the images."""
        return Counter(self.sample_types).most_common(1)[0][0]

    @property
    def foreground(self) -> list:
        """ClassStats of every class but class 0."""
        return self.classes[1:]

    def to_dict(self) -> dict:
        out = {
            "root": self.root, "split": self.split, "pairs": self.pairs, "val_split": self.val_split,
            "val_pairs": self.val_pairs,
            "images": {"median_height": self.median_height, "median_width": self.median_width,
                       "min_height": int(min(self.heights)), "min_width": int(min(self.widths)),
                       "max_height": int(max(self.heights)), "max_width": int(max(self.widths)),
                       "channels": self.channels, "sample_types": dict(self.sample_types)},
            "intensity": self.intensity,
            "raw_masks": self.raw.to_dict(),
            "ignore": _decision_dict(self.ignore),
            "encoding": _decision_dict(self.encoding),
            "names": _decision_dict(self.names),
            "labelled_pixels": self.labelled_pixels, "ignored_pixels": self.ignored_pixels,
            "train_pixels": self.train_pixels, "val_pixels": self.val_pixel_count,
            "classes": [dataclasses.asdict(c) for c in self.classes],
            "seconds": round(self.seconds, 2),
        }
        for entry in out["classes"]:
            entry["crop_presence"] = {str(k): round(float(v), 4) for k, v in entry["crop_presence"].items()}
        return out


def _decision_dict(decision) -> dict:
    value = decision.value
    if dataclasses.is_dataclass(value):
        value = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    return {"value": _jsonable(value), "reason": decision.reason, "notes": list(decision.notes)}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------- pass 2: class statistics


def _block(height: int, width: int) -> int:
    """Side of the coarse cells crop presence is computed on."""
    side = min(height, width)
    return 4 if side >= 256 else 2 if side >= 128 else 1


def _quantile_from_histogram(counts: np.ndarray, q: float, centres: np.ndarray) -> float:
    total = counts.sum()
    if total <= 0:
        return 0.0
    index = int(np.searchsorted(np.cumsum(counts), q * total))
    return float(centres[min(index, len(centres) - 1)])


class _ClassStatistics:
    """The `counter` the statistics pass (`scan_pairs`) feeds each class mask to, in file order (module doc)."""

    def __init__(self, names: list[str], pixels=None):
        k = len(names)
        self.names = names
        self.pixels = pixels
        """A PixelSampler: scan_pairs gives it each image's pixel sample."""
        self.counts = np.zeros(k, np.int64)
        self.image_pixels = np.zeros(k, np.int64)
        self.images = np.zeros(k, np.int64)
        self.ignored = 0
        self.objects = np.zeros(k, np.int64)
        self.area_bins = np.zeros((k, 40 * _AREA_BINS_PER_OCTAVE), np.int64)
        self.area_max = np.zeros(k, np.int64)
        self.width_counts = np.zeros((k, _WIDTH_BINS), np.int64)
        self.width_area = np.zeros((k, _WIDTH_BINS), np.int64)
        self.thickness = np.zeros((k, _WIDTH_BINS), np.int64)
        self.row_sum = np.zeros(k, np.float64)
        self.presence_sum = np.zeros((k, len(CROP_SIZES)), np.float64)
        self.num_images = 0

    def update(self, mask: np.ndarray) -> None:
        mask = np.asarray(mask)
        height, width = mask.shape
        k = len(self.names)
        valid = mask != IGNORE_INDEX
        counts = np.bincount(mask[valid].ravel(), minlength=k)[:k]
        self.ignored += int(mask.size - valid.sum())
        self.counts += counts
        self.image_pixels[counts > 0] += int(valid.sum())
        self.images += counts > 0
        self.num_images += 1
        depth = _boundary_depth(mask)
        ridge = depth >= ndimage.maximum_filter(depth, size=3, mode="nearest")
        row_weights = np.arange(height) / max(1, height - 1)
        coarse = _coarse_classes(mask, k, _block(height, width))
        present = np.flatnonzero(counts)
        objects = np.zeros(mask.shape, np.intp)  # every class's 8-connected objects, numbered on from the last class's
        first, numbered = {}, 0
        for c in present:
            member = mask == c
            labels, n = ndimage.label(member, structure=np.ones((3, 3), bool))
            first[c] = (numbered, n)
            objects[member] = labels[member] + numbered
            numbered += n
            self.row_sum[c] += float(member.sum(axis=1) @ row_weights)
            thick = np.clip(np.rint(2 * depth[ridge & member] - 1), 1, _WIDTH_BINS - 1).astype(np.int64)
            self.thickness[c] += np.bincount(thick, minlength=_WIDTH_BINS)
            self.presence_sum[c] += _crop_presence(coarse[..., c], _block(height, width))
        areas_all = np.bincount(objects.ravel())
        inside_all = np.zeros(len(areas_all))
        np.maximum.at(inside_all, objects.ravel(), depth.ravel())
        for c in present:
            start, n = first[c]
            areas, inside = areas_all[start + 1 : start + n + 1], inside_all[start + 1 : start + n + 1]
            widths = np.clip(np.rint(2 * inside - 1), 1, _WIDTH_BINS - 1).astype(np.int64)
            self.objects[c] += n
            area_bin = np.clip((np.log2(areas) * _AREA_BINS_PER_OCTAVE).astype(np.int64), 0,
                               self.area_bins.shape[1] - 1)
            self.area_bins[c] += np.bincount(area_bin, minlength=self.area_bins.shape[1])
            self.area_max[c] = max(self.area_max[c], int(areas.max()))
            self.width_counts[c] += np.bincount(widths, minlength=_WIDTH_BINS)
            self.width_area[c] += np.bincount(widths, weights=areas, minlength=_WIDTH_BINS).astype(np.int64)

    def statistics(self) -> list[ClassStats]:
        total = int(self.counts.sum())
        area_centres = 2.0 ** ((np.arange(self.area_bins.shape[1]) + 0.5) / _AREA_BINS_PER_OCTAVE)
        whole = np.arange(_WIDTH_BINS, dtype=float)
        out = []
        for c, name in enumerate(self.names):
            stats = ClassStats(name=name, index=c, pixels=int(self.counts[c]),
                               share=float(self.counts[c] / total) if total else 0.0, images=int(self.images[c]),
                               image_pixels=int(self.image_pixels[c]), objects=int(self.objects[c]))
            if self.counts[c]:
                stats.area_median = round(_quantile_from_histogram(self.area_bins[c], 0.5, area_centres), 1)
                stats.area_p90 = round(_quantile_from_histogram(self.area_bins[c], 0.9, area_centres), 1)
                stats.area_max = int(self.area_max[c])
                stats.width_median = _quantile_from_histogram(self.width_counts[c], 0.5, whole)
                stats.width_p90 = _quantile_from_histogram(self.width_area[c], 0.9, whole)
                stats.width_max = int(np.flatnonzero(self.width_counts[c]).max())
                stats.thickness_median = _quantile_from_histogram(self.thickness[c], 0.5, whole)
                stats.thickness_p95 = _quantile_from_histogram(self.thickness[c], 0.95, whole)
                stats.mean_row = round(float(self.row_sum[c] / self.counts[c]), 3)
            stats.crop_presence = {side: round(float(self.presence_sum[c, i] / max(1, self.num_images)), 4)
                                   for i, side in enumerate(CROP_SIZES)}
            out.append(stats)
        return out


def _boundary_depth(mask: np.ndarray) -> np.ndarray:
    """d: 1 + the distance to the nearest boundary pixel (a pixel with a 4-neighbour of another class); an image of
    one class is one object as wide as its smaller side."""
    edge = np.zeros(mask.shape, bool)
    vertical = mask[1:, :] != mask[:-1, :]
    horizontal = mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    if not edge.any():
        return np.full(mask.shape, (min(mask.shape) + 1) / 2.0)
    return ndimage.distance_transform_edt(~edge) + 1.0


def _coarse_classes(mask: np.ndarray, k: int, block: int) -> np.ndarray:
    """(H / block) x (W / block) x k booleans (sides rounded up): whether each block x block cell holds each class;
    one pass over the mask for every class."""
    height, width = mask.shape
    ch, cw = -(-height // block), -(-width // block)
    cells = (np.arange(height) // block)[:, None] * cw + (np.arange(width) // block)[None, :]
    valid = mask != IGNORE_INDEX
    keys = cells[valid] * k + mask[valid]
    return (np.bincount(keys, minlength=ch * cw * k) > 0).reshape(ch, cw, k)


def _crop_presence(coarse: np.ndarray, block: int) -> np.ndarray:
    """For each side in CROP_SIZES, the share of crop positions (uniform, inside the image; the whole image when the
    crop is larger) whose window holds the class, from `coarse`: whether each block x block cell holds it."""
    ch, cw = coarse.shape
    table = np.zeros((ch + 1, cw + 1), np.int64)
    table[1:, 1:] = coarse.cumsum(0).cumsum(1)
    out = np.zeros(len(CROP_SIZES))
    for i, side in enumerate(CROP_SIZES):
        kh, kw = min(ch, max(1, side // block)), min(cw, max(1, side // block))
        if (kh, kw) == (ch, cw):  # this crop and every larger one cover the whole image, which holds the class
            out[i:] = 1.0
            break
        sums = table[kh:, kw:] - table[:-kh, kw:] - table[kh:, :-kw] + table[:-kh, :-kw]
        out[i] = np.count_nonzero(sums) / sums.size
    return out


# ---------------------------------------------------------------------------- the whole fingerprint


def fingerprint(root: str | Path, split: str = "train", ignore: Optional[list] = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> Fingerprint:
    """The fingerprint of `ROOT/split` (module doc); `ignore`: raw values (or [r, g, b] colours) to ignore, as
    `segtrain plan --ignore` gives them. Raises DataError for a missing or malformed data set."""
    from segtrain.config import MaskConfig
    from segtrain.data.masks import MaskMapping
    from segtrain.data.normalization import PixelSampler
    from segtrain.data.scan import scan_pairs

    start = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data set folder not found. Pass a folder holding {split}/images and {split}/masks.")
    pairs = find_pairs(root, split)
    raw, heights, widths, channels, types = read_raw_masks(pairs, max_pixels, progress)
    if len(set(channels)) > 1:
        odd = next(p for p, c in zip(pairs, channels) if c != channels[0])
        raise DataError(f"{odd.image}: {_channel_text(image_channels(odd.image))}, but {pairs[0].image} has "
                        f"{_channel_text(channels[0])}. Every image of a data set needs the same channels: convert "
                        "the odd ones first.")
    ignore_decision = ignore_values(raw, ignore)
    encoding = mask_encoding(raw, ignore_decision.value)
    names = class_names(encoding.value)
    mask_config = MaskConfig(**mask_section(encoding.value, names.value, ignore_decision.value))
    mapping = MaskMapping(mask_config, names.value)
    stats = _ClassStatistics(names.value, PixelSampler(len(pairs)))
    scan_pairs(pairs, mapping, channels[0], max_pixels, stats, description="fingerprint" if progress else None,
               reference=pairs[0].image)
    val_split, val_pairs, val_pixels = _val_split(root, split)
    intensity = stats.pixels.statistics()
    intensity = {key: intensity[key] for key in ("low", "high", "mean", "std", "pixels_sampled", "percentiles")}
    return Fingerprint(
        root=str(root.resolve()), split=split, pairs=len(pairs), val_split=val_split, val_pairs=val_pairs,
        heights=heights, widths=widths, channels=channels[0], sample_types=dict(types), intensity=intensity, raw=raw,
        ignore=ignore_decision, encoding=encoding, names=names, classes=stats.statistics(),
        labelled_pixels=int(stats.counts.sum()), ignored_pixels=stats.ignored,
        train_pixels=int(sum(h * w for h, w in zip(heights, widths))), val_pixel_count=val_pixels,
        seconds=time.perf_counter() - start,
    )


def _channel_text(channels: int) -> str:
    return {1: "1 channel (grayscale)", 3: "3 channels (colour)"}.get(channels, f"{channels} channels")


def _val_split(root: Path, split: str) -> tuple[Optional[str], int, int]:
    """("val", pairs, pixels from the headers) when ROOT/val holds pairs (and is not the planned split), else
    (None, 0, 0)."""
    if split == "val" or not (root / "val").is_dir():
        return None, 0, 0
    try:
        pairs = find_pairs(root, "val")
    except DataError:
        return None, 0, 0
    pixels = 0
    for pair in pairs:
        height, width = image_size(pair.image)
        pixels += height * width
    return "val", len(pairs), pixels


def format_size(pixels: float) -> str:
    """A pixel count as text: 1.2 M, 350 k, 42."""
    if pixels >= 1e6:
        return f"{pixels / 1e6:.1f} M"
    if pixels >= 1e4:
        return f"{pixels / 1e3:.0f} k"
    return f"{pixels:.0f}" if pixels == math.floor(pixels) else f"{pixels:.1f}"
