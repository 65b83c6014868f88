"""segtrain/planning/fingerprint.py (after raw.py): raw mask values over a split, then per-class statistics."""

import json

import numpy as np
import pytest
from PIL import Image

from segtrain.errors import DataError
from segtrain.planning.fingerprint import fingerprint
from tests.helpers import write_pair


def _dataset(root, masks, images=None, split="train", image_ext=".png"):
    """Pairs img00.. of `masks` (each H x W, or H x W x 3), with mid-grey noise images unless `images` are given."""
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        image = images[i] if images is not None else rng.integers(40, 220, mask.shape[:2] + (3,), dtype=np.uint8)
        write_pair(root, split, f"img{i:02d}", image, mask, image_ext)
    return root


def _fp(root, **kwargs):
    return fingerprint(root, progress=False, **kwargs)


def test_raw_values_shares_presence_and_json(tmp_path):
    masks = []
    for i in range(4):
        mask = np.zeros((32, 32), np.uint8)
        if i < 2:
            mask[4:12, 4:12] = 255  # 64 px in two of the four images
        masks.append(mask)
    fp = _fp(_dataset(tmp_path / "d", masks))
    assert fp.raw.kind == "values" and fp.raw.bits == 8
    assert fp.raw.counts == {0: 4 * 1024 - 128, 255: 128}
    bg, fg = fp.classes
    assert (bg.name, fg.name) == ("background", "foreground")
    assert fg.pixels == 128 and fg.images == 2 and bg.images == 4
    assert fg.share == pytest.approx(128 / 4096)
    assert fg.objects == 2 and fg.area_median == pytest.approx(64, rel=0.1)
    assert fp.pairs == 4 and fp.val_split is None and fp.channels == 3 and fp.sample_type == "uint8"
    assert fp.median_height == 32 and fp.median_width == 32
    text = json.dumps(fp.to_dict())  # JSON-serialisable as it is
    assert json.loads(text)["classes"][1]["images"] == 2


def test_objects_are_8_connected_and_widths_are_inscribed_diameters(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[2:23, 2:23] = 1  # a 21 x 21 square: the largest disc inside is 21 px across
    mask[40:43, 40:43] = 1  # a 3 x 3 square ...
    mask[43:46, 43:46] = 1  # ... touching another one at a corner: one 8-connected object
    mask[50:60, 10:13] = 1  # a bar 3 px wide
    fp = _fp(_dataset(tmp_path / "d", [mask, np.zeros((64, 64), np.uint8)]))
    fg = fp.classes[1]
    assert fg.objects == 3
    assert fg.width_max == 21
    assert fg.width_p90 == 21  # most of the class's pixels are in the big square
    assert fg.area_max == 21 * 21


@pytest.mark.parametrize("width", [1, 3, 7])
def test_thickness_of_lines(tmp_path, width):
    masks = []
    for i in range(2):
        mask = np.zeros((64, 64), np.uint8)
        for x in (10, 30, 50):
            mask[:, x : x + width] = 255
        masks.append(mask)
    fg = _fp(_dataset(tmp_path / "d", masks)).classes[1]
    assert fg.thickness_median == width
    assert fg.thickness_p95 == width


def test_crop_presence_and_mean_row(tmp_path):
    masks = []
    for _ in range(3):
        mask = np.zeros((256, 256), np.uint8)
        mask[0:8, 0:8] = 1  # one small object in the top-left corner
        masks.append(mask)
    fg = _fp(_dataset(tmp_path / "d", masks)).classes[1]
    # positions of a side-s crop (257 - s per axis) whose window holds the corner object: (8 + s - 1) ... clipped,
    # i.e. those starting in rows/columns 0..7: about (8 / (257 - s))**2, on a grid of 4 px cells
    assert fg.crop_presence_at(128) == pytest.approx((8 / 129) ** 2, abs=0.01)
    assert fg.crop_presence_at(256) == 1.0  # the crop is the whole image
    assert fg.crop_presence_at(1024) == 1.0
    assert 0.0 < fg.crop_presence_at(160) < fg.crop_presence_at(192) < 1.0
    assert fg.mean_row < 0.05  # at the top


def test_a_class_spanning_every_row_is_centred(tmp_path):
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 18:22] = 255  # a vertical line spans every row
    fg = _fp(_dataset(tmp_path / "d", [mask])).classes[1]
    assert fg.mean_row == pytest.approx(0.5, abs=0.01)


def test_colour_masks_are_read_as_colours(tmp_path):
    masks = []
    for i in range(2):
        mask = np.zeros((16, 16, 3), np.uint8)
        mask[:8, :, 0] = 255  # red top half
        mask[12:, :, 1] = 255  # green bottom band
        masks.append(mask)
    fp = _fp(_dataset(tmp_path / "d", masks))
    assert fp.raw.kind == "colours"
    assert fp.raw.counts == {(255, 0, 0): 256, (0, 0, 0): 128, (0, 255, 0): 128}
    assert [c.pixels for c in fp.classes] == [128, 256, 128]  # black first (class 0), then by share


def test_grey_masks_saved_as_rgb_are_values(tmp_path):
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[:4] = 255
    fp = _fp(_dataset(tmp_path / "d", [mask]))
    assert fp.raw.kind == "values" and fp.raw.counts == {0: 192, 255: 64}


def test_16_bit_images_and_masks(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(1000, 3000, (16, 16), dtype=np.uint16)  # 12-bit-like data in a 16-bit file
    mask = np.zeros((16, 16), np.uint16)
    mask[:4] = 1000
    (tmp_path / "d/train/images").mkdir(parents=True)
    (tmp_path / "d/train/masks").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "d/train/images/a.png")
    Image.fromarray(mask).save(tmp_path / "d/train/masks/a.png")
    fp = _fp(tmp_path / "d")
    assert fp.sample_type == "uint16" and fp.channels == 1
    assert fp.raw.bits == 16 and fp.raw.counts == {0: 192, 1000: 64}
    # read on the fixed 16-bit scale: 1000..3000 -> about 3.9..11.7 of 0..255
    assert 3 < fp.intensity["low"][0] < fp.intensity["high"][0] < 12


def test_pixel_sample_is_seeded(tmp_path):
    rng = np.random.default_rng(2)
    masks = [np.where(rng.random((300, 300)) > 0.5, 255, 0).astype(np.uint8) for _ in range(2)]
    root = _dataset(tmp_path / "d", masks)
    a, b = _fp(root), _fp(root)
    assert a.intensity == b.intensity
    assert a.intensity["pixels_sampled"] == 2 * 20_000  # PixelSampler's per-image sample, not every pixel


def test_val_split_is_found_and_counted(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:2] = 255
    root = _dataset(tmp_path / "d", [mask, mask])
    _dataset(root, [mask], split="val")
    fp = _fp(root)
    assert fp.val_split == "val" and fp.val_pairs == 1 and fp.val_pixel_count == 64


def test_missing_root_and_odd_channels_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere: data set folder not found"):
        _fp(tmp_path / "nowhere")
    mask = np.zeros((8, 8), np.uint8)
    mask[:2] = 255
    root = _dataset(tmp_path / "d", [mask, mask],
                    images=[np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(DataError, match="img01.png: 1 channel"):
        _fp(root)


def test_one_mask_value_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="only one class"):
        _fp(_dataset(tmp_path / "d", [np.zeros((8, 8), np.uint8)]))
