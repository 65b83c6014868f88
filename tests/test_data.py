import numpy as np
import pytest
from PIL import Image

from segtrain.config import MaskConfig
from segtrain.data.discovery import find_pairs
from segtrain.data.images import image_channels, read_image, read_raw_mask
from segtrain.data.masks import MaskMapping
from segtrain.data.scan import load_mask
from segtrain.errors import DataError
from segtrain.labels import IGNORE_INDEX
from tests.conftest import SHARED_DATASETS, write_pair


def test_pairs_by_stem_across_formats(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    write_pair(tmp_path, "train", "b", image, np.zeros((8, 8), np.uint8), ".jpg")
    write_pair(tmp_path, "train", "a", image, np.zeros((8, 8), np.uint8))
    pairs = find_pairs(tmp_path, "train")
    assert [p.stem for p in pairs] == ["a", "b"]
    assert pairs[1].image.suffix == ".jpg" and pairs[1].mask.suffix == ".png"


def test_missing_mask_names_the_image(tmp_path):
    write_pair(tmp_path, "train", "a", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train" / "images" / "lonely.png")
    with pytest.raises(DataError, match="lonely.png.*no mask"):
        find_pairs(tmp_path, "train")


def test_missing_image_names_the_mask(tmp_path):
    write_pair(tmp_path, "train", "a", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train" / "masks" / "orphan.png")
    with pytest.raises(DataError, match="orphan.png.*no image"):
        find_pairs(tmp_path, "train")


def test_non_image_file_is_refused_hidden_file_skipped(tmp_path):
    write_pair(tmp_path, "train", "a", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    (tmp_path / "train" / "images" / ".DS_Store").write_text("x")
    assert len(find_pairs(tmp_path, "train")) == 1
    (tmp_path / "train" / "images" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt"):
        find_pairs(tmp_path, "train")


@pytest.mark.parametrize("layout", ["no_root", "no_split", "empty"])
def test_missing_or_empty_folders(tmp_path, layout):
    root = tmp_path / "set"
    if layout != "no_root":
        root.mkdir()
    if layout == "empty":
        (root / "train" / "images").mkdir(parents=True)
        (root / "train" / "masks").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        find_pairs(root, "train")
    assert str(root) in info.value.message


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


def test_value_map_threshold_identity_and_ignore():
    raw = np.array([[0, 255, 128], [127, 0, 255]], np.uint8)
    inverted = MaskMapping(MaskConfig(values={0: 1, 255: 0}, ignore=[128, 127]), ["cell", "membrane"])
    assert inverted.to_classes(raw).tolist() == [[1, 0, IGNORE_INDEX], [IGNORE_INDEX, 1, 0]]
    threshold = MaskMapping(MaskConfig(threshold=127), ["bg", "road"])
    assert threshold.to_classes(raw).tolist() == [[0, 1, 1], [0, 0, 1]]
    identity = MaskMapping(MaskConfig(ignore=[255]), ["a", "b", "c"])
    assert identity.to_classes(np.array([[0, 1, 2, 255]], np.uint8)).tolist() == [[0, 1, 2, IGNORE_INDEX]]


def test_unmapped_values_name_file_and_values():
    mapping = MaskMapping(MaskConfig(values={0: 0, 255: 1}), ["bg", "fg"])
    with pytest.raises(DataError, match=r"m\.png: mask values 7, 9 are not covered"):
        mapping.to_classes(np.array([[0, 7, 9]], np.uint8), "m.png")


def test_palette_round_trip_and_unknown_colour():
    mapping = MaskMapping(MaskConfig(palette={"bg": [0, 0, 0], "car": [255, 0, 0]}, ignore=[[9, 9, 9]]), ["bg", "car"])
    raw = np.array([[[0, 0, 0], [255, 0, 0], [9, 9, 9]]], np.uint8)
    classes = mapping.to_classes(raw)
    assert classes.tolist() == [[0, 1, IGNORE_INDEX]]
    assert mapping.encode(np.array([[0, 1]])).tolist() == [[[0, 0, 0], [255, 0, 0]]]
    with pytest.raises(DataError, match=r"colour \(1, 2, 3\)"):
        mapping.to_classes(np.array([[[1, 2, 3]]], np.uint8), "p.png")


def test_encode_round_trips_every_class_with_ignore():
    for mask in (MaskConfig(threshold=127, ignore=[255]), MaskConfig(values={0: 1, 255: 0}, ignore=[128]),
                 MaskConfig(ignore=[255])):
        mapping = MaskMapping(mask, ["a", "b"])
        classes = np.array([[0, 1]])
        assert mapping.to_classes(mapping.encode(classes)).tolist() == classes.tolist()


def test_encode_inverts_the_value_map():
    mapping = MaskMapping(MaskConfig(values={0: 1, 255: 0}), ["cell", "membrane"])
    assert mapping.encode(np.array([[0, 1]])).tolist() == [[255, 0]]
    assert MaskMapping(MaskConfig(threshold=127), ["a", "b"]).encode(np.array([[0, 1]])).tolist() == [[0, 255]]


def test_rgb_mask_without_palette(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8)).save(path)
    with pytest.raises(DataError, match="palette"):
        read_raw_mask(path, rgb=False)
    gray = tmp_path / "g.png"
    Image.fromarray(np.array([[[7, 7, 7], [0, 0, 0]]], np.uint8)).save(gray)
    assert read_raw_mask(gray, rgb=False).tolist() == [[7, 0]]


def test_size_mismatch_names_the_mask(tmp_path):
    write_pair(tmp_path, "train", "a", np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
    pair = find_pairs(tmp_path, "train")[0]
    with pytest.raises(DataError, match="a.png: mask is 9x8 but its image"):
        load_mask(pair, MaskMapping(MaskConfig(), ["a", "b"]), 10**8)


@pytest.mark.skipif(not (SHARED_DATASETS / "membrane").is_dir(), reason="shared data sets not present")
def test_membrane_mapping_makes_membrane_the_minority():
    from segtrain.config import load_config
    from tests.conftest import REPO

    config = load_config(REPO / "configs" / "membrane.yaml")
    mapping = MaskMapping(config.data.mask, config.data.classes)
    pairs = find_pairs(config.data.root, "train")[:6]
    masks = [load_mask(p, mapping, 10**8) for p in pairs]
    fraction = np.mean([np.mean(m == config.data.classes.index("membrane")) for m in masks])
    assert 0.15 < fraction < 0.30  # about 22% of pixels are membrane


def test_scan_decodes_images_and_reports_the_first_bad_pair(tmp_path):
    from segtrain.class_weights import ClassCounter
    from segtrain.data.scan import scan_pairs

    rng = np.random.default_rng(0)
    for i in range(5):
        noise = rng.integers(0, 255, (64, 64)).astype(np.uint8)  # incompressible: a long pixel stream
        write_pair(tmp_path, "train", f"p{i}", noise, np.zeros((64, 64), np.uint8))
    pairs = find_pairs(tmp_path, "train")
    mapping = MaskMapping(MaskConfig(threshold=127), ["bg", "fg"])
    counter = ClassCounter(2)
    scan_pairs(pairs, mapping, 1, 10**8, counter)
    assert counter.counts.tolist() == [5 * 64 * 64, 0]
    image = tmp_path / "train" / "images" / "p3.png"
    image.write_bytes(image.read_bytes()[:2000])  # header intact, pixel data truncated
    with pytest.raises(DataError, match="p3.png"):
        scan_pairs(pairs, mapping, 1, 10**8, ClassCounter(2))


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
