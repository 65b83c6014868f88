"""Reading images and raw masks from disk with Pillow, with clear errors for bad files.

Image values (`read_image`) always come out in the range of 8-bit data, 0..255 (the model
rescales that to [-1, 1]), by one fixed rule per sample type, never by an image's own
content, so the same stored value gives the same model input in every image of a data set:

```
8-bit and 1-bit images (L, RGB, P, ...)    v                   (as they are)
unsigned integers of b bits (I;16*, ...)   v * 255 / (2**b - 1)  (16-bit: v * 255 / 65535)
signed integers of b bits                  v * 255 / (2**(b-1) - 1)  (0 stays 0, negatives < 0)
floating point (mode F)                    v * 255             ([0, 1] -> 0..255)
```
b and the sign are the file's declared sample type: a TIFF's BitsPerSample / SampleFormat
(int16, uint16, 12-bit, int32 and uint32 TIFFs alike; Pillow keeps uint32 values above
2**31 - 1 only wrapped), 16 bits unsigned for any other 16-bit file (Pillow's `I;16`,
`I;16B`, `I;16L`, ... modes: PNG, ...) and for 16-bit PGM (Pillow stretches it to
0..65535), otherwise 32 bits signed (Pillow's `I`). Values outside the range (floats
outside [0, 1], negative integers) are passed on unclipped. Every 16-bit, 32-bit and float
mode is one channel.

TIFFs that Pillow cannot read right are read with tifffile, by the same rule from their declared
BitsPerSample / SampleFormat: more than one sample per pixel with samples of more than 8 bits or
floats (16-bit RGB, float multi-band), bands that are no RGB/YCbCr/CMYK/gray(+alpha) set
(multispectral: 4-8 bands stored interleaved H x W x C or planar C x H x W, or an RGB file with
non-alpha extra samples), several equal-size pages of one band each (a C x H x W stack: the pages
are the channels), float64 and int8 samples. Alpha samples are dropped. Such files have as many
channels as bands (`image_channels`), and a model reads them all; tifffile decodes uncompressed,
Deflate and PackBits data itself, LZW, JPEG and others only with the `imagecodecs` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

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


_GRAY_MODES = ("1", "L", "LA", "La", "I", "F")


def _is_gray(mode: str) -> bool:
    """Single-channel Pillow modes, every 16-bit one (`I;16`, `I;16B`, `I;16L`, `I;16N`) included."""
    return mode in _GRAY_MODES or mode.startswith("I;16")


def _tag(image: Image.Image, number: int, default: int) -> int:
    value = image.tag_v2.get(number, default)
    return int(value[0] if isinstance(value, tuple) else value)


def _integer_peak(image: Image.Image) -> float:
    """The value that maps to 255: the largest value of the file's integer sample type."""
    if getattr(image, "tag_v2", None) is not None:  # a TIFF: its declared samples
        bits = _tag(image, 258, 1)  # BitsPerSample
        signed = _tag(image, 339, 1) == 2  # SampleFormat: 1 unsigned, 2 signed
        if 1 < bits <= 32:
            return float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    if image.mode.startswith("I;16") or image.format == "PPM":
        return 65535.0
    return float(2**31 - 1)


# ---------------------------------------------------------------------------- TIFFs through tifffile

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_ALPHA = (1, 2)  # ExtraSamples: associated, unassociated alpha
_COLOUR_SAMPLES = {"RGB": 3, "YCBCR": 3, "SEPARATED": 4, "MINISBLACK": 1, "MINISWHITE": 1}
"""Photometric interpretations Pillow reads from 8-bit samples, and their colour samples besides alpha."""


class _TiffLayout(NamedTuple):
    """A TIFF read by tifffile: its size, bands and sample type."""

    height: int
    width: int
    channels: int
    peak: float
    """The value that maps to 255 (1 for floats)."""
    sample_type: str


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _tiff_peak(bits: int, sample_format: int) -> float:
    if sample_format == 3:  # IEEE float
        return 1.0
    if bits <= 1:
        return 1.0
    return float(2 ** (bits - 1) - 1 if sample_format == 2 else 2**bits - 1)


def _tiff_sample_type(bits: int, sample_format: int) -> str:
    if sample_format == 3:
        return "float32"
    if sample_format != 2 and bits <= 8:
        return "uint8"
    return f"uint{bits}" if sample_format != 2 and bits <= 16 else "int32"


def _tiff_band_axes(series) -> tuple[str, list[str]]:
    """The series' axes and those that are neither Y nor X (at most one: the bands)."""
    axes = series.axes
    return axes, [a for a in axes if a not in "YX"]


