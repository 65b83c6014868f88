"""The model's logits for one image of any size: whole in one call when it fits, else by overlapping tiles.

An image whose padded size has at most `WHOLE_IMAGE_PIXELS` pixels (or, with an explicit `tile_size`, whose
sides fit one tile) goes through the model in one call, padded to a multiple of `divisor` by
`segtrain.policy.padding` and cropped back: the exact forward pass, at the model's own cost. A larger image is
cut into overlapping tiles of one fixed shape (the last tile of each row and column aligned to the border),
the tiles go through the model in fixed-size batches (one trace of the compiled call), and their *logits* are
blended with a smooth window:

Formula:
    Z(x) = sum_t w(x - o_t) * z_t(x - o_t) / sum_t w(x - o_t)

where `o_t` is the offset of tile t, `z_t` its logits and `w` the window (`make_window`), which is small near
tile borders where a U-Net sees padding instead of context. Flip test-time augmentation averages the logits of
the identity, horizontal and vertical flips. Everything after the logits (temperature, prior correction, rule,
post-processing) is the decision policy's (`segtrain.policy.policy`), so one forward pass serves the
calibrated and the uncalibrated probabilities, calibration, tuning and evaluation alike.
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from segtrain.policy.padding import pad_to_multiple_np, padded_size

WHOLE_IMAGE_PIXELS = 2048 * 2048
"""With no tile size set, images up to this many (padded) pixels go through the model whole."""
DEFAULT_TILE = 1024
"""With no tile size set, the tile side for larger images."""

WINDOW_FLOOR = 1e-3
"""Smallest window weight: pixels seen only by a tile border (image borders) still count."""

WINDOWS = ("cosine", "gaussian")


def tile_positions(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles covering `[0, length)`: every `stride`, the last one at `length - tile`.

    Args:
        length: size of the axis to cover.
        tile: tile size along that axis.
        stride: step between consecutive tiles (1 <= stride <= tile, so tiles leave no gap).

    Returns:
        Sorted distinct offsets; `[0]` when `length <= tile`.

    Example: `tile_positions(200, 64, 48)` -> `[0, 48, 96, 136]`.
    """
    if tile < 1 or not 1 <= stride <= tile:
        raise ValueError(f"need tile >= 1 and 1 <= stride <= tile, got tile={tile}, stride={stride}")
    if length <= tile:
        return [0]
    last = length - tile
    return list(range(0, last, stride)) + [last]


