"""Tiled prediction: class probabilities for one image of any size.

An image no larger than one tile goes through the model in one pass (reflect-padded
to a multiple of `divisor`, then cropped back). A larger image is cut into
overlapping tiles of one fixed shape (the last tile of each row and column aligned to
the border), the tiles go through the model in fixed-size batches (one trace of the
compiled call), and their *probabilities* are blended with a smooth window:

Formula:
    P(x) = sum_t w(x - o_t) * p_t(x - o_t) / sum_t w(x - o_t)

where `o_t` is the offset of tile t, `p_t` its probabilities and `w` the window
(`make_window`), which is small near tile borders where a U-Net sees padding instead
of context.

Temperature (`segtrain.calibration`): `p_t = softmax(z_t / T)` (sigmoid for one channel), the
tile's logits divided by T *before* its probabilities are blended and averaged over flips,
so blending and flip TTA stay as they are and T = 1 is today's result bit for bit.
`predict_logits` runs the same tiles, windows, padding and flips but blends the logits
themselves (same formula with `z_t` for `p_t`): the input of the temperature fit.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from segtrain.decision import probabilities_tf

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


def _probability_fn(model):
    """A tf.function mapping a batch (B, h, w, Cin) to probabilities (B, h, w, K), cached per model.

    `fn(x, hflip, vflip, temperature, logits)`: `temperature` a float32 scalar tensor (one trace
    for every value), `logits=True` returns the raw logits (B, h, w, C) instead. The function
    holds the model through a weak reference, so the cache does not keep it alive. It traces
    once per (batch shape, flips, logits) combination.
    """
    try:
        return _FN_CACHE[model]
    except KeyError:
        fn = _FN_CACHE[model] = _make_probability_fn(weakref.ref(model))
        return fn
    except TypeError:  # not weak-referenceable: hold it directly, skip the cache
        return _make_probability_fn(lambda: model)


def _make_probability_fn(get_model):
    """The tf.function of `_probability_fn`; `get_model()` returns the model."""

    @tf.function
    def fn(x, hflip=False, vflip=False, temperature=None, logits=False):
        if hflip:
            x = tf.reverse(x, axis=[2])
        if vflip:
            x = tf.reverse(x, axis=[1])
        z = tf.cast(get_model()(x, training=False), tf.float32)
        if logits:
            probs = z
        else:  # the one logits -> probabilities map; z / 1.0 is z exactly
            probs = probabilities_tf(z if temperature is None else z / temperature)
        if hflip:
            probs = tf.reverse(probs, axis=[2])
        if vflip:
            probs = tf.reverse(probs, axis=[1])
        return probs

    return fn


def _predict_batch(fn, x, tta: bool, **kwargs) -> np.ndarray:
    """Probabilities (or, with logits=True, logits) of one batch; with `tta` the mean over identity,
    horizontal and vertical flips. `kwargs` go to `fn` (temperature, logits)."""
    if not tta:
        return fn(x, **kwargs).numpy()
    total = fn(x, **kwargs).numpy()
    total += fn(x, hflip=True, **kwargs).numpy()
    total += fn(x, vflip=True, **kwargs).numpy()
    return total / 3.0


def predict_probabilities(
    model,
    image,
    tile_size: int,
    overlap: float = 0.25,
    batch_size: int = 4,
    window: str = "cosine",
    tta: bool = False,
    divisor: int = 16,
    progress: bool = False,
    temperature: float = 1.0,
) -> np.ndarray:
    """Class probabilities (H, W, K) float32 for one image, by overlapping tiles when it is large.

    Args:
        model: Keras model (or callable `model(x, training=False)`) mapping (B, h, w, Cin) to
            logits (B, h, w, C); C == 1 is binary (sigmoid, K = 2 channels [1 - p, p]),
            C >= 2 softmax (K = C), through `segtrain.decision.probabilities_tf`.
        image: (H, W, Cin) array (or (H, W) for one channel), already normalised for the model.
        tile_size: tile side in pixels, a multiple of `divisor`.
        overlap: fraction of a tile shared by neighbouring tiles, in [0, 1); stride is
            `round(tile_size * (1 - overlap))`. Default 0.25.
        batch_size: tiles per model call; the last batch is padded so every call has one shape.
        window: blending window, "cosine" (default) or "gaussian"; see `make_window`.
        tta: average over identity, horizontal and vertical flips (3x the model calls).
        divisor: the model's size multiple (2**depth for a U-Net); smaller sides are
            reflect-padded to it and cropped back.
        progress: show a tqdm bar over tiles.
        temperature: T > 0 dividing every tile's logits before its probabilities (module doc);
            1.0 (default) leaves them as the model gives them.

    Returns:
        (H, W, K) float32 probabilities summing to 1 over the last axis.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    import tensorflow as tf

    kwargs = {} if temperature == 1.0 else {"temperature": tf.constant(float(temperature), tf.float32)}
    return _tiled(model, image, tile_size, overlap, batch_size, window, tta, divisor, progress, kwargs)


