"""The Python API: `segtrain.fit`, `segtrain.load(...).predict`, `segtrain.evaluate`, against the CLI's files."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_stripes_dataset, write_config

pytestmark = pytest.mark.slow


def test_fit_load_predict_evaluate_agree_with_the_cli_files(tmp_path):
    import segtrain

    root = make_stripes_dataset(tmp_path / "data", n_train=4, n_val=2)
    config = write_config(tmp_path / "c.yaml", root, train={"epochs": 1, "steps_per_epoch": 2, "seed": 1})
    result = segtrain.fit(config, overrides=["train.learning_rate=0.02"], out=tmp_path / "run", log=lambda *a: None)
    assert result.run_dir == tmp_path / "run" and (result.run_dir / "best.keras").is_file()
    assert result.metrics == json.loads((result.run_dir / "metrics.json").read_text())
    assert "learning_rate: 0.02" in (result.run_dir / "config.yaml").read_text()

    model = segtrain.load(result.run_dir)
    image = np.array(Image.open(root / "val" / "images" / "img00.png"))
    prediction = model.predict(image)
    assert prediction.labels.shape == image.shape[:2]
    np.testing.assert_allclose(prediction.probabilities.sum(-1), 1.0, rtol=1e-6)
    # the mask is the training encoding (threshold masks: stripe written as 255) of the labels
    np.testing.assert_array_equal(prediction.mask, np.where(prediction.labels == 1, 255, 0))
    # ... and what `segtrain predict` writes for the same file
    from tests.helpers import invoke

    assert invoke("predict", root / "val" / "images" / "img00.png", "--checkpoint", result.run_dir,
                  "--out", tmp_path / "pred").exit_code == 0
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "pred" / "img00.png")), prediction.mask)
    # a uint16 array reads as the same picture scaled to 16 bits (the 8-bit value v is v * 257)
    wide = model.predict(image.astype(np.uint16) * 257)
    np.testing.assert_allclose(wide.probabilities, prediction.probabilities, atol=1e-6)

    metrics = segtrain.evaluate(result.run_dir, split="val", out=tmp_path / "eval", log=lambda *a: None)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["mean_iou"] == pytest.approx(saved["mean_iou"]) and metrics["split"] == "val"
    # the CLI's own fit went through the same function: the same run from the same config
    assert segtrain.fit.__module__ == "segtrain.api"


def test_load_refuses_overrides_for_an_export_and_bad_arrays(tmp_path):
    from segtrain.data.images import as_model_input
    from segtrain.errors import DataError

    with pytest.raises(DataError, match="expected an image array"):
        as_model_input(np.zeros((4, 4, 2), np.uint8), 3)
    gray = as_model_input(np.full((2, 2), 65535, np.uint16), 3)
    assert gray.shape == (2, 2, 3) and np.allclose(gray, 255.0)
    rgb = as_model_input(np.array([[[255, 0, 0]]], np.uint8), 1)
    assert rgb.shape == (1, 1, 1) and rgb[0, 0, 0] == pytest.approx(0.299 * 255)
