"""segtrain/data/discovery.py: pairing images and masks by stem, and the errors that name the culprit."""

import numpy as np
import pytest
from PIL import Image

from segtrain.data.discovery import find_pairs
from segtrain.errors import DataError
from tests.helpers import write_pair


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


def test_an_empty_split_says_where_it_looked_what_it_accepts_and_how_pairs_match(tmp_path):
    images = tmp_path / "train" / "images"
    images.mkdir(parents=True)
    (tmp_path / "train" / "masks").mkdir()
    with pytest.raises(DataError) as info:
        find_pairs(tmp_path, "train")
    message = info.value.message
    assert message.startswith(f"{images}: no images found. Looked for .bmp, .jpeg, .jpg, .png, .tif, .tiff files")
    assert "subfolders are not searched" in message and "holds" not in message
    assert f"the mask of the same file stem in {tmp_path / 'train' / 'masks'}" in message
    # images one level down: named, with the fix
    write_pair(tmp_path / "train" / "images", "batch1", "a", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"it holds 1 subfolder: batch1; move the images up"):
        find_pairs(tmp_path, "train")


def test_predict_with_no_images_names_the_extensions_and_the_subfolder_rule(tmp_path):
    from segtrain.predict import collect_images

    empty = tmp_path / "empty"
    (empty / "nested").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(empty / "nested" / "a.png")
    with pytest.raises(DataError) as info:
        collect_images([str(empty)])
    message = info.value.message
    assert message.startswith(f"{empty}: no images found. Looked for .bmp, .jpeg, .jpg, .png, .tif, .tiff files")
    assert "subfolders are not searched (it holds 1 subfolder: nested" in message
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match=r"no images found in .*empty, .*other: looked for .bmp, .* subfolders are not"):
        collect_images([str(empty), str(tmp_path / "other")])
    assert collect_images([str(empty / "nested")]) == [(empty / "nested" / "a.png").resolve()]


def test_a_split_folder_given_as_the_root_names_the_root(tmp_path):
    from segtrain.data.discovery import find_pairs
    from segtrain.errors import DataError

    (tmp_path / "data" / "train" / "images").mkdir(parents=True)
    (tmp_path / "data" / "train" / "masks").mkdir()
    with pytest.raises(DataError, match=f"pass the data set's root, {tmp_path / 'data'}, which holds train/images"):
        find_pairs(tmp_path / "data" / "train", "train")
