"""Reading images and raw masks from disk with Pillow, with clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segtrain.atomic import atomic_path
from segtrain.errors import DataError

DEFAULT_MAX_PIXELS = 100_000_000

Image.MAX_IMAGE_PIXELS = None  # Pillow's own guard is off: _open checks data.max_image_pixels from the header


def _too_large(path: Path, width: int, height: int, max_pixels: int) -> DataError:
    return DataError(
        f"{path}: {width}x{height} = {width * height} pixels is more than data.max_image_pixels = {max_pixels} "
        "and is refused as unsafe to decode. Raise data.max_image_pixels if the file is trusted, or tile it first."
    )


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open and decode an image; the pixel limit is checked from the header, before decoding."""
    try:
        image = Image.open(path)  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise _too_large(path, width, height, max_pixels)
        image.load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc}). Replace or remove the corrupt file.") from None
    return image


def image_channels(path: Path) -> int:
    """1 for a grayscale image, 3 for colour (alpha dropped); read from the header."""
    try:
        with Image.open(path) as image:
            return 1 if image.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc}). Replace or remove the corrupt file.") from None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) read from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc}). Replace or remove the corrupt file.") from None
    return height, width


def read_image(path: Path, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An H x W x channels float32 array of pixel values in 0..255 (16-bit images are rescaled)."""
    image = _open(Path(path), max_pixels)
    if image.mode in ("I;16", "I;16B", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = array * (255.0 / peak)
        array = array[..., None] if channels == 1 else np.repeat(array[..., None], 3, axis=-1)
        return array.astype(np.float32)
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    return array[..., None] if channels == 1 else array


def read_raw_mask(path: Path, rgb: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Raw mask values: H x W uint8 (value masks), or H x W x 3 uint8 (palette masks, rgb=True).

    Palette-indexed PNGs ('P' mode) give their indices. An RGB mask whose channels
    differ needs a palette in the config.
    """
    image = _open(Path(path), max_pixels)
    if rgb:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if image.mode in ("L", "P"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if image.mode in ("LA", "PA"):
        return np.asarray(image, dtype=np.uint8)[..., 0]
    if image.mode in ("RGB", "RGBA"):
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
            return array[..., 0]
        raise DataError(
            f"{path}: this mask has colours but the config gives no palette. "
            "Set data.mask.palette (class name -> [r, g, b]) or save the masks as single-channel class values."
        )
    raise DataError(f"{path}: mask mode {image.mode} is not supported; save masks as 8-bit single-channel or RGB PNG.")


def write_png_atomic(array: np.ndarray, path: Path) -> None:
    """Write a uint8 array as PNG atomically (see segtrain.atomic)."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
