"""segtrain/data/masks.py: mapping raw mask values and colours to classes, and back."""

import numpy as np
import pytest

from segtrain.config import MaskConfig
from segtrain.data.masks import MaskMapping
from segtrain.errors import DataError
from segtrain.labels import IGNORE_INDEX


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
    with pytest.raises(DataError, match=r"p\.png: mask colours \(1, 2, 3\) are not covered"):
        mapping.to_classes(np.array([[[1, 2, 3]]], np.uint8), "p.png")


def test_every_unmapped_colour_of_a_mask_is_listed_with_its_pixels_most_first():
    mapping = MaskMapping(MaskConfig(palette={"bg": [0, 0, 0], "car": [255, 0, 0]}), ["bg", "car"])
    raw = np.zeros((4, 4, 3), np.uint8)
    raw[0, :3] = [1, 2, 3]  # 3 pixels
    raw[1, :2] = [128, 0, 0]  # 2 pixels: an anti-aliased edge
    raw[2, 0] = [255, 0, 0]
    classes, unmapped = mapping.classes_and_unmapped(raw)
    assert unmapped == {(1, 2, 3): 3, (128, 0, 0): 2}
    assert classes[2, 0] == 1 and (classes[:2] == IGNORE_INDEX).sum() == 5  # uncovered pixels: ignored meanwhile
    with pytest.raises(DataError) as info:
        mapping.to_classes(raw, "p.png")
    message = info.value.message
    assert message.startswith("p.png: mask colours (1, 2, 3), (128, 0, 0) are not covered by data.mask")
    assert "  (1, 2, 3): 3 pixels, e.g. p.png\n  (128, 0, 0): 2 pixels, e.g. p.png" in message
    assert "data.mask.palette" in message and "data.mask.ignore" in message


def test_a_tally_over_masks_lists_ten_by_pixels_then_how_many_more():
    from segtrain.data.masks import UnmappedTally

    mapping = MaskMapping(MaskConfig(values={0: 0, 255: 1}), ["bg", "fg"])
    tally = UnmappedTally()
    for i, name in enumerate(["a.png", "b.png"]):
        raw = np.zeros((1, 40), np.uint8)
        raw[0, : 12 + i] = np.arange(100, 112 + i)  # a.png: 100..111, b.png: 100..112, one pixel each
        raw[0, 30:33] = 7 + i  # three pixels of 7 (a.png) / 8 (b.png)
        tally.add(mapping.classes_and_unmapped(raw)[1], name)
    tally.add({}, "clean.png")  # a mask with nothing uncovered is no file of the tally
    assert tally.files == 2 and tally.first == "a.png"
    assert tally.found[100] == (2, "a.png") and tally.found[112] == (1, "b.png") and tally.found[8] == (3, "b.png")
    message = tally.error(mapping, "data/train/masks").message
    lines = message.splitlines()
    assert lines[0].startswith("data/train/masks: mask values 7, 8, 100, 101, 102, 103, 104, 105, 106, 107 ... "
                               "are not covered by data.mask (values [0, 255])")
    assert lines[1] == "15 values, 31 pixels in 2 masks, the most pixels first:"
    assert lines[2:5] == ["  7: 3 pixels, e.g. a.png", "  8: 3 pixels, e.g. b.png", "  100: 2 pixels, e.g. a.png"]
    assert lines[12] == "  ... and 5 more (9 pixels)"  # 108..111 two pixels each, 112 one
    assert "data.mask.values" in lines[13] and "data.mask.ignore" in lines[13]


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
