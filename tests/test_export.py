"""`segtrain export`: SavedModel, ONNX and TFLite against `segtrain predict` on the shipped sample data.

Parity rule: the exported graph runs the same float32 network on the same reflect-padded
pixels as `predict` (images no larger than a tile are one forward pass there), so the
probabilities may differ only by float32 kernel differences between runtimes (ONNX Runtime's
and XNNPACK's convolutions sum in other orders: ~1e-6 relative per layer, a few 1e-6 absolute
after the sigmoid); PROB_ATOL = 1e-4 leaves a margin of 10x or more. A label may differ only
where the foreground probability lies within PROB_ATOL of the decision threshold.
"""

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, invoke

pytestmark = pytest.mark.slow

PROB_ATOL = 1e-4
SAMPLES = REPO / "data_samples" / "roads"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short run of the shipped roads config (two classes, threshold-encoded masks)."""
    base = tmp_path_factory.mktemp("export")
    result = invoke("fit", REPO / "configs" / "roads.yaml", "--out", base / "run", "--set", "train.epochs=1",
                    "--set", "train.steps_per_epoch=3", "--set", "predict.tta=true")
    assert result.exit_code == 0, result.output
    return base / "run"


def sample_images():
    paths = sorted((SAMPLES / "val" / "images").glob("*.png"))[:3]
    images = [np.array(Image.open(p).convert("RGB")) for p in paths]
    images.append(images[0][5:104, 3:93])  # 99 x 90: padded to 104 x 96 inside, cropped back
    return images


def reference(run_dir, images):
    import segtrain

    model = segtrain.load(run_dir)
    return [model.predict(image) for image in images]


def run_onnx(path, image):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"images": image[None]})))
    return out["labels"][0], out["probabilities"][0]


def run_tflite(path, image):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path / "model.tflite")).get_signature_runner("serving_default")
    out = runner(images=image[None])
    return out["labels"][0], out["probabilities"][0]


def run_saved_model(path, image):
    import tensorflow as tf

    serve = tf.saved_model.load(str(path / "saved_model")).signatures["serving_default"]
    out = serve(images=tf.constant(image[None]))
    return out["labels"].numpy()[0], out["probabilities"].numpy()[0]


RUNNERS = {"saved_model": run_saved_model, "onnx": run_onnx, "tflite": run_tflite}


@pytest.mark.parametrize("fmt", list(RUNNERS))
def test_export_matches_predict(run, tmp_path, fmt):
    out = tmp_path / fmt
    result = invoke("export", run, "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    images = sample_images()
    for image, expected in zip(images, reference(run, images)):
        labels, probabilities = RUNNERS[fmt](out, image)
        assert labels.shape == image.shape[:2] and probabilities.shape == image.shape[:2] + (2,)
        np.testing.assert_allclose(probabilities, expected.probabilities, atol=PROB_ATOL, rtol=0)
        differ = labels != expected.labels
        assert np.all(np.abs(expected.probabilities[..., 1][differ] - 0.5) < PROB_ATOL)
        assert differ.mean() < 1e-3  # and they are rare


def test_export_metadata_says_how_to_read_the_outputs(run, tmp_path):
    out = tmp_path / "sm"
    assert invoke("export", run, "--out", out).exit_code == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["classes"] == ["background", "road"] and meta["format"] == "saved_model"
    assert meta["labels_to_mask"] == {"kind": "values", "values": [0, 255]}  # threshold 127: road written as 255
    assert meta["decision"]["rule"] == "argmax" and meta["input"]["channels"] == 3
    assert meta["test_time_augmentation"] is True
    import hashlib

    assert meta["config_sha256"] == hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    # the export folder loads through the Python API, with the mask encoding of the metadata
    import segtrain

    image = sample_images()[0]
    exported, direct = segtrain.load(out).predict(image), segtrain.load(run).predict(image)
    np.testing.assert_allclose(exported.probabilities, direct.probabilities, atol=PROB_ATOL, rtol=0)
    assert set(np.unique(exported.mask)) <= {0, 255}


def test_export_refuses_a_non_empty_folder_and_an_unknown_format(run, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("export", run, "--out", out)
    assert result.exit_code == 2 and "not empty" in result.output and "Traceback" not in result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert invoke("export", run, "--format", "pickle").exit_code == 2


def test_a_run_trained_on_16_bit_images_exports_a_uint16_input(tmp_path):
    """16-bit PNGs (the 8-bit stripes times 257): the export takes uint16 pixels and scales them as files are read."""
    from tests.helpers import make_stripes_dataset, write_config

    root = make_stripes_dataset(tmp_path / "data8", n_train=4, n_val=1)
    for path in root.rglob("images/*.png"):
        gray = np.array(Image.open(path).convert("L")).astype(np.uint16) * 257
        Image.fromarray(gray).save(path)  # uint16 arrays become I;16 images
    config = write_config(tmp_path / "c.yaml", root, train={"epochs": 1, "steps_per_epoch": 2})
    run = tmp_path / "run"
    assert invoke("fit", config, "--out", run).exit_code == 0
    assert json.loads((run / "run.json").read_text())["input_sample_type"] == "uint16"
    out = tmp_path / "export"
    assert invoke("export", run, "--out", out).exit_code == 0
    assert json.loads((out / "metadata.json").read_text())["input"]["dtype"] == "uint16"

    image = np.array(Image.open(root / "val" / "images" / "img00.png"))
    assert image.dtype == np.uint16 and image.max() > 255
    labels, probabilities = run_saved_model(out, image[..., None])
    import segtrain

    expected = segtrain.load(run).predict(image)
    np.testing.assert_allclose(probabilities, expected.probabilities, atol=PROB_ATOL, rtol=0)
    assert np.all(np.abs(expected.probabilities[..., 1][labels != expected.labels] - 0.5) < PROB_ATOL)


def test_export_applies_the_tuned_threshold_and_describes_post_processing(run, tmp_path):
    import shutil

    tuned = tmp_path / "run"
    shutil.copytree(run, tuned, ignore=shutil.ignore_patterns("export"))
    assert invoke("tune", tuned, "--objective", "iou").exit_code == 0
    point = json.loads((tuned / "operating_point.json").read_text())
    assert invoke("export", tuned, "--format", "saved_model", "--out", tmp_path / "e").exit_code == 0
    info = json.loads((tmp_path / "e" / "metadata.json").read_text())
    assert info["decision"]["rule"] == "threshold" and info["decision"]["threshold"] == point["threshold"]
    assert info["decision"]["operating_point"]["split"] == "val"
    min_size, max_hole = point["postprocess"]["road"]
    if min_size or max_hole:
        assert info["postprocess"]["settings"]["road"] == {"min_size": min_size, "max_hole": max_hole}
        assert info["postprocess"]["applied"].startswith("NOT inside the model")
    # the model's labels are the threshold's; predict's may differ by its post-processing only
    for image in sample_images():
        labels, probabilities = run_saved_model(tmp_path / "e", image)
        decided = probabilities[..., 1] >= point["threshold"]
        assert np.array_equal(labels == 1, decided)


def test_export_applies_prior_correction_with_several_classes(tmp_path):
    from tests.helpers import THREE_CLASSES, TINY, make_three_class_dataset, write_config

    root = make_three_class_dataset(tmp_path / "data", n_train=4, n_val=2, size=32)
    config = write_config(tmp_path / "c.yaml", root, data={**TINY["data"], **THREE_CLASSES},
                          predict={"prior_correction": "weights"})
    assert invoke("fit", config, "--out", tmp_path / "run").exit_code == 0
    assert invoke("export", tmp_path / "run", "--format", "saved_model", "--out", tmp_path / "e").exit_code == 0
    info = json.loads((tmp_path / "e" / "metadata.json").read_text())
    weights = info["decision"]["prior_correction"]["class_weights"]
    assert info["decision"]["prior_correction"]["tau"] == 1.0 and len(weights) == 3
    image = np.array(Image.open(sorted((root / "val" / "images").glob("*.png"))[0]))
    labels, probabilities = run_saved_model(tmp_path / "e", image)
    corrected = probabilities / np.asarray(weights)
    margin = np.sort(corrected, axis=-1)
    clear = (margin[..., -1] - margin[..., -2]) > PROB_ATOL  # away from a tie
    np.testing.assert_array_equal(labels[clear], np.argmax(corrected, axis=-1)[clear])
    assert not np.array_equal(np.argmax(corrected, -1), np.argmax(probabilities, -1))  # the correction bites here


def test_b_bit_samples_export_as_uint16_scaled_by_their_own_range():
    """12-bit microscopy (BitsPerSample 12, read as v * 255 / 4095): the export takes uint16 values up to 4095 and
    scales them by the same factor, not by 255 / 65535."""
    from segtrain.config import config_from_dict
    from segtrain.export import input_spec, serving_module
    from segtrain.model import build_unet

    assert input_spec("uint8") == ("uint8", 255) and input_spec("uint16") == ("uint16", 65535)
    assert input_spec("uint12") == ("uint16", 4095)
    with pytest.raises(ValueError):
        input_spec("int32")
    config = config_from_dict({"data": {"root": "x", "classes": ["a", "b"]}, "model": {"depth": 1, "base_filters": 2}})
    model = build_unet(1, 1, depth=1, base_filters=2)
    module = serving_module(model, config, input_type="uint12")
    raw = (np.arange(64).reshape(1, 8, 8, 1) * 64).astype(np.uint16)  # 0 .. 4032
    out = module.serve(raw)
    from segtrain.policy.rules import probabilities_tf

    expected = probabilities_tf(model(raw.astype(np.float32) * (255.0 / 4095.0))).numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-6, rtol=0)
