"""TIFFs that Pillow cannot read right, through tifffile: multispectral (interleaved, planar, one page per band),
16-bit multi-channel and float multi-band, scaled by their sample type's fixed rule (segtrain/data/images.py)."""

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from segtrain.data.images import image_channels, image_sample_type, image_size, read_image
from segtrain.errors import DataError
from tests.helpers import invoke, write_config

RNG = np.random.default_rng(5)
BANDS = RNG.integers(0, 65536, (6, 7, 5)).astype(np.uint16)  # H x W x C


@pytest.mark.parametrize("layout", ["interleaved", "planar", "pages"])
def test_five_band_uint16_tiff_reads_every_band_scaled_by_65535(tmp_path, layout):
    path = tmp_path / "ms.tif"
    if layout == "interleaved":  # H x W x C, samples interleaved in one page
        tifffile.imwrite(path, BANDS, photometric="minisblack", planarconfig="contig")
    elif layout == "planar":  # C x H x W, one plane per sample in one page
        tifffile.imwrite(path, BANDS.transpose(2, 0, 1), photometric="minisblack", planarconfig="separate")
    else:  # C x H x W as one page per band (tifffile's default for a 3-d array)
        tifffile.imwrite(path, BANDS.transpose(2, 0, 1))
    assert image_channels(path) == 5 and image_size(path) == (6, 7) and image_sample_type(path) == "uint16"
    got = read_image(path, 5)
    assert got.shape == (6, 7, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, BANDS * 255.0 / 65535, rtol=1e-6)
    with pytest.raises(DataError, match=r"ms.tif: the image has 5 channel\(s\), but .* have 3"):
        read_image(path, 3)
    with pytest.raises(DataError, match="ms.tif: 7x6 = 42 pixels is more than data.max_image_pixels = 41"):
        read_image(path, 5, max_pixels=41)


def test_float_and_signed_multi_band_tiffs_keep_their_real_range(tmp_path):
    floats = RNG.uniform(-0.5, 2.0, (4, 5, 4)).astype(np.float32)  # outside [0, 1] passes on unclipped
    tifffile.imwrite(tmp_path / "f.tif", floats, photometric="minisblack", planarconfig="contig")
    assert image_channels(tmp_path / "f.tif") == 4 and image_sample_type(tmp_path / "f.tif") == "float32"
    np.testing.assert_allclose(read_image(tmp_path / "f.tif", 4), floats * 255.0, rtol=1e-6)
    signed = RNG.integers(-32768, 32768, (3, 4, 6)).astype(np.int16).transpose(2, 0, 1)  # C x H x W
    tifffile.imwrite(tmp_path / "i.tif", signed, photometric="minisblack", planarconfig="separate")
    np.testing.assert_allclose(read_image(tmp_path / "i.tif", 6), signed.transpose(1, 2, 0) * 255.0 / 32767,
                               rtol=1e-6)
    doubles = floats[..., 0].astype(np.float64)  # one band of float64: Pillow cannot open it
    tifffile.imwrite(tmp_path / "d.tif", doubles)
    np.testing.assert_allclose(read_image(tmp_path / "d.tif", 1)[..., 0], doubles * 255.0, rtol=1e-6)


def test_16_bit_rgb_tiff_is_scaled_not_truncated_and_alpha_is_dropped(tmp_path):
    rgba = RNG.integers(0, 65536, (5, 4, 4)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", rgba[..., :3], photometric="rgb")
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    for name in ("rgb.tif", "rgba.tif"):
        assert image_channels(tmp_path / name) == 3
        np.testing.assert_allclose(read_image(tmp_path / name, 3), rgba[..., :3] * 255.0 / 65535, rtol=1e-6)
    gray = read_image(tmp_path / "rgb.tif", 1)[..., 0]  # a one-channel model: Pillow's luma weights
    np.testing.assert_allclose(gray, rgba[..., :3] @ np.array([0.299, 0.587, 0.114]) * 255.0 / 65535, rtol=1e-6)


def test_8_bit_rgb_and_gray_tiffs_still_read_by_pillow(tmp_path):
    rgb = RNG.integers(0, 256, (5, 4, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.tif", compression="tiff_lzw")  # LZW: tifffile alone cannot
    assert image_channels(tmp_path / "rgb.tif") == 3 and image_sample_type(tmp_path / "rgb.tif") == "uint8"
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif", 3), rgb)
    with pytest.raises(DataError, match=r"rgb.tif: the image has 3 channel\(s\), but .* have 5"):
        read_image(tmp_path / "rgb.tif", 5)


def test_a_tiff_with_two_band_axes_is_refused_naming_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "cube.tif", RNG.integers(0, 255, (2, 3, 4, 5)).astype(np.uint16),
                     photometric="minisblack")
    with pytest.raises(DataError, match="cube.tif: a TIFF of axes"):
        image_channels(tmp_path / "cube.tif")


def test_a_five_band_uint16_tiff_data_set_trains_and_predicts(tmp_path, float32_policy):
    import segtrain

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, count in (("train", 3), ("val", 1)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((16, 16), np.uint8)
            mask[:, 4 + 3 * i : 8 + 3 * i] = 255
            bands = rng.integers(0, 20000, (5, 16, 16)).astype(np.uint16)
            bands[3][mask > 0] += 40000  # the stripes show in band 4 only
            tifffile.imwrite(root / split / "images" / f"t{i}.tif", bands, photometric="minisblack",
                             planarconfig="separate")
            Image.fromarray(mask).save(root / split / "masks" / f"t{i}.png")
    config = write_config(tmp_path / "c.yaml", root, data={"crop": 16, "batch_size": 2, "normalize": "dataset"},
                          train={"epochs": 1, "steps_per_epoch": 2})
    run = tmp_path / "run"
    result = invoke("fit", config, "--out", run)
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["in_channels"] == 5 and info["input_sample_type"] == "uint16"
    assert len(json.loads((run / "class_stats.json").read_text())["normalization"]["mean"]) == 5

    out = tmp_path / "pred"
    result = invoke("predict", run, root / "val" / "images", "--out", out, "--overlay")
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(out / "t0.png"))
    assert mask.shape == (16, 16) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(out / "t0_overlay.png")).shape == (16, 16, 3)
    # the API takes an H x W x 5 array as the files are read
    image = tifffile.imread(root / "val" / "images" / "t0.tif").transpose(1, 2, 0)
    prediction = segtrain.load(run).predict(image)
    np.testing.assert_array_equal(prediction.mask, mask)