def _pillow_reads(page, bands: list[str]) -> bool:
    """Whether Pillow reads this TIFF right (then it keeps doing so): one band of a type it knows, or 8-bit
    unsigned RGB, YCbCr, CMYK or gray samples with alpha extras only."""
    bits, sample_format = int(page.bitspersample), int(page.sampleformat)
    if not bands:
        return not ((sample_format == 3 and bits != 32) or (sample_format == 2 and bits == 8))
    if bands != ["S"] or bits != 8 or sample_format != 1:
        return False
    extras = [int(e) for e in page.extrasamples]
    colour = _COLOUR_SAMPLES.get(page.photometric.name)
    return colour is not None and all(e in _ALPHA for e in extras) and int(page.samplesperpixel) == colour + len(extras)


def _tiff_layout(path: Path, tif=None) -> Optional[_TiffLayout]:
    """The layout of a TIFF that tifffile reads (module doc); None for every other file (Pillow reads it)."""
    if tif is None:
        if not _is_tiff(path):
            return None
        import tifffile

        try:
            with tifffile.TiffFile(path) as opened:
                return _tiff_layout(path, opened)
        except (OSError, ValueError, KeyError, IndexError, RuntimeError, tifffile.TiffFileError):
            return None  # not a TIFF tifffile understands: Pillow gives the error
    series = tif.series[0]
    page = series.keyframe
    axes, bands = _tiff_band_axes(series)
    if "Y" not in axes or "X" not in axes:
        return None
    if _pillow_reads(page, bands):
        return None
    if len(bands) > 1:
        raise DataError(f"{path}: a TIFF of axes {axes} (shape {tuple(series.shape)}) has more than one axis besides "
                        "height and width; store one image per file, with its bands interleaved (H x W x C), as "
                        "separate planes (C x H x W) or one page per band.")
    shape = dict(zip(axes, series.shape))
    channels = shape[bands[0]] if bands else 1
    if bands == ["S"]:
        channels -= sum(int(e) in _ALPHA for e in page.extrasamples)
    bits, sample_format = int(page.bitspersample), int(page.sampleformat)
    return _TiffLayout(shape["Y"], shape["X"], channels, _tiff_peak(bits, sample_format),
                       _tiff_sample_type(bits, sample_format))


def _read_tiff(path: Path, max_pixels: int) -> Optional[np.ndarray]:
    """An H x W x C float64 array on the 8-bit scale for a TIFF that tifffile reads; None for other files."""
    if not _is_tiff(path):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            layout = _tiff_layout(path, tif)
            if layout is None:
                return None
            if layout.width * layout.height > max_pixels:
                raise _too_large(path, layout.width, layout.height, max_pixels)
            series = tif.series[0]
            axes, bands = _tiff_band_axes(series)
            array = series.asarray()
    except DataError:
        raise
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, MemoryError, tifffile.TiffFileError) as exc:
        hint = " (pip install imagecodecs decodes it)" if "imagecodecs" in str(exc) else ""
        raise DataError(f"{path}: cannot read the TIFF ({exc}){hint}. Replace or convert the file.") from None
    order = [axes.index("Y"), axes.index("X")] + [axes.index(b) for b in bands]
    array = np.transpose(array, order)
    if array.ndim == 2:
        array = array[..., None]
    if bands == ["S"]:
        page = series.keyframe
        extras = [int(e) for e in page.extrasamples]
        first_extra = int(page.samplesperpixel) - len(extras)
        keep = [c for c in range(array.shape[-1]) if c < first_extra or extras[c - first_extra] not in _ALPHA]
        array = array[..., keep]
    return array.astype(np.float64) * (255.0 / layout.peak)


def _channels_of(array: np.ndarray, channels: int, path: Path) -> np.ndarray:
    """An H x W x C image with the `channels` a model reads: gray repeated to RGB, RGB to gray by Pillow's luma
    weights; any other difference is refused."""
    have = array.shape[-1]
    if have == channels:
        return array
    if have == 1 and channels == 3:
        return np.repeat(array, 3, axis=-1)
    if have == 3 and channels == 1:
        return (array @ np.array([0.299, 0.587, 0.114]))[..., None]
    raise DataError(f"{path}: the image has {have} channel(s), but the data set's images (and the model) have "
                    f"{channels}. Give every image the same bands.")


# ---------------------------------------------------------------------------- any image


def image_channels(path: Path) -> int:
    """1 for grayscale (every 16-bit, 32-bit and float mode), 3 for colour (alpha dropped), the number of bands for
    a TIFF that tifffile reads (module doc); from the header."""
    layout = _tiff_layout(Path(path))
    if layout is not None:
        return layout.channels
    try:
        with Image.open(path) as image:
            return 1 if _is_gray(image.mode) else 3
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc}). Replace or remove the corrupt file.") from None


