"""`data.normalize: dataset`: robust per-channel pixel statistics of the training set.

The statistics pass (`segtrain.data.scan`) hands every training image, in file order, to a
`PixelSampler`, which keeps a seeded sample of its pixels: all of them for an image of at most
`per_image` pixels, else `per_image` positions drawn with replacement by a generator seeded with
the image's index. `per_image` is `PIXELS_PER_IMAGE`, lowered so that the whole sample stays within
`MAX_PIXELS` (memory stays flat whatever the data set's size). From that sample, per channel:

```
low, high = percentiles LOW_PERCENTILE, HIGH_PERCENTILE of the values   (numpy's linear interpolation)
mean, std = mean and standard deviation (ddof 0) of the values clipped to [low, high]
```
all on the 0..255 scale images are read on (`segtrain.data.images.read_image`). They are stored
in class_stats.json under "normalization" and built into the model (`segtrain.model.build_unet`):
`((clip(x, low, high) - low) / (high - low) - m) / s` with m, s the mean and std on that [0, 1] scale.
"""

from __future__ import annotations

import numpy as np

PIXELS_PER_IMAGE = 20_000
MAX_PIXELS = 2_000_000
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
SEED = 20_515
"""The sample's seed, with the image's index: `stats` and `fit` see the same pixels."""


def pixels_per_image(num_images: int, per_image: int = PIXELS_PER_IMAGE, max_pixels: int = MAX_PIXELS) -> int:
    """The sample's size per image: `per_image`, fewer when `num_images` of them would exceed `max_pixels`."""
    return max(1, min(per_image, max_pixels // max(1, num_images)))


def sample_pixels(image: np.ndarray, index: int, per_image: int) -> np.ndarray:
    """(n, C) float32 pixel values of an H x W x C image: all of them if there are at most `per_image`, else
    `per_image` drawn with replacement, seeded by the image's `index`."""
    values = np.asarray(image, dtype=np.float32).reshape(-1, image.shape[-1])
    if len(values) <= per_image:
        return values.copy()
    rng = np.random.default_rng([SEED, int(index)])
    return values[rng.integers(0, len(values), per_image)]


def normalization_stats(values: np.ndarray) -> dict:
    """The "normalization" entry of class_stats.json from an (N, C) sample of pixel values (module doc)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError("normalization_stats needs an (N, C) array with N > 0")
    low, high = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE], axis=0)
    clipped = np.clip(values, low, high)
    return {
        "method": "dataset",
        "low": low.tolist(),
        "high": high.tolist(),
        "mean": clipped.mean(axis=0).tolist(),
        "std": clipped.std(axis=0).tolist(),
        "pixels_sampled": int(len(values)),
        "percentiles": [LOW_PERCENTILE, HIGH_PERCENTILE],
    }


class PixelSampler:
    """Collects the pixel sample of a split's images (fed in file order) and gives its statistics."""

    def __init__(self, num_images: int, per_image: int = PIXELS_PER_IMAGE, max_pixels: int = MAX_PIXELS):
        self.per_image = pixels_per_image(num_images, per_image, max_pixels)
        self.samples: list[np.ndarray] = []

    def sample(self, image: np.ndarray, index: int) -> np.ndarray:
        """The sample of one image (thread-safe: it only reads the image); `add` it in file order."""
        return sample_pixels(image, index, self.per_image)

    def add(self, sample: np.ndarray) -> None:
        self.samples.append(sample)

    @property
    def pixels(self) -> int:
        return sum(len(s) for s in self.samples)

    def statistics(self) -> dict:
        return normalization_stats(np.concatenate(self.samples, axis=0))
