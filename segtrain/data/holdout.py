"""`data.val_fraction`: a seeded, stratified hold-out of the training split, recorded in the run folder.

A data set with only `train/` still needs images to validate, calibrate and tune on. fit draws them from the
training split once: the images are grouped by the rarest class each one holds (rarest = held by the fewest
images, ties to the fewest pixels), each group gives its share (largest remainders round the total to round(fraction x n)), and a generator
seeded by `train.seed` picks which. The held-out file stems go to RUN/split.json; from then on the run's
`val_split` name means those images and its `train_split` name the others, for fit, resume, eval, calibrate and
tune alike (`split_pairs`).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from segtrain.data.discovery import Pair, find_pairs
from segtrain.data.images import read_raw_mask
from segtrain.data.masks import MaskMapping
from segtrain.errors import ConfigError, DataError

SPLIT_FILE = "split.json"
NO_CLASS = -1
"""The stratum of an image with no labelled pixel."""


@dataclass
class HeldOutSplit:
    """Which images of `source` fit holds out as the validation split, and how they were chosen."""

    source: str
    fraction: float
    seed: int
    val: list[str]
    """The held-out file stems, sorted."""
    strata: dict[str, list[int]]
    """Rarest class held -> [images, held out]."""

    def select(self, pairs: Sequence[Pair], held_out: bool) -> list[Pair]:
        """The held-out pairs (or the others) of the source split, in file order; a recorded stem that is no
        longer there is a DataError naming it."""
        stems = {p.stem for p in pairs}
        missing = sorted(set(self.val) - stems)
        if missing:
            raise DataError(f"{SPLIT_FILE}: the run held out {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''} from {self.source}/, no longer there. Restore the "
                            "files, or train a new run.")
        val = set(self.val)
        return [p for p in pairs if (p.stem in val) == held_out]

    def save(self, run_dir: Path) -> None:
        from segtrain.atomic import write_json

        write_json(asdict(self), Path(run_dir) / SPLIT_FILE)

    @classmethod
    def load(cls, run_dir: Path) -> "HeldOutSplit":
        path = Path(run_dir) / SPLIT_FILE
        try:
            raw = json.loads(path.read_text())
            return cls(str(raw["source"]), float(raw["fraction"]), int(raw["seed"]), list(raw["val"]),
                       {k: list(v) for k, v in raw.get("strata", {}).items()})
        except FileNotFoundError:
            raise ConfigError(f"{path}: missing. The run's config sets data.val_fraction, whose held-out images fit "
                              "records there; was the run folder copied without it? Train a new run.") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable ({exc}). Train a new run.") from None


def stratum_keys(presence: np.ndarray, pixels: Optional[np.ndarray] = None) -> np.ndarray:
    """Per image, the rarest class it holds (the class held by the fewest images; ties to the fewest `pixels`,
    then the lower index), or NO_CLASS. `presence`: bool, images x classes; `pixels`: each class's pixel count."""
    presence = np.asarray(presence, bool)
    if presence.size == 0:
        return np.full(len(presence), NO_CLASS, np.int64)
    held_by = presence.sum(axis=0)
    pixels = np.zeros(presence.shape[1]) if pixels is None else np.asarray(pixels)
    order = np.lexsort((np.arange(presence.shape[1]), pixels, held_by))  # rarest first
    keys = np.full(len(presence), NO_CLASS, np.int64)
    for c in order[::-1]:  # the rarest class is written last and wins
        keys[presence[:, c]] = c
    return keys


