"""`segtrain predict --probabilities-format npy`: the exact float32 q (the calibrated, prior-corrected probabilities the
decision rule reads), not 8-bit PNGs; thresholding it at the policy's rule gives the masks written beside it."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segtrain.config import config_from_dict, save_config
from segtrain.data.images import read_image
from segtrain.policy.predictor import Predictor
from segtrain.policy.store import POLICY_FILE, StoredPolicy
from segtrain.predict import collect_images, predict_images

CUT_MARGIN = 1e-6
"""Pixels whose q is this close to the rule's cut may fall either way between float64 q and its float32 copy."""


def _config(root, classes, **predict):
    mask = {"threshold": 127} if len(classes) == 2 else {}
    return config_from_dict({
        "data": {"root": str(root), "classes": classes, "mask": mask, "crop": 16},
        "model": {"depth": 2, "base_filters": 4},
        "predict": predict,
    })


def _classes(k):
    return ["background", "stripe"] if k == 2 else ["background", "a", "b"]


def _run(folder, classes, **predict):
    """A run folder as `segtrain fit` leaves it (config.yaml, best.keras) with an untrained model."""
    import keras

    from segtrain.model import build_unet, output_channels

    folder.mkdir()
    save_config(_config(folder, classes, **predict), folder / "config.yaml")
    keras.utils.set_random_seed(0)
    build_unet(3, output_channels(len(classes)), depth=2, base_filters=4).save(folder / "best.keras")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {2: _run(base / "binary", _classes(2)), 3: _run(base / "three", _classes(3))}


def _image(path, shape, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)).save(path)
    return path


def _write_images(folder, shapes):
    folder.mkdir()
    for seed, (stem, shape) in enumerate(shapes.items()):
        _image(folder / f"{stem}.png", shape + (3,), seed)
    return collect_images([str(folder)])


def _rule_on(saved, k, cut=0.5):
    """(labels, clear) of the saved q: two classes foreground where q_fg >= cut, several the arg-max; `clear` the
    pixels farther than CUT_MARGIN from the cut (two classes) or with a top-two gap above it."""
    if k == 2:
        return (saved[..., 1] >= cut).astype(int), np.abs(saved[..., 1] - cut) > CUT_MARGIN
    top = np.sort(saved, axis=-1)
    return saved.argmax(-1), top[..., -1] - top[..., -2] > CUT_MARGIN