def image_sample_type(path: Path) -> str:
    """The file's sample type as an export would take it: "uint8", "uint<b>" (b-bit unsigned, 9 <= b <= 16: "uint16",
    "uint12", ...), "float32" or "int32"."""
    layout = _tiff_layout(Path(path))
    if layout is not None:
        return layout.sample_type
    try:
        with Image.open(path) as image:
            if image.mode == "F":
                return "float32"
            if image.mode.startswith("I;16") or image.mode == "I":
                peak = _integer_peak(image)  # 2**b - 1 for b-bit unsigned samples (12-bit TIFFs: 4095)
                bits = int(np.log2(peak + 1.0)) if peak >= 255 else 0
                if 8 < bits <= 16 and 2.0**bits - 1 == peak:
                    return f"uint{bits}"
            return "int32" if image.mode == "I" else "uint8"
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc}). Replace or remove the corrupt file.") from None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) read from the header only."""
    layout = _tiff_layout(Path(path))
    if layout is not None:
        return layout.height, layout.width
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc}). Replace or remove the corrupt file.") from None
    return height, width


def read_image(path: Path, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An H x W x channels float32 array in the range of 8-bit data, 0..255.

    16-bit, 32-bit and float images are scaled by their sample type's fixed rule (module
    doc), never by their own maximum. A gray image is repeated for 3 channels and a colour one
    made gray for 1; an image with another number of bands than `channels` is refused.
    """
    path = Path(path)
    array = _read_tiff(path, max_pixels)
    if array is not None:
        return _channels_of(array, channels, path).astype(np.float32)
    image = _open(path, max_pixels)
    if image.mode == "F" or image.mode == "I" or image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64)
        peak = 1.0 if image.mode == "F" else _integer_peak(image)
        array = array * (255.0 / peak)
        return _channels_of(array[..., None], channels, path).astype(np.float32)
    if channels not in (1, 3):
        _channels_of(np.zeros((1, 1, 1 if _is_gray(image.mode) else 3)), channels, path)  # refused: names the file
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    return array[..., None] if channels == 1 else array


def as_model_input(image, channels: int) -> np.ndarray:
    """An in-memory image as `read_image` gives a file: H x W x channels float32 on the 8-bit scale, 0..255.

    uint8 is taken as it is, other integer types are scaled by their type's range (uint16 by
    255 / 65535), floats by 255 (the [0, 1] range of a float TIFF), as for files. An H x W or
    H x W x 1 image is repeated to three channels for an RGB model; an RGB(A) image becomes
    gray by Pillow's luma weights for a one-channel model; an alpha channel is dropped. A model of
    another band count (multispectral) takes H x W x channels arrays only.
    """
    array = np.asarray(image)
    if channels not in (1, 3):
        if array.ndim != 3 or array.shape[-1] != channels:
            raise DataError(f"expected an image array H x W x {channels} (the model's bands), got shape {array.shape}.")
    elif array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise DataError(f"expected an image array H x W or H x W x 1/3/4, got shape {array.shape}.")
    if array.dtype == np.uint8:
        scaled = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        scaled = array.astype(np.float64) * (255.0 / np.iinfo(array.dtype).max)
    else:
        scaled = array.astype(np.float64) * 255.0
    if scaled.ndim == 2:
        scaled = scaled[..., None]
    if channels not in (1, 3):
        return scaled.astype(np.float32)
    scaled = scaled[..., :3]
    if channels == 1 and scaled.shape[-1] == 3:
        scaled = (scaled @ np.array([0.299, 0.587, 0.114]))[..., None]
    elif channels == 3 and scaled.shape[-1] == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    return scaled.astype(np.float32)


def read_raw_mask(path: Path, rgb: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Raw mask values: H x W uint8 (value masks), H x W uint16 (16-bit value masks: PNG, TIFF), or H x W x 3
    uint8 (palette masks, rgb=True).

    Palette-indexed PNGs ('P' mode) give their indices. An RGB mask whose channels
    differ needs a palette in the config. A 32-bit integer mask is read if its values fit 0..65535.
    """
    image = _open(Path(path), max_pixels)
    if rgb:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if image.mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{path}: mask values {int(values.min())}..{int(values.max())} do not fit 0..65535; save "
                            "masks as 8-bit or 16-bit single-channel class values.")
        return values.astype(np.uint16)
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
    raise DataError(f"{path}: mask mode {image.mode} is not supported; save masks as 8-bit or 16-bit single-channel "
                    "or RGB PNG.")


def write_png_atomic(array: np.ndarray, path: Path) -> None:
    """Write a uint8 array (or a uint16 H x W one, as 16-bit PNG) as PNG atomically (see segtrain.atomic)."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