def stratified_holdout(keys: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices held out, sorted: round(fraction x n) images (halves up), each stratum giving its share, the
    remainders going to the strata with the largest fractional parts (ties to the smaller key), the images of a
    stratum drawn with `np.random.default_rng(seed)`. ConfigError unless one image stays on each side."""
    keys = np.asarray(keys, np.int64)
    n = len(keys)
    total = int(np.floor(fraction * n + 0.5))
    if total < 1 or total > n - 1:
        raise ConfigError(f"data.val_fraction: {fraction:g} of {n} training image{'s' if n != 1 else ''} holds out "
                          f"{total}; at least one image is needed on each side. Choose another share, or add a "
                          "val/ split.")
    strata = np.unique(keys)
    sizes = np.array([(keys == k).sum() for k in strata])
    quota = sizes * fraction
    take = np.floor(quota).astype(np.int64)
    remainder = quota - take
    for i in np.lexsort((strata, -remainder))[: total - int(take.sum())]:
        take[i] += 1
    rng = np.random.default_rng(int(seed))
    chosen: list[int] = []
    for k, count in zip(strata, take):
        members = np.flatnonzero(keys == k)
        chosen += members[rng.permutation(len(members))[:count]].tolist()
    return sorted(chosen)


def class_pixels(pairs: Sequence[Pair], mapping: MaskMapping, num_classes: int, max_pixels: int,
                 description: Optional[str] = None) -> np.ndarray:
    """int64 images x classes: each mask's pixels of each class (values the config does not cover are skipped
    here; the training pass reports them)."""
    def count(pair: Pair) -> np.ndarray:
        classes, _ = mapping.classes_and_unmapped(read_raw_mask(pair.mask, mapping.rgb, max_pixels), pair.mask)
        return np.bincount(classes[(classes >= 0) & (classes < num_classes)].ravel(), minlength=num_classes)

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(tqdm(pool.map(count, pairs), total=len(pairs), desc=description, unit="mask", leave=False,
                         disable=True if description is None else None))
    return np.array(rows, np.int64).reshape(len(pairs), num_classes)


def make_holdout(data, seed: int, description: Optional[str] = "choosing the val images") -> HeldOutSplit:
    """Choose the held-out images of `data.train_split` for `data.val_fraction` (a DataConfig with it set)."""
    pairs = find_pairs(data.root, data.train_split)
    pixels = class_pixels(pairs, MaskMapping(data.mask, data.classes), len(data.classes), data.max_image_pixels,
                          description)
    keys = stratum_keys(pixels > 0, pixels.sum(axis=0))
    held = stratified_holdout(keys, float(data.val_fraction), seed)
    names = list(data.classes)
    strata = {}
    for k in np.unique(keys):
        members = keys == k
        name = names[k] if k != NO_CLASS else "(no labelled pixel)"
        strata[name] = [int(members.sum()), int(members[held].sum())]
    return HeldOutSplit(data.train_split, float(data.val_fraction), int(seed), sorted(pairs[i].stem for i in held),
                        strata)


def split_pairs(config, split: str, run_dir: Optional[Path], data_root: Optional[str] = None) -> list[Pair]:
    """The pairs a command reads for `split`: under data.val_fraction the run's `val_split` is its held-out images
    and its `train_split` the rest (RUN/split.json), unless `data_root` points at another data set; any other
    split is its folder."""
    data = config.data
    root = data.root if data_root is None else data_root
    recorded = (data.val_fraction is not None and run_dir is not None and split in (data.val_split, data.train_split)
                and (data_root is None or Path(data_root).resolve() == Path(data.root).resolve()))
    if not recorded:
        return find_pairs(root, split)
    holdout = HeldOutSplit.load(run_dir)
    return holdout.select(find_pairs(root, holdout.source), held_out=split == data.val_split)


def describe(holdout: HeldOutSplit, train_images: int) -> str:
    """One line for fit's log: how many images were held out of which split, and by what rule."""
    if len(holdout.strata) > 1:
        strata = ", ".join(f"{name} {held}/{total}" for name, (total, held) in holdout.strata.items())
        how = f"held out per rarest class an image holds: {strata}"
    else:
        how = "every image holds the same rarest class, so a plain seeded draw"
    return (f"data.val_fraction {holdout.fraction:g}: validating on {len(holdout.val)} of the "
            f"{len(holdout.val) + train_images} {holdout.source}/ images (seed {holdout.seed}; {how}); recorded in "
            f"{SPLIT_FILE}.")
