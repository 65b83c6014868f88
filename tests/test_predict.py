"""Tests for segtrain.predict: finding images, loading a run, and the files `segtrain predict` writes."""

import numpy as np
import pytest
from PIL import Image

from segtrain.config import config_from_dict, save_config
from segtrain.errors import CheckpointError, DataError
from segtrain.predict import Predictor, _check_outputs, _overlay, collect_images, predict_images, tile_size

CLASSES = ["background", "stripe"]


def _config(root, classes=CLASSES, **predict):
    mask = {"threshold": 127} if len(classes) == 2 else {}
    return config_from_dict({
        "data": {"root": str(root), "classes": classes, "mask": mask, "crop": 16},
        "model": {"depth": 2, "base_filters": 4},
        "predict": predict,
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as `segtrain fit` leaves it, with an untrained model: config.yaml and best.keras."""
    import keras

    from segtrain.model import build_unet

    run_dir = tmp_path_factory.mktemp("run")
    save_config(_config(run_dir), run_dir / "config.yaml")
    keras.utils.set_random_seed(0)
    build_unet(3, 1, depth=2, base_filters=4).save(run_dir / "best.keras")
    return run_dir


def _image(path, shape, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)).save(path)
    return path


def test_collect_images_sorts_skips_and_removes_duplicates(tmp_path):
    for name in ("b.png", "a.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = collect_images([str(tmp_path), str(tmp_path / "b.png")])
    assert found == [(tmp_path / "a.jpg").resolve(), (tmp_path / "b.png").resolve()]


@pytest.mark.parametrize("name, message", [
    ("missing.png", "no such file or folder"),
    ("notes.txt", "not a supported image"),
    ("", "no images found"),  # the empty folder itself
])
def test_collect_images_refuses_bad_arguments(tmp_path, name, message):
    if name == "notes.txt":
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=message):
        collect_images([str(tmp_path / name)])


def test_outputs_never_collide_nor_land_among_the_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="share the stem 'x'"):
        _check_outputs([tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg"], tmp_path / "out")
    with pytest.raises(DataError, match="holds input images"):
        _check_outputs([tmp_path / "a" / "x.png"], tmp_path / "a")
    _check_outputs([tmp_path / "a" / "x.png", tmp_path / "b" / "y.png"], tmp_path / "out")


def test_tile_size_defaults_to_twice_the_crop_as_a_multiple_of_the_divisor(tmp_path):
    assert tile_size(_config(tmp_path)) == 32
    assert tile_size(_config(tmp_path, tile_size=64)) == 64
    config = _config(tmp_path)
    config.data.crop = None
    assert tile_size(config) == 512


def test_overlay_tints_only_the_foreground():
    image = np.full((2, 2, 1), 100, np.float32)
    labels = np.array([[0, 1], [1, 0]])
    out = _overlay(image, labels, 2)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [177, 70, 70]  # 0.5 * 100 + 0.5 * (255, 40, 40), truncated


def test_predict_writes_the_masks_eval_would_score(run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _image(images / "small.png", (20, 27, 3))
    _image(images / "large.png", (70, 45, 3), seed=1)
    logged = []
    out = predict_images(collect_images([str(images)]), str(run), tmp_path / "out", None, None, None,
                         probabilities=True, overlay=True, log=logged.append)
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "large.png", "large_overlay.png", "large_prob_stripe.png", "small.png", "small_overlay.png",
        "small_prob_stripe.png"]
    assert logged[-1].startswith(f"Wrote 2 mask(s) to {out}")
    predictor = Predictor.load(run / "best.keras", _config(run))
    for stem, shape in (("small", (20, 27)), ("large", (70, 45))):
        mask = np.asarray(Image.open(out / f"{stem}.png"))
        assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}  # the training encoding
        image = np.asarray(Image.open(images / f"{stem}.png"), np.float32)
        probabilities = predictor.probabilities(image)
        assert np.array_equal(mask, np.where(predictor.labels(probabilities) == 1, 255, 0))
        stored = np.asarray(Image.open(out / f"{stem}_prob_stripe.png"))
        assert np.array_equal(stored, np.round(probabilities[..., 1] * 255).astype(np.uint8))
        assert np.asarray(Image.open(out / f"{stem}_overlay.png")).shape == shape + (3,)


def test_predict_defaults_to_the_run_folder_and_applies_the_threshold(run, tmp_path):
    image = _image(tmp_path / "x.png", (16, 16, 3))
    p_fg = Predictor.load(run / "best.keras", _config(run)).probabilities(
        np.asarray(Image.open(image), np.float32))[..., 1]
    threshold = float(np.median(p_fg))  # some pixels each way
    out = predict_images([image], str(run), None, "threshold", threshold, None, False, False, log=lambda *a: None)
    assert out == run / "predictions"
    mask = np.asarray(Image.open(out / "x.png"))
    assert np.array_equal(mask, np.where(p_fg >= threshold, 255, 0)) and 0 < mask.mean() < 255


def test_a_model_that_does_not_match_the_config_is_refused(run, tmp_path):
    with pytest.raises(CheckpointError, match="1 output channel"):
        Predictor.load(run / "best.keras", _config(tmp_path, classes=["a", "b", "c"]))
