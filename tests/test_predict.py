"""Tests for segtrain.predict: finding images, loading a run (segtrain.policy.predictor.Predictor), and the files
`segtrain predict` writes: the masks are the policy's labels, the probability maps its q."""

import json

import numpy as np
import pytest
from PIL import Image

from segtrain.config import config_from_dict, save_config
from segtrain.errors import CheckpointError, DataError
from segtrain.policy.predictor import Predictor
from segtrain.policy.store import POLICY_FILE, StoredPolicy
from segtrain.predict import _check_outputs, collect_images, predict_images
from segtrain.reports import overlay

CLASSES = ["background", "stripe"]


def _config(root, classes=CLASSES, data=None, **predict):
    mask = {"threshold": 127} if len(classes) == 2 else {}
    return config_from_dict({
        "data": {"root": str(root), "classes": classes, "mask": mask, "crop": 16, **(data or {})},
        "model": {"depth": 2, "base_filters": 4},
        "predict": predict,
    })


def _make_run(run_dir, **predict):
    """A run folder as `segtrain fit` leaves it, with an untrained model: config.yaml and best.keras."""
    import keras

    from segtrain.model import build_unet

    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(_config(run_dir, **predict), run_dir / "config.yaml")
    keras.utils.set_random_seed(0)
    build_unet(3, 1, depth=2, base_filters=4).save(run_dir / "best.keras")
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("run"))


def _image(path, shape, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)).save(path)
    return path


def _direct_logits(model, image, divisor=4):
    """The model called once on the image reflect-padded at its end to a multiple of `divisor`, cropped back."""
    height, width = image.shape[:2]
    widths = ((0, -height % divisor), (0, -width % divisor), (0, 0))
    padded = np.pad(image, widths, mode="reflect")
    return np.asarray(model(padded[None], training=False), np.float64)[0, :height, :width]


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


def test_predictor_logits_follow_the_predict_section(run, tmp_path):
    # tile_size null: an image goes through whole (padded to 2**depth = 4, cropped back); an explicit tile_size tiles
    # images with a side longer than it, as segtrain.policy.inference.predict_logits does with the config's settings
    from segtrain.policy.inference import predict_logits

    image = np.random.default_rng(3).integers(0, 255, (70, 45, 3)).astype(np.float32)
    predictor = Predictor.load(run / "best.keras", _config(run))
    whole = predictor.logits(image)
    assert whole.shape == (70, 45, 1) and whole.dtype == np.float32
    np.testing.assert_allclose(whole, _direct_logits(predictor.model, image), atol=1e-5)
    tiled = Predictor.load(run / "best.keras", _config(run, tile_size=32, overlap=0.5))
    np.testing.assert_array_equal(tiled.logits(image),
                                  predict_logits(tiled.model, image, 32, overlap=0.5, batch_size=4, divisor=4))
    assert np.abs(tiled.logits(image) - whole).max() > 1e-4  # tiles see less context: the setting took effect
    # data.resize: the model sees the image at the training size, the logits come back at the image's size
    import tensorflow as tf

    resized = Predictor.load(run / "best.keras", _config(run, data={"resize": [32, 32]}))
    expected = tf.image.resize(_direct_logits(resized.model, tf.image.resize(image, (32, 32)).numpy()), (70, 45))
    np.testing.assert_allclose(resized.logits(image), expected.numpy(), atol=1e-5)


def test_overlay_tints_only_the_foreground():
    image = np.full((2, 2, 1), 100, np.float32)
    labels = np.array([[0, 1], [1, 0]])
    out = overlay(image, labels, 2)
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
                         probabilities=True, overlay=False, log=logged.append)
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["large.png", "large_prob_stripe.png", "small.png",
                                                     "small_prob_stripe.png"]
    assert logged[-1].startswith(f"Wrote 2 mask(s) to {out}")
    predictor = Predictor.load(run / "best.keras", _config(run))
    for stem, shape in (("small", (20, 27)), ("large", (70, 45))):
        mask = np.asarray(Image.open(out / f"{stem}.png"))
        assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}  # the training encoding
        image = np.asarray(Image.open(images / f"{stem}.png"), np.float32)
        logits, q, labels = predictor.predict(image)
        assert np.array_equal(labels, predictor.policy.apply(logits)[1])
        assert np.array_equal(mask, np.where(labels == 1, 255, 0))
        stored = np.asarray(Image.open(out / f"{stem}_prob_stripe.png"))
        assert np.array_equal(stored, np.round(q[..., 1] * 255).astype(np.uint8))


