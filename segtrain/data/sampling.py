"""Class-aware crop sampling: where each class lies, recorded compactly during the class-statistics pass.

For every training image (in file order) and every class with a share in `data.sampling`,
`ClassLocations.update` keeps at most `max_points` pixel coordinates of that class, drawn
without replacement by a generator seeded with (seed, image index), in the frame the
pipeline crops from (after `data.resize`). Memory is O(images x sampled classes x
max_points), never O(pixels). The same pass sums the class histograms of the crop windows
the pipeline can draw, for the class frequencies expected under sampling:

```
U_i      = mean over every uniform window position of image i of its class histogram
C_i,c    = mean over the recorded points of class c of the histogram of the window centred there
           (U_i when image i holds no pixel of c: the pipeline's fallback)
expected = 1/N sum_i [ sum_c s_c C_i,c + (1 - sum_c s_c) U_i ]      (pixels of each class per crop)
```
A window centred on (y, x) starts at `clip(y - crop // 2, 0, max(H - crop, 0))` (likewise for x),
as in `segtrain.data.pipeline.augment`; pixels of an image smaller than the crop are padded
with the ignore label and count in no histogram. Flips and turns do not change a histogram.
Window sums come from summed-area tables, so a pass costs O(K x pixels) per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


MAX_POINTS = 32
"""Coordinates kept per image and class."""


def resize_nearest(mask: np.ndarray, size) -> np.ndarray:
    """`tf.image.resize(mask, size, method="nearest")` in NumPy (half-pixel centres, float32 scales)."""
    height, width = int(size[0]), int(size[1])
    in_h, in_w = mask.shape

    def source(out_size, in_size):
        scale = np.float32(in_size) / np.float32(out_size)
        index = np.floor((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64)
        return np.clip(index, 0, in_size - 1)

    return mask[source(height, in_h)[:, None], source(width, in_w)[None, :]]


def _summed_area(plane: np.ndarray) -> np.ndarray:
    """Summed-area table of a 0/1 plane (int32 where the pixel count allows: half the memory of int64)."""
    dtype = np.int32 if plane.size < 2**31 else np.int64
    table = np.zeros((plane.shape[0] + 1, plane.shape[1] + 1), dtype)
    np.cumsum(np.cumsum(plane, axis=0, dtype=dtype), axis=1, out=table[1:, 1:])
    return table


def _window_sums(table: np.ndarray, tops: np.ndarray, lefts: np.ndarray, height: int, width: int) -> np.ndarray:
    """Sums of the windows [top, top + height) x [left, left + width) (broadcast over tops and lefts)."""
    return (table[tops + height, lefts + width] - table[tops, lefts + width]
            - table[tops + height, lefts] + table[tops, lefts])


def window_start(centre, size: int, crop: int):
    """First row (or column) of the crop centred on `centre`, clipped to the image (an image smaller than the
    crop is padded at the bottom/right, so its crops start at 0)."""
    return np.clip(np.asarray(centre) - crop // 2, 0, max(size - crop, 0))


class ClassLocations:
    """Per image and sampled class, a bounded sample of pixel coordinates; and the crop-window histogram sums.

    Attributes:
        classes: the sampled class indices (those with a share > 0), in class order.
        shares: their shares of the training crops.
        points: int32 array (images, len(classes), max_points, 2) of (row, column); rows past `counts` are 0.
        counts: int32 array (images, len(classes)) of the coordinates recorded (0: the image lacks the class).
        uniform: sum over images of U_i (float64, K).
        centred: sum over images of C_i,c (float64, len(classes) x K).
        uniform_holding, centred_holding: the same sums of the valid pixels of windows holding each class
            (the crop analogue of ClassCounter.image_pixels, for median_frequency).
    """

    def __init__(self, num_classes: int, shares: dict[int, float], crop: int, resize=None,
                 max_points: int = MAX_POINTS, seed: int = 0):
        self.num_classes = int(num_classes)
        self.classes = [c for c in sorted(shares) if shares[c] > 0]
        self.shares = [float(shares[c]) for c in self.classes]
        self.crop, self.resize = int(crop), None if resize is None else [int(v) for v in resize]
        self.max_points, self.seed = int(max_points), int(seed)
        self._points: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        k, s = self.num_classes, len(self.classes)
        self.uniform = np.zeros(k)
        self.centred = np.zeros((s, k))
        self.uniform_holding = np.zeros(k)
        self.centred_holding = np.zeros((s, k))

    @property
    def num_images(self) -> int:
        return len(self._counts)

    @property
    def points(self) -> np.ndarray:
        shape = (0, len(self.classes), self.max_points, 2)
        return np.stack(self._points) if self._points else np.zeros(shape, np.int32)

    @property
    def counts(self) -> np.ndarray:
        return np.stack(self._counts) if self._counts else np.zeros((0, len(self.classes)), np.int32)

    def update(self, mask: np.ndarray) -> "ClassLocations":
        """Record the next image's class mask (int H x W, IGNORE_INDEX for ignored pixels), in file order."""
        mask = np.asarray(mask)
        if self.resize is not None:
            mask = resize_nearest(mask, self.resize)
        height, width = mask.shape
        rng = np.random.default_rng([self.seed, self.num_images])
        points = np.zeros((len(self.classes), self.max_points, 2), np.int32)
        counts = np.zeros(len(self.classes), np.int32)
        for j, c in enumerate(self.classes):
            flat = np.flatnonzero(mask == c)
            if flat.size > self.max_points:
                flat = np.sort(rng.choice(flat, self.max_points, replace=False))
            points[j, : flat.size, 0], points[j, : flat.size, 1] = np.divmod(flat, width)
            counts[j] = flat.size
        self._points.append(points)
        self._counts.append(counts)
        self._add_histograms(mask, points, counts)
        return self

    def _add_histograms(self, mask, points, counts) -> None:
        height, width = mask.shape
        win_h, win_w = min(self.crop, height), min(self.crop, width)
        tables = [_summed_area(mask == k) for k in range(self.num_classes)]
        tops = np.arange(max(height - self.crop, 0) + 1)[:, None]
        lefts = np.arange(max(width - self.crop, 0) + 1)[None, :]
        uniform, uniform_holding = self._mean_histogram(tables, tops, lefts, win_h, win_w)
        self.uniform += uniform
        self.uniform_holding += uniform_holding
        for j in range(len(self.classes)):
            if counts[j] == 0:  # the pipeline falls back to a uniform crop
                self.centred[j] += uniform
                self.centred_holding[j] += uniform_holding
                continue
            rows, cols = points[j, : counts[j], 0], points[j, : counts[j], 1]
            hist, holding = self._mean_histogram(tables, window_start(rows, height, self.crop),
                                                 window_start(cols, width, self.crop), win_h, win_w)
            self.centred[j] += hist
            self.centred_holding[j] += holding

    def _mean_histogram(self, tables, tops, lefts, win_h, win_w):
        """Mean class histogram of the windows at (tops, lefts), and mean valid pixels of those holding each class."""
        sums = [_window_sums(t, tops, lefts, win_h, win_w) for t in tables]
        valid = sum(sums)
        hist = np.array([float(s.mean()) for s in sums])
        holding = np.array([float(np.mean(np.where(s > 0, valid, 0))) for s in sums])
        return hist, holding

    # ------------------------------------------------------------------ what the statistics use

    def expected_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Expected pixels of each class per training crop, and the expected valid pixels of crops holding each
        class (both K), under the shares."""
        n = max(self.num_images, 1)
        rest = 1.0 - sum(self.shares)
        shares = np.asarray(self.shares)
        counts = (shares @ self.centred + rest * self.uniform) / n if self.classes else self.uniform / n
        holding = (shares @ self.centred_holding + rest * self.uniform_holding) / n if self.classes \
            else self.uniform_holding / n
        return counts, holding

    # ------------------------------------------------------------------ the run folder

    def save(self, path: Path) -> None:
        """Write class_locations.npz atomically."""
        from segtrain.atomic import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, classes=np.asarray(self.classes, np.int32),
                         shares=np.asarray(self.shares, np.float64),
                         crop=np.int64(self.crop), resize=np.asarray(self.resize or [], np.int64),
                         max_points=np.int64(self.max_points), seed=np.int64(self.seed),
                         num_classes=np.int64(self.num_classes), points=self.points, counts=self.counts,
                         uniform=self.uniform, centred=self.centred, uniform_holding=self.uniform_holding,
                         centred_holding=self.centred_holding)

    @classmethod
    def load(cls, path: Path) -> "ClassLocations":
        with np.load(path) as f:
            classes = [int(c) for c in f["classes"]]
            shares = dict(zip(classes, (float(s) for s in f["shares"])))
            resize = [int(v) for v in f["resize"]] or None
            out = cls(int(f["num_classes"]), shares, int(f["crop"]), resize, int(f["max_points"]), int(f["seed"]))
            out._points = list(np.asarray(f["points"], np.int32))
            out._counts = list(np.asarray(f["counts"], np.int32))
            for name in ("uniform", "centred", "uniform_holding", "centred_holding"):
                setattr(out, name, np.asarray(f[name], np.float64))
        return out

    def matches(self, shares: dict[int, float], crop: int, resize) -> bool:
        """Whether these locations were recorded for the same sampled classes, shares, crop and resize."""
        wanted = {c: float(s) for c, s in shares.items() if s > 0}
        return (dict(zip(self.classes, self.shares)) == wanted and self.crop == crop
                and self.resize == (None if resize is None else [int(v) for v in resize]))


def class_shares(data) -> dict[int, float]:
    """data.sampling as {class index: share}."""
    return {list(data.classes).index(name): float(share) for name, share in data.sampling.items()}


def new_locations(data) -> Optional[ClassLocations]:
    """The recorder for `data` (a DataConfig), or None without class-aware sampling (nothing is recorded)."""
    shares = class_shares(data)
    if not any(s > 0 for s in shares.values()):
        return None
    return ClassLocations(len(data.classes), shares, data.crop, data.resize)
