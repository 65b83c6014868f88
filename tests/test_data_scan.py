"""segtrain/data/scan.py: loading a pair's mask and scanning a split."""

import re

import numpy as np
import pytest
from PIL import Image

from segtrain.config import MaskConfig
from segtrain.data.discovery import find_pairs
from segtrain.data.masks import MaskMapping
from segtrain.data.scan import load_mask
from segtrain.errors import DataError
from tests.helpers import REPO, SHARED_DATASETS, write_pair


def test_size_mismatch_names_the_mask(tmp_path):
    write_pair(tmp_path, "train", "a", np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
    pair = find_pairs(tmp_path, "train")[0]
    with pytest.raises(DataError, match="a.png: mask is 9x8 but its image"):
        load_mask(pair, MaskMapping(MaskConfig(), ["a", "b"]), 10**8)


@pytest.mark.skipif(not (SHARED_DATASETS / "membrane").is_dir(), reason="shared data sets not present")
def test_membrane_mapping_makes_membrane_the_minority():
    from segtrain.config import load_config

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


def test_images_that_disagree_in_channels_are_refused_naming_both_files(tmp_path):
    from segtrain.config import DataConfig
    from segtrain.data.scan import scan_training_set

    rng = np.random.default_rng(0)
    mask = (rng.random((8, 8)) > 0.5).astype(np.uint8) * 255
    write_pair(tmp_path, "train", "a", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), mask)
    write_pair(tmp_path, "train", "b", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), mask)
    data = DataConfig(root=str(tmp_path), classes=["background", "fg"], mask=MaskConfig(threshold=127))
    assert scan_training_set(data).channels == 3  # all colour: accepted
    write_pair(tmp_path, "train", "c", rng.integers(0, 255, (8, 8), dtype=np.uint8), mask)  # one grayscale
    with pytest.raises(DataError) as info:
        scan_training_set(data)
    message = info.value.message
    assert "c.png: 1 channel (grayscale)" in message and "a.png has 3 channels (colour)" in message
    # through the command line: exit 2, one message, nothing written
    from tests.helpers import invoke, write_config

    write_pair(tmp_path, "val", "v", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), mask)
    config = write_config(tmp_path / "c.yaml", tmp_path, data={"crop": None, "classes": ["background", "fg"],
                                                              "mask": {"threshold": 127}, "batch_size": 1})
    result = invoke("fit", config, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "Traceback" not in result.output and "c.png: 1 channel" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not (SHARED_DATASETS / "camvid").is_dir(), reason="shared data sets not present")
def test_camvid_config_ignores_void_and_reads_eleven_classes():
    from segtrain.config import load_config
    from segtrain.labels import IGNORE_INDEX

    config = load_config(REPO / "configs" / "camvid.yaml")
    mapping = MaskMapping(config.data.mask, config.data.classes)
    pairs = find_pairs(config.data.root, "train")[:8]
    masks = np.stack([load_mask(p, mapping, 10**8) for p in pairs])
    raw = np.stack([np.asarray(Image.open(p.mask)) for p in pairs])
    np.testing.assert_array_equal(masks == IGNORE_INDEX, raw == 11)  # void, and only void, is ignored
    np.testing.assert_array_equal(masks[raw != 11], raw[raw != 11])  # class index = mask value
    assert len(config.data.classes) == 11 and config.data.classes[0] == "sky"


PALETTE = {"background": [0, 0, 0], "cell": [255, 0, 0], "other": [0, 255, 0]}


