"""16-bit label masks: raw values above 255 mapped by data.mask (values, ignore, threshold, identity), and
predictions written back as 16-bit PNG when a class's raw value exceeds 255."""

import json

import numpy as np
import pytest
from PIL import Image

from segtrain.config import MaskConfig
from segtrain.data.images import read_raw_mask
from segtrain.data.masks import MaskMapping
from segtrain.errors import DataError
from segtrain.labels import IGNORE_INDEX
from tests.helpers import invoke, make_stripes_dataset, write_config


def test_16_bit_values_map_and_encode_back_as_uint16():
    raw = np.array([[0, 1000, 65535], [1000, 0, 0]], np.uint16)
    mapping = MaskMapping(MaskConfig(values={0: 0, 1000: 1}, ignore=[65535]), ["bg", "fg"])
    assert mapping.to_classes(raw).tolist() == [[0, 1, IGNORE_INDEX], [1, 0, 0]]
    encoded = mapping.encode(np.array([[0, 1]]))
    assert encoded.dtype == np.uint16 and encoded.tolist() == [[0, 1000]]
    with pytest.raises(DataError, match=r"m16\.png: mask values 1234, 40000 are not covered"):
        mapping.to_classes(np.array([[0, 1234, 40000]], np.uint16), "m16.png")
    # identity ids in a 16-bit file; 8-bit values still encode as uint8
    identity = MaskMapping(MaskConfig(ignore=[65535]), ["a", "b", "c"])
    assert identity.to_classes(np.array([[2, 1, 65535]], np.uint16)).tolist() == [[2, 1, IGNORE_INDEX]]
    assert identity.encode(np.array([[0, 2]])).dtype == np.uint8
    # a threshold on 16-bit soft masks writes the foreground as 65535
    soft = MaskMapping(MaskConfig(threshold=30000), ["bg", "fg"])
    assert soft.to_classes(np.array([[29999, 30001]], np.uint16)).tolist() == [[0, 1]]
    assert soft.encode(np.array([[0, 1]])).tolist() == [[0, 65535]]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_mask_files_read_as_uint16(tmp_path, suffix):
    values = np.array([[0, 1000], [65535, 7]], np.uint16)
    Image.fromarray(values).save(tmp_path / f"m{suffix}")
    got = read_raw_mask(tmp_path / f"m{suffix}", rgb=False)
    assert got.dtype == np.uint16 and got.tolist() == values.tolist()
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "big.tif")  # 32-bit, out of range
    with pytest.raises(DataError, match=r"big\.tif: mask values 0\.\.70000 do not fit 0\.\.65535"):
        read_raw_mask(tmp_path / "big.tif", rgb=False)


def _to_16_bit_masks(root):
    """The stripes' masks as 16-bit PNGs: stripes 1000, background 0, a corner 65535 (ignored)."""
    for path in root.rglob("masks/*.png"):
        mask = np.asarray(Image.open(path)).astype(np.uint16)
        mask[mask == 255] = 1000
        mask[:2, :2] = 65535
        Image.fromarray(mask).save(path)
    return root


def test_a_16_bit_mask_data_set_trains_and_predict_writes_16_bit_masks(tmp_path, float32_policy):
    root = _to_16_bit_masks(make_stripes_dataset(tmp_path / "data", n_train=3, n_val=1, size=16))
    mask_config = {"values": {0: 0, 1000: 1}, "ignore": [65535], "threshold": None}
    config = write_config(tmp_path / "c.yaml", root, data={"crop": 16, "mask": mask_config},
                          train={"epochs": 1, "steps_per_epoch": 2})
    run = tmp_path / "run"
    result = invoke("fit", config, "--out", run)
    assert result.exit_code == 0, result.output
    masks = [np.asarray(Image.open(p)) for p in sorted((root / "train" / "masks").glob("*.png"))]
    counts = json.loads((run / "class_stats.json").read_text())["counts"]
    assert counts == [sum(int((m == 0).sum()) for m in masks), sum(int((m == 1000).sum()) for m in masks)]

    out = tmp_path / "pred"
    assert invoke("predict", run, root / "val" / "images", "--out", out).exit_code == 0
    with Image.open(out / "img00.png") as written:
        assert written.mode.startswith("I;16")  # a 16-bit PNG
        predicted = np.asarray(written)
    assert predicted.shape == (16, 16) and set(np.unique(predicted).tolist()) <= {0, 1000}


def test_an_unmapped_16_bit_value_names_the_file(tmp_path):
    root = _to_16_bit_masks(make_stripes_dataset(tmp_path / "data", n_train=2, n_val=1, size=16))
    path = root / "train" / "masks" / "img01.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[5, 5] = 4321
    Image.fromarray(mask).save(path)
    config = write_config(tmp_path / "c.yaml", root, data={"mask": {"values": {0: 0, 1000: 1}, "ignore": [65535]}})
    result = invoke("fit", config, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "img01.png: mask values 4321 are not covered by data.mask" in result.output
    assert not (tmp_path / "run").exists()
