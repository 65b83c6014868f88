"""TensorBoard during fit: per-class validation IoU scalars and, at each validation, the first validation images
with the model's predicted masks (image | truth | prediction), read back from the event files with TF's reader."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.helpers import history, invoke, make_stripes_dataset, write_config

pytestmark = pytest.mark.slow

SIZE, PADDED, GAP, THRESHOLD = 30, 32, 2, 0.3  # depth 2: validation pads 30 x 30 images to 32 x 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three epochs validated at 2 and 3 (validate_every 2, the last epoch always), four validation images,
    deciding by a foreground threshold of 0.3 (not the arg-max)."""
    base = tmp_path_factory.mktemp("tensorboard")
    root = make_stripes_dataset(base / "stripes", n_train=6, n_val=4, size=SIZE)
    config = write_config(base / "tb.yaml", root, train={"epochs": 3, "validate_every": 2},
                          predict={"decision": "threshold", "threshold": THRESHOLD})
    result = invoke("fit", config, "--out", base / "run")
    assert result.exit_code == 0, result.output
    return base / "run", root


def read_events(log_dir):
    """{tag: {step: value}} of the scalars and {tag: {step: H x W x 3 uint8}} of the images in the event files."""
    scalars, images, plugins = {}, {}, {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name:  # the metadata may come with a tag's first event only
                    plugins[value.tag] = value.metadata.plugin_data.plugin_name
                array = tf.make_ndarray(value.tensor)
                if plugins.get(value.tag) == "scalars":
                    scalars.setdefault(value.tag, {})[event.step] = float(array)
                elif plugins.get(value.tag) == "images":
                    width, height, png = array
                    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                    assert picture.shape == (int(height), int(width), 3)
                    images.setdefault(value.tag, {})[event.step] = picture
    return scalars, images


def test_per_class_validation_iou_scalars_equal_the_history(run):
    scalars, _ = read_events(run[0] / "logs")
    rows = history(run[0])
    for name in ("background", "stripe"):
        expected = {int(r["epoch"]): float(r[f"val_iou_{name}"]) for r in rows if r[f"val_iou_{name}"]}
        assert sorted(expected) == [2, 3]  # validated epochs only
        written = scalars[f"val_iou/{name}"]  # grouped under val_iou/ in TensorBoard
        assert sorted(written) == [2, 3]
        for epoch, value in expected.items():  # history.csv keeps 6 significant digits, the event file float32
            assert written[epoch] == pytest.approx(value, rel=1e-5)
    assert sorted(scalars["loss"]) == [1, 2, 3]
    assert "val_iou_stripe" not in scalars


def test_validation_pictures_show_the_models_prediction_by_the_runs_decision_rule(run):
    """At the last validation (epoch 3) the model is the one saved as last.keras: its logits on each of the first
    three validation images, thresholded at 0.3 by hand, tinted with reports.overlay, equal the third panel."""
    import keras

    from segtrain.data.images import read_image
    from segtrain.reports import overlay

    run_dir, root = run
    _, images = read_events(run_dir / "logs")
    assert sorted(images) == [f"val_predictions/{i}" for i in range(3)]  # 3 of the 4 validation images
    assert all(sorted(steps) == [2, 3] for steps in images.values())

    model = keras.models.load_model(run_dir / "last.keras", compile=False)
    stems = sorted(p.stem for p in (root / "val" / "images").iterdir())[:3]
    differs_from_argmax = False
    for index, stem in enumerate(stems):
        picture = images[f"val_predictions/{index}"][3]
        assert picture.shape == (SIZE, 3 * SIZE + 2 * GAP, 3)
        image = read_image(root / "val" / "images" / f"{stem}.png", 3)
        padded = np.zeros((PADDED, PADDED, 3), np.float32)
        padded[:SIZE, :SIZE] = image
        logits = model(padded[None], training=False)[0, :SIZE, :SIZE, 0]
        probability = tf.math.sigmoid(tf.cast(logits, tf.float32)).numpy()
        labels = (probability >= THRESHOLD).astype(np.int64)
        differs_from_argmax |= bool(np.any(labels != (probability >= 0.5)))
        truth = (np.asarray(Image.open(root / "val" / "masks" / f"{stem}.png")) > 127).astype(np.int64)

        original = np.asarray(Image.open(root / "val" / "images" / f"{stem}.png"))
        np.testing.assert_array_equal(picture[:, :SIZE], original)
        np.testing.assert_array_equal(picture[:, SIZE + GAP:2 * SIZE + GAP], overlay(image, truth, 2))
        np.testing.assert_array_equal(picture[:, 2 * (SIZE + GAP):], overlay(image, labels, 2))
        assert np.all(picture[:, SIZE:SIZE + GAP] == 255)
    assert differs_from_argmax  # the pictures tell the threshold rule from the arg-max one
