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