def test_predict_writes_an_overlay_when_asked(run, tmp_path):
    path = _image(tmp_path / "x.png", (20, 27, 3))
    out = predict_images([path], str(run), tmp_path / "out", None, None, None, False, True, log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == ["x.png", "x_overlay.png"]
    mask = np.asarray(Image.open(out / "x.png"))
    image = np.asarray(Image.open(path), np.float32)
    assert np.array_equal(np.asarray(Image.open(out / "x_overlay.png")), overlay(image, (mask == 255).astype(int), 2))


def test_predict_defaults_to_the_run_folder_and_applies_the_threshold(run, tmp_path):
    image = _image(tmp_path / "x.png", (16, 16, 3))
    predictor = Predictor.load(run / "best.keras", _config(run))
    q_fg = predictor.predict(np.asarray(Image.open(image), np.float32))[1][..., 1]
    threshold = float(np.median(q_fg))  # some pixels each way
    logged = []
    out = predict_images([image], str(run), None, "threshold", threshold, None, False, False, log=logged.append)
    assert out == run / "predictions"
    mask = np.asarray(Image.open(out / "x.png"))
    assert np.array_equal(mask, np.where(q_fg >= threshold, 255, 0)) and 0 < mask.mean() < 255
    assert f"threshold {threshold:.4g}" in logged[-1]  # the summary names the rule applied


def test_the_probability_maps_are_q_under_prior_correction(tmp_path):
    # class weights [1, 1.5] and prior correction: q_fg = p_fg / 1.5 / (p_bg + p_fg / 1.5), the foreground where
    # q_fg >= 0.5, i.e. p_fg >= 0.6; T = 0.05 spreads the untrained model's logits over p of about 0.2 .. 0.8
    run = _make_run(tmp_path / "run", prior_correction="weights")
    model_path = run / "best.keras"
    stored = StoredPolicy.new(model_path, [1.0, 1.5])
    stored.calibration = {"method": "scalar", "temperature": 0.05, "split": "val"}
    (run / POLICY_FILE).write_text(json.dumps(stored.to_dict()))
    path = _image(tmp_path / "x.png", (40, 36, 3), seed=4)
    out = predict_images([path], str(run), tmp_path / "out", None, None, None, True, False, log=lambda *a: None)
    predictor = Predictor.load(model_path, _config(run, prior_correction="weights"))
    image = np.asarray(Image.open(path), np.float32)
    p_fg = 1 / (1 + np.exp(-_direct_logits(predictor.model, image)[..., 0] / 0.05))
    q_fg = (p_fg / 1.5) / (1 - p_fg + p_fg / 1.5)
    stored_map = np.asarray(Image.open(out / "x_prob_stripe.png")).astype(int)
    # 8 bits of q: within one grey level of round(255 q) (float32 logits / 0.05: q differs by < 1e-4)
    assert np.abs(stored_map - np.round(q_fg * 255)).max() <= 1
    assert np.abs(stored_map - np.round(p_fg * 255)).max() > 10  # not p
    mask = np.asarray(Image.open(out / "x.png"))
    clear = np.abs(p_fg - 0.6) > 1e-4
    assert np.array_equal((mask == 255)[clear], (p_fg >= 0.6)[clear]) and 0 < (mask == 255).mean() < 1


def test_a_model_that_does_not_match_the_config_is_refused(run, tmp_path):
    with pytest.raises(CheckpointError, match="1 output channel"):
        Predictor.load(run / "best.keras", _config(tmp_path, classes=["a", "b", "c"]))
