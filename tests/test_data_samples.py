"""The shipped sample data: layout, mask encoding, imbalance, and deterministic regeneration."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "make_data_samples.py"
SAMPLES = REPO / "data_samples"

# data set -> (split counts, image mode, image size, allowed mask values)
EXPECTED = {
    "roads": ({"train": 48, "val": 12}, "RGB", (128, 128), {0, 255}),
    "shapes": ({"train": 24, "val": 8}, "L", (96, 96), {0, 1, 2, 255}),
}


def _load_script():
    spec = importlib.util.spec_from_file_location("make_data_samples", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict:
    """Content by relative path: decoded pixels for PNGs (the PNG encoder may change bytes across Pillow
    versions without changing the data), bytes otherwise."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): _content(p) for p in files}


def _content(path: Path):
    if path.suffix == ".png":
        with Image.open(path) as image:
            return (image.mode, image.size, image.tobytes())
    return path.read_bytes()


def _mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
@pytest.mark.parametrize("split", ["train", "val"])
def test_layout_pairs_and_formats(dataset, split):
    counts, image_mode, size, _ = EXPECTED[dataset]
    images = sorted((SAMPLES / dataset / split / "images").glob("*.png"))
    masks = sorted((SAMPLES / dataset / split / "masks").glob("*.png"))
    assert len(images) == counts[split]
    assert [p.stem for p in images] == [p.stem for p in masks]
    for image_path, mask_path in zip(images, masks):
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            assert (image.mode, image.size) == (image_mode, size)
            assert (mask.mode, mask.size) == ("L", size)


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_masks_hold_only_documented_values(dataset):
    allowed = EXPECTED[dataset][3]
    seen = set()
    for path in (SAMPLES / dataset).glob("*/masks/*.png"):
        values = set(np.unique(_mask(path)).tolist())
        assert values <= allowed, f"{path.name}: {sorted(values - allowed)}"
        seen |= values
    # every documented value occurs somewhere (the ignore value 255 included)
    assert seen == allowed


def test_shapes_ignore_band_is_a_border_frame():
    masks = sorted((SAMPLES / "shapes").glob("*/masks/*.png"))
    with_ignore = [m for m in map(_mask, masks) if (m == 255).any()]
    assert 0 < len(with_ignore) < len(masks)  # some images, not all
    for m in with_ignore:
        ignored = m == 255
        assert ignored[0].all() and ignored[-1].all()
        assert ignored[:, 0].all() and ignored[:, -1].all()
        assert not ignored[m.shape[0] // 2, m.shape[1] // 2]


@pytest.mark.parametrize("split", ["train", "val"])
def test_road_foreground_is_rare_but_present(split):
    masks = [_mask(p) for p in sorted((SAMPLES / "roads" / split / "masks").glob("*.png"))]
    per_image = np.array([np.mean(m == 255) for m in masks])
    overall = np.mean(np.stack(masks) == 255)
    assert 0.05 <= overall <= 0.15
    assert per_image.min() > 0.02  # every tile shows a road
    assert per_image.max() < 0.30  # and none is mostly road


def test_road_colour_alone_does_not_separate_roads():
    # grey roofs share the road grey range: some non-road pixels are as grey as the roads
    split = SAMPLES / "roads" / "train"
    images = [np.asarray(Image.open(p), np.int16) for p in sorted(split.glob("images/*.png"))]
    masks = [_mask(p) for p in sorted(split.glob("masks/*.png"))]
    rgb = np.concatenate([i.reshape(-1, 3) for i in images])
    road = np.concatenate([m.ravel() for m in masks]) == 255
    greyness = rgb.max(axis=1) - rgb.min(axis=1)  # 0 for a perfectly grey pixel
    grey_road_like = (greyness < 25) & (rgb.mean(axis=1) > 90)
    assert grey_road_like[road].mean() > 0.5  # most road pixels are grey
    assert grey_road_like[~road].sum() > 0.1 * road.sum()  # and grey distractors exist


def test_regeneration_is_pixel_identical(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert "roads/train: road" in result.stdout
    regenerated, shipped = _files(tmp_path), _files(SAMPLES)
    assert sorted(regenerated) == sorted(shipped)
    changed = [name for name in shipped if regenerated[name] != shipped[name]]
    assert not changed, f"{len(changed)} files differ, e.g. {changed[:3]}"


def test_limit_writes_the_same_first_files(tmp_path):
    _load_script().generate(tmp_path, limit=2)
    regenerated = _files(tmp_path)
    pngs = [n for n in regenerated if n.endswith(".png")]
    assert len(pngs) == 2 * 2 * 2 * 2  # data sets x splits x first 2 x (image, mask)
    for name, data in regenerated.items():
        assert data == _content(SAMPLES / name), name