def predict_logits(
    model,
    image,
    tile_size: int,
    overlap: float = 0.25,
    batch_size: int = 4,
    window: str = "cosine",
    tta: bool = False,
    divisor: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """Logits (H, W, C) float32 for one image (C = the model's output channels, 1 for binary).

    The same tiles, padding, window and flips as `predict_probabilities` with the same
    arguments, blended and flip-averaged as logits (module doc): for an image of one tile
    without TTA these are exactly the logits whose sigmoid/softmax `predict_probabilities` gives.
    """
    return _tiled(model, image, tile_size, overlap, batch_size, window, tta, divisor, progress, {"logits": True})


def _tiled(model, image, tile_size, overlap, batch_size, window, tta, divisor, progress, kwargs) -> np.ndarray:
    """The shared body of `predict_probabilities` and `predict_logits`; `kwargs` go to the forward function."""
    image = _as_image(image)
    _check_tiling(tile_size, overlap, batch_size, window, divisor)
    height, width = image.shape[:2]
    image = _pad_small_sides(image, tile_size, divisor)
    fn = _probability_fn(model)
    if image.shape[0] <= tile_size and image.shape[1] <= tile_size:  # one tile: one exact forward pass
        probs = _predict_batch(fn, image[None], tta, **kwargs)[0]
    else:
        probs = _blend_tiles(fn, image, tile_size, overlap, batch_size, window, tta, progress, kwargs)
    return np.ascontiguousarray(probs[:height, :width], dtype=np.float32)


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
    """Reflect-pad each side no longer than a tile to a multiple of `divisor` (a tile then spans it whole);
    longer sides are tiled as they are."""
    height, width = image.shape[:2]
    ph = height if height > tile_size else _round_up(height, divisor)
    pw = width if width > tile_size else _round_up(width, divisor)
    if (ph, pw) == (height, width):
        return image
    return np.pad(image, ((0, ph - height), (0, pw - width), (0, 0)), mode="reflect")


def _round_up(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


def _tile_offsets(height: int, width: int, th: int, tw: int, stride: int) -> list[tuple[int, int]]:
    """(y, x) offsets of the tiles of shape (th, tw) covering a height x width image, row by row."""
    return [(y, x)
            for y in tile_positions(height, th, min(stride, th))
            for x in tile_positions(width, tw, min(stride, tw))]


def _blend_tiles(fn, image: np.ndarray, tile_size: int, overlap: float, batch_size: int, window: str,
                 tta: bool, progress: bool, kwargs=None) -> np.ndarray:
    """The window-weighted mean of the overlapping tiles' probabilities (module formula), (H, W, K) float32."""
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
            probs = _predict_batch(fn, batch, tta, **(kwargs or {}))
            if acc is None:
                acc = np.zeros((height, width, probs.shape[-1]), dtype=np.float32)
            for i, (y, x) in enumerate(chunk):
                acc[y : y + th, x : x + tw] += probs[i] * win[..., None]
                weight[y : y + th, x : x + tw] += win
            bar.update(len(chunk))
    return acc / weight[..., None]
