"""segtrain/data/scan.py: loading a pair's mask and scanning a split."""

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
