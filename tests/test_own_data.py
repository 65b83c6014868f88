"""The README's "Your own data" path, end to end, on a small synthetic data set of the kind newcomers bring:
16-bit gray TIFF and PNG images holding 12-bit values (0..4095) and colour-coded (RGB palette) masks.

`segtrain plan ROOT --out CFG`, `segtrain stats CFG`, `segtrain fit CFG ...` through the command line, then
`segtrain.load(RUN).predict(path)` from Python on a val image's file."""

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import invoke

pytestmark = pytest.mark.slow

COLOURS = {"background": (0, 0, 0), "cell": (255, 0, 0), "debris": (0, 255, 0)}


def make_own_data(root, n_train=6, n_val=2, size=64, seed=0):
    """Bright 10 px cells (red in the masks) and dimmer 6 px debris (green) on a noisy background (black), 12-bit
    values in uint16 files; even-numbered images are PNG, odd ones TIFF."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            image = rng.integers(200, 1200, (size, size)).astype(np.uint16)
            mask = np.zeros((size, size, 3), np.uint8)
            for _ in range(3):
                y, x = rng.integers(4, size - 14, 2)
                image[y:y + 10, x:x + 10] = rng.integers(2800, 4096, (10, 10))
                mask[y:y + 10, x:x + 10] = COLOURS["cell"]
            y, x = rng.integers(0, size - 6, 2)
            image[y:y + 6, x:x + 6] = rng.integers(1800, 2400, (6, 6))
            mask[y:y + 6, x:x + 6] = COLOURS["debris"]
            Image.fromarray(image).save(root / split / "images" / f"s{i:02d}{'.tif' if i % 2 else '.png'}")
            Image.fromarray(mask).save(root / split / "masks" / f"s{i:02d}.png")
    return root


def test_plan_stats_fit_and_predict_on_12_bit_images_with_colour_masks(tmp_path):
    import segtrain
    from segtrain.config import load_config

    root = make_own_data(tmp_path / "mydata")
    with Image.open(root / "train" / "images" / "s01.tif") as tif:
        assert tif.format == "TIFF" and tif.mode.startswith("I;16")  # the data are what the test means them to be
    config_path = tmp_path / "configs" / "mine.yaml"

    result = invoke("plan", root, "--out", config_path)
    assert result.exit_code == 0, result.output
    config = load_config(config_path)
    assert config.data.mask.palette is not None  # colour masks: one class per colour
    assert sorted(tuple(c) for c in config.data.mask.palette.values()) == sorted(COLOURS.values())
    assert config.data.classes[0] == "class_000000"  # black is class 0
    assert config.data.normalize == "dataset"  # 12-bit values would use 0..16 of the fixed 0..255 scale
    written = yaml.safe_load(config_path.read_text())
    assert written["train"].get("budget")  # plan's budget (20 min by default) is overridden below

    result = invoke("stats", config_path)
    assert result.exit_code == 0, result.output
    assert "6 pairs checked; masks read as palette colours" in result.output
    assert "not covered" not in result.output and "data.normalize: fixed" not in result.output
    assert "normalization (data.normalize: dataset" in result.output

    run = tmp_path / "runs" / "mine"
    result = invoke("fit", config_path, "--set", "train.budget=null", "--set", "train.epochs=1",
                    "--set", "train.steps_per_epoch=2", "--set", "model.base_filters=4", "--set", "data.crop=32",
                    "--set", "data.batch_size=4", "--out", run)
    assert result.exit_code == 0, result.output
    assert (run / "best.keras").is_file()

    model = segtrain.load(run, log=lambda *a: None)
    for name in ("s00.png", "s01.tif"):
        path = root / "val" / "images" / name
        prediction = model.predict(path)  # a path, read as training read it (16-bit, 12-bit values)
        assert prediction.labels.shape == (64, 64)
        assert prediction.mask.shape == (64, 64, 3) and prediction.mask.dtype == np.uint8
        colours = {tuple(int(v) for v in c) for c in prediction.mask.reshape(-1, 3)}
        assert colours <= set(COLOURS.values()), colours  # palette colours only
        assert np.array_equal(prediction.mask, model.predict(str(path)).mask)  # a str path reads alike
