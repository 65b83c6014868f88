"""`segtrain predict --probabilities-format npy`: the exact float32 probabilities, not 8-bit PNGs."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segtrain.config import config_from_dict, save_config
from segtrain.data.images import read_image
from segtrain.predict import Predictor, collect_images, predict_images


def _config(root, classes):
    mask = {"threshold": 127} if len(classes) == 2 else {}
    return config_from_dict({
        "data": {"root": str(root), "classes": classes, "mask": mask, "crop": 16},
        "model": {"depth": 2, "base_filters": 4},
    })


def _run(folder, classes):
    """A run folder as `segtrain fit` leaves it (config.yaml, best.keras) with an untrained model."""
    import keras

    from segtrain.model import build_unet, output_channels

    folder.mkdir()
    save_config(_config(folder, classes), folder / "config.yaml")
    keras.utils.set_random_seed(0)
    build_unet(3, output_channels(len(classes)), depth=2, base_filters=4).save(folder / "best.keras")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {2: _run(base / "binary", ["background", "stripe"]), 3: _run(base / "three", ["background", "a", "b"])}


def _image(path, shape, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("k", [2, 3])
def test_npy_holds_exactly_the_probabilities_the_predictor_computes(runs, tmp_path, k):
    run = runs[k]
    images = tmp_path / "images"
    images.mkdir()
    shapes = {"odd": (37, 45), "wide": (20, 70)}
    for seed, (stem, shape) in enumerate(shapes.items()):
        _image(images / f"{stem}.png", shape + (3,), seed)
    out = predict_images(collect_images([str(images)]), str(run), tmp_path / "out", None, None, None,
                         True, False, log=lambda *a: None, probabilities_format="npy")
    assert sorted(p.name for p in out.iterdir()) == ["odd.npy", "odd.png", "wide.npy", "wide.png"]  # no 8-bit maps
    config = _config(run, ["background", "stripe"] if k == 2 else ["background", "a", "b"])
    predictor = Predictor.load(run / "best.keras", config)
    for stem, shape in shapes.items():
        saved = np.load(out / f"{stem}.npy", allow_pickle=False)
        assert saved.dtype == np.float32 and saved.shape == shape + (k,)  # (H, W, K) at the input's size
        expected = predictor.probabilities(read_image(images / f"{stem}.png", 3, config.data.max_image_pixels))
        assert np.array_equal(saved, expected)  # bit for bit
        np.testing.assert_allclose(saved.sum(axis=-1), 1.0, atol=1e-5)
        # the mask written beside it is the decision on these very probabilities
        mask = np.asarray(Image.open(out / f"{stem}.png"))
        labels = predictor.labels(saved)
        assert np.array_equal(mask, np.where(labels == 1, 255, 0) if k == 2 else labels)


def test_the_cli_keeps_png_by_default_and_writes_npy_when_asked(runs, tmp_path):
    from segtrain.cli import cli

    image = _image(tmp_path / "x.png", (24, 24, 3))
    runner = CliRunner()
    result = runner.invoke(cli, ["predict", str(image), "--checkpoint", str(runs[2]), "--out", str(tmp_path / "png"),
                                 "--probabilities"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["x.png", "x_prob_stripe.png"]
    result = runner.invoke(cli, ["predict", str(image), "--checkpoint", str(runs[2]), "--out", str(tmp_path / "npy"),
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