def _palette_dataset(root, n_train=4, size=16, seed=0):
    """RGB palette masks (black, red, green squares) beside 8-bit gray images; returns the pairs' masks."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", 1)):
        for i in range(count):
            mask = np.zeros((size, size, 3), np.uint8)
            mask[2:8, 2:8] = PALETTE["cell"]
            mask[9:14, 9:14] = PALETTE["other"]
            write_pair(root, split, f"m{i}", rng.integers(0, 255, (size, size), dtype=np.uint8), mask)
    return root


def test_stats_lists_every_unmapped_colour_of_the_data_set_in_one_error(tmp_path):
    """Anti-aliased edges in several masks: one `stats` run names every stray colour, its pixels over all masks and a
    file holding it, the most pixels first, at most ten, then how many more and the fix; exit 2, nothing written."""
    from tests.helpers import folder_digest, invoke, write_config

    root = _palette_dataset(tmp_path / "data")
    masks = root / "train" / "masks"
    for i, path in enumerate(sorted(masks.glob("*.png"))):
        mask = np.asarray(Image.open(path)).copy()
        mask[8, 2:8] = [128, 0, 0]  # a half-red edge in every mask: 6 pixels each
        mask[15, : 3 + i] = [10 + i, 10, 10]  # m0: 3 px of (10, 10, 10), m1: 4 px of (11, 10, 10), ...
        if i == 3:
            mask[0, :12] = [[200, c, 0] for c in range(12)]  # twelve one-pixel colours in m3 only
        Image.fromarray(mask).save(path)
    config = write_config(tmp_path / "c.yaml", root, data={"classes": list(PALETTE), "mask": {"palette": PALETTE},
                                                           "crop": None})
    before = folder_digest(tmp_path)
    result = invoke("stats", config)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.count("not covered by data.mask") == 1  # one error, after the whole pass
    lines = result.output.splitlines()
    head = next(i for i, line in enumerate(lines) if "not covered by data.mask" in line)
    assert f"{masks}: mask colours (128, 0, 0), (13, 10, 10), (12, 10, 10), (11, 10, 10)," in lines[head]
    assert "17 colours, 54 pixels in 4 masks" in lines[head + 1]  # 24 + 3+4+5+6 + 12
    assert lines[head + 2].strip() == f"(128, 0, 0): 24 pixels, e.g. {masks / 'm0.png'}"
    assert lines[head + 3].strip() == f"(13, 10, 10): 6 pixels, e.g. {masks / 'm3.png'}"
    assert lines[head + 5].strip() == f"(11, 10, 10): 4 pixels, e.g. {masks / 'm1.png'}"
    assert lines[head + 12].strip() == "... and 7 more (7 pixels)"
    assert "data.mask.palette" in result.output and "data.mask.ignore" in result.output
    assert folder_digest(tmp_path) == before
    # with the stray colours ignored, the same data checks out
    ignore = [[128, 0, 0]] + [[10 + i, 10, 10] for i in range(4)] + [[200, c, 0] for c in range(12)]
    fixed = write_config(tmp_path / "ok.yaml", root, data={"classes": list(PALETTE), "crop": None,
                                                           "mask": {"palette": PALETTE, "ignore": ignore}})
    result = invoke("stats", fixed)
    assert result.exit_code == 0 and "4 pairs checked" in result.output, result.output


def test_stray_values_of_one_mask_name_that_mask(tmp_path):
    from segtrain.class_weights import ClassCounter
    from segtrain.data.scan import scan_pairs

    for i in range(3):
        write_pair(tmp_path, "train", f"p{i}", np.zeros((8, 8), np.uint8), np.full((8, 8), 255 if i else 0, np.uint8))
    mask = tmp_path / "train" / "masks" / "p1.png"
    raw = np.asarray(Image.open(mask)).copy()
    raw[0, :2] = 7
    Image.fromarray(raw).save(mask)
    pairs = find_pairs(tmp_path, "train")
    with pytest.raises(DataError) as info:
        scan_pairs(pairs, MaskMapping(MaskConfig(values={0: 0, 255: 1}), ["bg", "fg"]), 1, 10**8, ClassCounter(2))
    assert info.value.message.startswith(f"{mask}: mask values 7 are not covered by data.mask")
    assert f"  7: 2 pixels, e.g. {mask}" in info.value.message


def _twelve_bit_dataset(root, n=3, size=16, seed=0):
    """16-bit gray PNGs holding 12-bit values (0..4095) and 0/255 masks."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            mask[:, 4:8] = 255
            image = rng.integers(0, 4096, (size, size)).astype(np.uint16)
            write_pair(root, split, f"t{i}", image, mask)
    return root


def test_fixed_normalization_of_12_bit_data_warns_in_stats_and_fit(tmp_path):
    from segtrain.config import load_config
    from segtrain.train import prepare_data
    from tests.helpers import invoke, make_stripes_dataset, write_config

    root = _twelve_bit_dataset(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", root, data={"crop": None, "normalize": "fixed"})
    result = invoke("stats", config)
    assert result.exit_code == 0, result.output
    warning = next(line for line in result.output.splitlines() if "data.normalize: fixed" in line)
    assert warning.startswith("warning: ") and "uint16 samples" in warning
    assert re.search(r"use only 0\.\d\.\.15\.9 of it \(6% of the scale", warning)  # 4095 * 255 / 65535 = 15.9
    assert "Set data.normalize: dataset" in warning
    # fit prints the class statistics' warnings: the same one
    assert warning[len("warning: "):] in prepare_data(load_config(config)).class_stats["warnings"]
    # with dataset statistics, or with data that fill the scale, no such warning
    result = invoke("stats", config, "--set", "data.normalize=dataset")
    assert result.exit_code == 0 and "data.normalize: fixed" not in result.output
    stripes = write_config(tmp_path / "s.yaml", make_stripes_dataset(tmp_path / "stripes"))
    result = invoke("stats", stripes)
    assert result.exit_code == 0 and "warning" not in result.output


def test_fixed_scale_warning_rules():
    from segtrain.data.normalization import PixelSampler
    from segtrain.data.scan import fixed_scale_warning

    def sampler(low, high):
        pixels = PixelSampler(1)
        pixels.add(np.linspace(low, high, 1000, dtype=np.float32)[:, None])
        return pixels

    assert "use only 0.2..49.7 of it" in fixed_scale_warning(sampler(0, 50), "uint8")  # a dark 8-bit set
    assert fixed_scale_warning(sampler(0, 200), "uint8") is None
    assert fixed_scale_warning(sampler(100, 150), "uint8") is None  # a narrow 8-bit range, but high: left alone
    assert "19% of the scale" in fixed_scale_warning(sampler(100, 150), "uint16")  # deep samples under 25%
    assert fixed_scale_warning(sampler(0, 100), "uint16") is None
    assert fixed_scale_warning(PixelSampler(1), "uint8") is None  # nothing sampled
