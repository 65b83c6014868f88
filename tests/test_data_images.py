"""segtrain/data/images.py: reading images (bit depths, pixel limit, corrupt files) and raw masks."""

import numpy as np
import pytest
from PIL import Image

from segtrain.data.images import image_channels, read_image, read_raw_mask
from segtrain.errors import DataError


def test_corrupt_image_is_a_data_error(tmp_path):
    path = tmp_path / "bad.png"
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(good)
    path.write_bytes(good.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match="bad.png"):
        read_image(path, 1)


def test_decompression_bomb_guard(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(path)
    with pytest.raises(DataError, match="max_image_pixels"):
        read_image(path, 1, max_pixels=1000)


def test_rgb_mask_without_palette(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8)).save(path)
    with pytest.raises(DataError, match="palette"):
        read_raw_mask(path, rgb=False)
    gray = tmp_path / "g.png"
    Image.fromarray(np.array([[[7, 7, 7], [0, 0, 0]]], np.uint8)).save(gray)
    assert read_raw_mask(gray, rgb=False).tolist() == [[7, 0]]


def test_pixel_limit_is_exact(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)
    assert read_image(path, 1, max_pixels=100).shape == (10, 10, 1)
    with pytest.raises(DataError, match="10x10 = 100 pixels is more than data.max_image_pixels = 99"):
        read_image(path, 1, max_pixels=99)


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")])
def test_16_bit_images_are_one_channel_scaled_by_65535(tmp_path, mode, dtype):
    # Big-endian 16-bit TIFFs open as Pillow mode I;16B, which was taken for colour.
    values = np.array([[0, 1, 257, 1000], [32768, 40000, 65534, 65535]], np.uint16)
    path = tmp_path / "img.tif"
    Image.frombytes(mode, (4, 2), values.astype(dtype).tobytes()).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I;16")
        if mode == "I;16B":
            assert opened.mode == "I;16B"
    assert image_channels(path) == 1
    got = read_image(path, 1)
    assert got.shape == (2, 4, 1) and got.dtype == np.float32
    # By hand: v * 255 / 65535 = v / 257, so 257 -> 1, 65535 -> 255, 32768 -> 127.502
    expected = np.array([[0, 1 / 257, 1, 1000 / 257], [32768 / 257, 40000 / 257, 65534 / 257, 255]])
    np.testing.assert_allclose(got[..., 0], expected, rtol=1e-6)
    np.testing.assert_allclose(read_image(path, 3), np.repeat(got, 3, axis=-1))


def test_16_bit_png_is_scaled_like_8_bit(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(path)
    assert image_channels(path) == 1
    np.testing.assert_allclose(read_image(path, 1)[..., 0], [[0, 100, 255]], rtol=1e-6)


@pytest.mark.parametrize(
    "dtype, peak",
    [
        (np.float32, 1.0),  # floats: [0, 1] -> 0..255, values above 1 pass on
        (np.int32, 2**31 - 1),  # 32-bit signed integers: the int32 range
    ],
)
def test_32_bit_images_are_scaled_by_their_type_not_their_maximum(tmp_path, dtype, peak):
    # Two scenes with different maxima: a stored value v must give the same input in both.
    # (Floats up to 2.0: an image whose maximum exceeds 1 was stretched by its maximum.)
    scale = 2.0 if dtype == np.float32 else 10**6
    dim = np.array([[0.1, 0.2], [0.05, 0.0]]) * scale
    bright = np.array([[0.1, 0.9], [0.4, 1.0]]) * scale
    arrays = []
    for name, values in (("dim", dim), ("bright", bright)):
        path = tmp_path / f"{name}.tif"
        Image.fromarray(values.astype(dtype)).save(path)
        with Image.open(path) as opened:
            assert opened.mode == ("F" if dtype == np.float32 else "I")
        assert image_channels(path) == 1
        arrays.append(read_image(path, 1)[..., 0])
    got_dim, got_bright = arrays
    assert got_dim[0, 0] == got_bright[0, 0]  # the same stored value 0.1 * scale
    np.testing.assert_allclose(got_dim, dim.astype(dtype) * 255.0 / peak, rtol=1e-6)
    np.testing.assert_allclose(got_bright, bright.astype(dtype) * 255.0 / peak, rtol=1e-6)
    # The ratio of values within and across images is kept (no per-image stretch).
    assert got_bright[1, 1] / got_dim[0, 1] == pytest.approx(1.0 / 0.2)


def _write_int16_tiff(path, values):
    """A minimal little-endian TIFF of signed 16-bit samples (Pillow cannot write one)."""
    import struct

    height, width = values.shape
    data = values.astype("<i2").tobytes()
    entries = [(256, 3, width), (257, 3, height), (258, 3, 16), (259, 3, 1), (262, 3, 1),
               (273, 4, 0), (277, 3, 1), (278, 3, height), (279, 4, len(data)), (339, 3, 2)]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data)


def test_signed_16_bit_tiff_is_scaled_by_its_declared_type(tmp_path):
    # Pillow opens int16 TIFFs as 32-bit "I"; the header says 16-bit signed: v * 255 / 32767.
    path = tmp_path / "dem.tif"
    values = np.array([[-20000, -1000, 0], [1, 8000, 16384]], np.int16)  # max is not 32767
    _write_int16_tiff(path, values)
    with Image.open(path) as opened:
        assert opened.mode == "I"
    assert image_channels(path) == 1
    np.testing.assert_allclose(read_image(path, 1)[..., 0], values * 255.0 / 32767, rtol=1e-6)