def make_window(tile, kind: str = "cosine") -> np.ndarray:
    """Blending window of shape (th, tw), float32, maximum 1, minimum `WINDOW_FLOOR`.

    Formula:
        cosine:   w(n) = sin^2(pi * (n + 0.5) / N)       (Hann sampled at pixel centres)
        gaussian: w(n) = exp(-(n - (N - 1) / 2)^2 / (2 * sigma^2)), sigma = N / 8 (nnU-Net)
        2-D:      W = max(w_rows (outer) w_cols / max, WINDOW_FLOOR)

    Args:
        tile: tile size, an int or a (height, width) pair.
        kind: "cosine" or "gaussian".
    """
    th, tw = (tile, tile) if np.isscalar(tile) else tuple(tile)

    def one_axis(n: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        if kind == "cosine":
            return np.sin(np.pi * (i + 0.5) / n) ** 2
        if kind == "gaussian":
            sigma = n / 8.0
            return np.exp(-((i - (n - 1) / 2.0) ** 2) / (2.0 * sigma**2))
        raise ValueError(f"unknown window {kind!r}; choose one of {', '.join(WINDOWS)}")

    w = np.outer(one_axis(int(th)), one_axis(int(tw)))
    return np.maximum(w / w.max(), WINDOW_FLOOR).astype(np.float32)


_FN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _logits_fn(model):
    """A tf.function mapping a batch (B, h, w, Cin) to float32 logits (B, h, w, C), cached per model.

    `fn(x, hflip, vflip)` flips the input and the logits back. The function holds the model through a weak
    reference, so the cache does not keep it alive; `reduce_retracing` lets images of many sizes share traces.
    """
    try:
        return _FN_CACHE[model]
    except KeyError:
        fn = _FN_CACHE[model] = _make_logits_fn(weakref.ref(model))
        return fn
    except TypeError:  # not weak-referenceable: hold it directly, skip the cache
        return _make_logits_fn(lambda: model)


def _make_logits_fn(get_model):
    """The tf.function of `_logits_fn`; `get_model()` returns the model."""

    @tf.function(reduce_retracing=True)
    def fn(x, hflip=False, vflip=False):
        if hflip:
            x = tf.reverse(x, axis=[2])
        if vflip:
            x = tf.reverse(x, axis=[1])
        z = tf.cast(get_model()(x, training=False), tf.float32)
        if hflip:
            z = tf.reverse(z, axis=[2])
        if vflip:
            z = tf.reverse(z, axis=[1])
        return z

    return fn


def _predict_batch(fn, x, tta: bool) -> np.ndarray:
    """Logits of one batch; with `tta` the mean over identity, horizontal and vertical flips."""
    if not tta:
        return fn(x).numpy()
    total = fn(x).numpy()
    total += fn(x, hflip=True).numpy()
    total += fn(x, vflip=True).numpy()
    return total / 3.0


def predict_logits(
    model,
    image,
    tile_size=None,
    overlap: float = 0.25,
    batch_size: int = 4,
    window: str = "cosine",
    tta: bool = False,
    divisor: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """Logits (H, W, C) float32 for one image (C = the model's output channels, 1 for binary).

    Args:
        model: Keras model (or callable `model(x, training=False)`) mapping (B, h, w, Cin) to logits (B, h, w, C).
        image: (H, W, Cin) array (or (H, W) for one channel) as the model reads it.
        tile_size: None: whole image when its padded size has at most `WHOLE_IMAGE_PIXELS` pixels, else tiles of
            `DEFAULT_TILE`; an int (a multiple of `divisor`): whole image when both sides fit one tile, else tiles.
        overlap: fraction of a tile shared by neighbouring tiles, in [0, 1); stride `round(tile * (1 - overlap))`.
        batch_size: tiles per model call; the last batch is padded so every call has one shape.
        window: blending window, "cosine" (default) or "gaussian"; see `make_window`.
        tta: average the logits over identity, horizontal and vertical flips (3x the model calls).
        divisor: the model's size multiple (2**depth for a U-Net).
        progress: show a tqdm bar over tiles.
    """
    image = _as_image(image)
    height, width = image.shape[:2]
    tile = _tile_for(height, width, tile_size, divisor)
    _check_tiling(tile or divisor, overlap, batch_size, window, divisor)
    fn = _logits_fn(model)
    if tile is None:  # one exact forward pass
        padded = pad_to_multiple_np(image, divisor)
        logits = _predict_batch(fn, padded[None], tta)[0]
    else:
        image = _pad_small_sides(image, tile, divisor)
        logits = _blend_tiles(fn, image, tile, overlap, batch_size, window, tta, progress)
    return np.ascontiguousarray(logits[:height, :width], dtype=np.float32)


def _tile_for(height: int, width: int, tile_size, divisor: int):
    """The tile side, or None when the image goes through whole (`predict_logits`)."""
    if tile_size is None:
        if padded_size(height, divisor) * padded_size(width, divisor) <= WHOLE_IMAGE_PIXELS:
            return None
        return max(divisor, DEFAULT_TILE // divisor * divisor)
    if height <= tile_size and width <= tile_size:
        return None
    return int(tile_size)


def predict_probabilities(model, image, tile_size=None, temperature=1.0, **kwargs) -> np.ndarray:
    """softmax(Z / T) (sigmoid -> [1 - p, p] for one channel) of `predict_logits`'s Z, float32 (H, W, K)."""
    from segtrain.policy.temperature import apply_temperature

    if not np.all(np.asarray(temperature) > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return apply_temperature(predict_logits(model, image, tile_size, **kwargs), temperature).astype(np.float32)


def _as_image(image) -> np.ndarray:
    """(H, W, C) float32 from an (H, W, C) or (H, W) array."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C) or (H, W), got shape {image.shape}")
    return image


def _check_tiling(tile_size: int, overlap: float, batch_size: int, window: str, divisor: int) -> None:
    if divisor < 1 or tile_size < divisor or tile_size % divisor:
        raise ValueError(f"tile_size ({tile_size}) must be a positive multiple of divisor ({divisor})")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}")


def _pad_small_sides(image: np.ndarray, tile_size: int, divisor: int) -> np.ndarray:
    """Pad each side no longer than a tile to a multiple of `divisor` (a tile then spans it whole); longer sides
    are tiled as they are."""
    axes = tuple(axis for axis in (0, 1) if image.shape[axis] <= tile_size)
    return pad_to_multiple_np(image, divisor, axes) if axes else image


def _tile_offsets(height: int, width: int, th: int, tw: int, stride: int) -> list[tuple[int, int]]:
    """(y, x) offsets of the tiles of shape (th, tw) covering a height x width image, row by row."""
    return [(y, x)
            for y in tile_positions(height, th, min(stride, th))
            for x in tile_positions(width, tw, min(stride, tw))]


def _blend_tiles(fn, image: np.ndarray, tile_size: int, overlap: float, batch_size: int, window: str,
                 tta: bool, progress: bool) -> np.ndarray:
    """The window-weighted mean of the overlapping tiles' logits (module formula), (H, W, C) float32."""
    height, width = image.shape[:2]
    th, tw = min(tile_size, height), min(tile_size, width)
    coords = _tile_offsets(height, width, th, tw, max(1, int(round(tile_size * (1.0 - overlap)))))
    win = make_window((th, tw), window)
    acc = None
    weight = np.zeros((height, width), dtype=np.float32)
    batch = np.zeros((batch_size, th, tw, image.shape[2]), dtype=np.float32)
    with tqdm(total=len(coords), desc="tiles", unit="tile", disable=not progress, leave=False) as bar:
        for start in range(0, len(coords), batch_size):
            chunk = coords[start : start + batch_size]
            for i, (y, x) in enumerate(chunk):
                batch[i] = image[y : y + th, x : x + tw]
            # Unused slots keep the previous tiles: same shape every call, results discarded.
            logits = _predict_batch(fn, batch, tta)
            if acc is None:
                acc = np.zeros((height, width, logits.shape[-1]), dtype=np.float32)
            for i, (y, x) in enumerate(chunk):
                acc[y : y + th, x : x + tw] += logits[i] * win[..., None]
                weight[y : y + th, x : x + tw] += win
            bar.update(len(chunk))
    return acc / weight[..., None]