def _direct_logits(model, image, divisor=4):
    """One call of the model on the image reflect-padded at its end to a multiple of `divisor`, cropped back."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, -height % divisor), (0, -width % divisor), (0, 0)), mode="reflect")
    return np.asarray(model(padded[None], training=False), np.float64)[0, :height, :width]


@pytest.mark.parametrize("k", [2, 3])
def test_npy_holds_exactly_the_probabilities_the_predictor_computes(runs, tmp_path, k):
    run = runs[k]
    shapes = {"odd": (37, 45), "wide": (20, 70)}
    out = predict_images(_write_images(tmp_path / "images", shapes), str(run), tmp_path / "out", None, None, None,
                         True, False, log=lambda *a: None, probabilities_format="npy")
    assert sorted(p.name for p in out.iterdir()) == ["odd.npy", "odd.png", "wide.npy", "wide.png"]  # no 8-bit maps
    config = _config(run, _classes(k))
    predictor = Predictor.load(run / "best.keras", config)
    for stem, shape in shapes.items():
        saved = np.load(out / f"{stem}.npy", allow_pickle=False)
        assert saved.dtype == np.float32 and saved.shape == shape + (k,)  # (H, W, K) at the input's size
        _, q, labels = predictor.predict(read_image(tmp_path / "images" / f"{stem}.png", 3,
                                                    config.data.max_image_pixels))
        assert np.array_equal(saved, q.astype(np.float32))  # bit for bit
        np.testing.assert_allclose(saved.sum(axis=-1), 1.0, atol=1e-5)
        # the mask written beside it is the rule on these very numbers (arg-max here)
        mask = np.asarray(Image.open(out / f"{stem}.png"))
        written = (mask == 255).astype(int) if k == 2 else mask
        assert np.array_equal(written, labels)
        decided, clear = _rule_on(saved, k)
        # (about 5% of an untrained model's pixels have all-zero features, so logits exactly 0 and a tie: excluded)
        assert clear.mean() > 0.9 and np.array_equal(written[clear], decided[clear])


@pytest.mark.parametrize("k, weights, threshold", [(2, [1.0, 1.5], None), (2, [1.0, 1.5], 0.45),
                                                   (3, [1.0, 2.0, 0.5], None)],
                         ids=["binary-argmax", "binary-threshold", "3-class"])
def test_npy_is_q_after_temperature_and_prior_correction(tmp_path, k, weights, threshold):
    # policy.json: T = 0.05 (spreads the untrained model's logits of about +-0.1 over p of about 0.2 .. 0.8) and the
    # class weights training applied; predict.prior_correction: weights divides them out: q_c ∝ p_c / w_c
    run = _run(tmp_path / "run", _classes(k), prior_correction="weights")
    stored = StoredPolicy.new(run / "best.keras", weights)
    stored.calibration = {"method": "scalar", "temperature": 0.05, "split": "val"}
    (run / POLICY_FILE).write_text(json.dumps(stored.to_dict()))
    shapes = {"odd": (37, 45), "wide": (20, 70)}
    decision = None if threshold is None else "threshold"
    out = predict_images(_write_images(tmp_path / "images", shapes), str(run), tmp_path / "out", decision, threshold,
                         None, True, False, log=lambda *a: None, probabilities_format="npy")
    predictor = Predictor.load(run / "best.keras", _config(run, _classes(k), prior_correction="weights"))
    assert predictor.policy.temperature == 0.05 and predictor.policy.tau == 1.0
    for stem in shapes:
        saved = np.load(out / f"{stem}.npy")
        image = read_image(tmp_path / "images" / f"{stem}.png", 3)
        # independently: p from one model call, q by dividing by the weights
        z = _direct_logits(predictor.model, image) / 0.05
        if k == 2:
            p_fg = 1 / (1 + np.exp(-z[..., 0]))
            p = np.stack([1 - p_fg, p_fg], -1)
        else:
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
        q = p / np.asarray(weights)
        q /= q.sum(-1, keepdims=True)
        # float32 logits divided by T = 0.05: logit errors of ~2e-6, probabilities within 1e-5
        np.testing.assert_allclose(saved, q, atol=1e-5)
        assert np.abs(saved - p).max() > 0.05  # q, not p
        # thresholding q at the policy's rule reproduces the written mask (away from the cut)
        mask = np.asarray(Image.open(out / f"{stem}.png"))
        written = (mask == 255).astype(int) if k == 2 else mask
        decided, clear = _rule_on(saved, k, 0.5 if threshold is None else threshold)
        assert clear.mean() > 0.99 and np.array_equal(written[clear], decided[clear])
        assert len(np.unique(written[clear])) == k  # every class decided somewhere: the comparison means something
        if k == 2:  # the same cut on p: q_fg >= t exactly when p_fg >= t / w0 / (t / w0 + (1 - t) / w1)
            t = 0.5 if threshold is None else threshold
            cut = (t / weights[0]) / (t / weights[0] + (1 - t) / weights[1])
            away = np.abs(p_fg - cut) > 1e-4
            assert np.array_equal(written[away], (p_fg >= cut)[away].astype(int))
            assert ((p_fg >= 0.5) != (p_fg >= cut)).any()  # where p alone would have decided otherwise


def test_the_cli_keeps_png_by_default_and_writes_npy_when_asked(runs, tmp_path):
    from segtrain.cli import cli

    image = _image(tmp_path / "x.png", (24, 24, 3))
    runner = CliRunner()
    result = runner.invoke(cli, ["predict", str(runs[2]), str(image), "--out", str(tmp_path / "png"),
                                 "--probabilities"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["x.png", "x_prob_stripe.png"]
    result = runner.invoke(cli, ["predict", str(runs[2]), str(image), "--out", str(tmp_path / "npy"),
                                 "--probabilities-format", "npy"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "npy").iterdir()) == ["x.npy", "x.png"]
    png = np.asarray(Image.open(tmp_path / "png" / "x_prob_stripe.png"))
    saved = np.load(tmp_path / "npy" / "x.npy")
    assert np.array_equal(png, np.round(saved[..., 1] * 255).astype(np.uint8))  # the PNG is this array, rounded
    result = runner.invoke(cli, ["predict", str(image), "--probabilities-format", "tif"])
    assert result.exit_code == 2 and "tif" in result.output


def test_an_unknown_format_is_refused(runs, tmp_path):
    image = _image(tmp_path / "x.png", (16, 16, 3))
    with pytest.raises(ValueError, match="probabilities_format"):
        predict_images([image], str(runs[2]), tmp_path / "out", None, None, None, True, False,
                       log=lambda *a: None, probabilities_format="jpg")
