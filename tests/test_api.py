"""The Python API: `segtrain.fit`, `segtrain.load(...).predict`, `segtrain.evaluate`, against the CLI's files; a run
and its export behind the same `predict` (post-processing included); b-bit arrays.

Run and export agree within PROB_ATOL = 1e-4 on q (the same float32 network and padding; the policy in float64 on
one side, float32 in the graph on the other: a few 1e-8 measured), and on every label whenever the rule's labels and
the fallback classes before post-processing agree (they may differ only at a tie of q)."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import THREE_CLASSES, TINY, invoke, make_stripes_dataset, make_three_class_dataset, write_config

pytestmark = pytest.mark.slow

PROB_ATOL = 1e-4


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
    assert prediction.probabilities.dtype == np.float32 and prediction.probabilities.shape == image.shape[:2] + (2,)
    np.testing.assert_allclose(prediction.probabilities.sum(-1), 1.0, rtol=1e-6)
    # the mask is the training encoding (threshold masks: stripe written as 255) of the labels
    np.testing.assert_array_equal(prediction.mask, np.where(prediction.labels == 1, 255, 0))
    # ... and what `segtrain predict` writes for the same file
    assert invoke("predict", result.run_dir, root / "val" / "images" / "img00.png",
                  "--out", tmp_path / "pred").exit_code == 0
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "pred" / "img00.png")), prediction.mask)
    # a .keras file loads the same run
    same = segtrain.load(result.run_dir / "best.keras").predict(image)
    np.testing.assert_array_equal(same.probabilities, prediction.probabilities)
    # a uint16 array reads as the same picture scaled to 16 bits (the 8-bit value v is v * 257)
    wide = model.predict(image.astype(np.uint16) * 257)
    np.testing.assert_allclose(wide.probabilities, prediction.probabilities, atol=1e-6)
    # overrides of the run's policy: a threshold of 0.999 on q leaves only the surest pixels
    strict = segtrain.load(result.run_dir, threshold=0.999, log=lambda *a: None)
    assert strict.policy.rule == "threshold" and strict.policy.threshold == 0.999
    q_fg = prediction.probabilities[..., 1]
    clear = np.abs(q_fg - 0.999) > 1e-6  # q is float32 here: away from the cut by more than its rounding
    np.testing.assert_array_equal(strict.predict(image).labels[clear], (q_fg >= 0.999)[clear])

    metrics = segtrain.evaluate(result.run_dir, split="val", out=tmp_path / "eval", log=lambda *a: None)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["mean_iou"] == pytest.approx(saved["mean_iou"]) and metrics["split"] == "val"
    # the CLI's own fit went through the same function: the same run from the same config
    assert segtrain.fit.__module__ == "segtrain.api"


def test_a_run_and_its_export_predict_alike_post_processing_included(tmp_path):
    """Three classes and per-class post-processing from the config: `segtrain.load` of the export
    folder (an ExportedSegmenter, which applies metadata.json's post-processing outside the graph) gives the
    run's Segmenter's labels, q and mask."""
    import segtrain
    from segtrain.api import ExportedSegmenter, Segmenter
    from segtrain.errors import CheckpointError

    root = make_three_class_dataset(tmp_path / "data", n_train=4, n_val=3, size=32)
    config = write_config(tmp_path / "c.yaml", root, data={**TINY["data"], **THREE_CLASSES},
                          train={"epochs": 1, "steps_per_epoch": 3},
                          predict={"min_size": {"background": 5, "stripe": 12, "square": 6},
                                   "max_hole": {"background": 5}})
    run, out = tmp_path / "run", tmp_path / "export"
    assert invoke("fit", config, "--out", run).exit_code == 0
    result = invoke("export", run, "--out", out)
    assert result.exit_code == 0 and "not inside the exported model" in result.output

    direct = segtrain.load(run)
    exported = segtrain.load(str(out))  # a path to an export folder (a string will do)
    assert isinstance(direct, Segmenter) and isinstance(exported, ExportedSegmenter)
    assert exported.classes == direct.classes == ["background", "stripe", "square"]
    assert direct.policy.postprocess == {0: (5, 5), 1: (12, 0), 2: (6, 0)}
    assert exported.metadata["postprocess"]["settings"] == {
        "background": {"min_size": 5, "max_hole": 5}, "stripe": {"min_size": 12, "max_hole": 0},
        "square": {"min_size": 6, "max_hole": 0}}
    with pytest.raises(CheckpointError, match="export again"):
        segtrain.load(out, threshold=0.5)
    with pytest.raises(CheckpointError):
        segtrain.load(out, tta=True)

    import tensorflow as tf

    from segtrain.data.images import as_model_input
    from segtrain.policy.postprocess import second_choice

    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    images = [np.array(Image.open(p)) for p in sorted((root / "val" / "images").glob("*.png"))]
    images.append(images[0][3:30, 1:26])  # 27 x 25: padded inside the export, reflect-padded by predict
    compared = changed = 0
    for image in images:
        a, b = direct.predict(image), exported.predict(image)
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=PROB_ATOL, rtol=0)
        # before post-processing: the rule's labels and the fallback classes on each side
        _, q, _ = direct._predictor.predict(as_model_input(image, 3))
        out_tf = serve(images=tf.constant(image[None]))
        raw_a, raw_b = direct.policy.decide(q), out_tf["labels"].numpy()[0]
        fallback_a, fallback_b = second_choice(q, raw_a), second_choice(out_tf["probabilities"].numpy()[0], raw_b)
        if np.array_equal(raw_a, raw_b) and np.array_equal(fallback_a, fallback_b):
            # the same maps in: the same post-processing out, label for label
            np.testing.assert_array_equal(b.labels, a.labels)
            np.testing.assert_array_equal(b.mask, a.mask)
            compared += 1
        else:  # float32 against float64 may flip a pixel only at a tie of q
            gaps = np.diff(np.sort(q, axis=-1), axis=-1).min(axis=-1)
            assert np.all(gaps[(raw_a != raw_b) | (fallback_a != fallback_b)] < PROB_ATOL)
        changed += int(np.any(a.labels != raw_a))
    assert compared >= 3  # such ties are rare: almost every image is compared label for label
    assert changed >= 1  # and the post-processing did change labels (else the agreement would prove little)
    np.testing.assert_array_equal(np.unique(b.mask), np.unique(b.labels))  # values masks: 0, 1, 2

    # both take a file path (str or Path) and a batch: an N x H x W x C array or a list of files
    paths = sorted((root / "val" / "images").glob("*.png"))
    for model in (direct, exported):
        singles = [model.predict(image) for image in images[:3]]
        batch = model.predict(np.stack(images[:3]))
        from_files = model.predict([paths[0], str(paths[1]), paths[2]])
        assert isinstance(batch, list) and len(batch) == 3 and isinstance(from_files, list) and len(from_files) == 3
        for single, batched, read in zip(singles, batch, from_files):
            np.testing.assert_array_equal(batched.probabilities, single.probabilities)
            np.testing.assert_array_equal(read.probabilities, single.probabilities)  # 8-bit files: the same pixels
            np.testing.assert_array_equal(read.mask, single.mask)
        np.testing.assert_array_equal(model.predict(str(paths[0])).labels, singles[0].labels)


def test_b_bit_arrays_are_scaled_by_their_own_range(tmp_path):
    """A run trained on 12-bit samples reads a uint16 array as v / 4095 of full scale (as its files were read), not
    v / 65535; float arrays are [0, 1]."""
    import segtrain
    from segtrain.api import Segmenter, _scaled_to_run

    twelve = np.array([[0, 1000, 4095]], np.uint16)
    np.testing.assert_array_equal(_scaled_to_run(twelve, "uint12"), twelve / 4095.0)
    assert _scaled_to_run(twelve, "uint16") is twelve and _scaled_to_run(twelve, "uint8") is twelve
    eight = twelve.astype(np.uint8)
    assert _scaled_to_run(eight, "uint12") is eight  # only uint16 arrays are b-bit samples

    root = make_stripes_dataset(tmp_path / "data", n_train=4, n_val=1)
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", root, train={"epochs": 1, "steps_per_epoch": 2})
    assert invoke("fit", config, "--out", run).exit_code == 0
    loaded = segtrain.load(run)
    as_twelve = Segmenter(loaded._predictor, loaded.config, "uint12")
    image = (np.array(Image.open(root / "val" / "images" / "img00.png")).astype(np.uint16) * 16)  # 0 .. 4080
    got = as_twelve.predict(image)
    expected = loaded.predict(image.astype(np.float64) / 4095.0)
    np.testing.assert_array_equal(got.probabilities, expected.probabilities)
    assert not np.allclose(loaded.predict(image).probabilities, got.probabilities, atol=1e-3)  # 65535 differs

    # a file is read as training reads it (read_image: a 16-bit PNG by 65535) and not scaled again by the run's
    # sample type (as_twelve would scale a uint16 array by 4095): the 8-bit picture stored as 16-bit v * 257 predicts
    # as its 8-bit pixels do
    eight_bit = root / "val" / "images" / "img00.png"
    sixteen = tmp_path / "img00_16.png"
    Image.fromarray(np.array(Image.open(eight_bit).convert("L")).astype(np.uint16) * 257).save(sixteen)
    gray = loaded.predict(np.array(Image.open(eight_bit).convert("L")))
    for model in (loaded, as_twelve):
        np.testing.assert_allclose(model.predict(sixteen).probabilities, gray.probabilities, atol=1e-6)
        np.testing.assert_allclose(model.predict(str(sixteen)).probabilities, gray.probabilities, atol=1e-6)


def test_load_refuses_bad_arrays():
    from segtrain.data.images import as_model_input
    from segtrain.errors import DataError

    with pytest.raises(DataError, match="expected an image array"):
        as_model_input(np.zeros((4, 4, 2), np.uint8), 3)
    gray = as_model_input(np.full((2, 2), 65535, np.uint16), 3)
    assert gray.shape == (2, 2, 3) and np.allclose(gray, 255.0)
    rgb = as_model_input(np.array([[[255, 0, 0]]], np.uint8), 1)
    assert rgb.shape == (1, 1, 1) and rgb[0, 0, 0] == pytest.approx(0.299 * 255)


def test_predict_takes_paths_arrays_and_batches():
    """`predict_input`, behind both predict methods: what each kind of input becomes before the model (no model)."""
    from segtrain.api import predict_input
    from segtrain.errors import DataError

    seen = []

    def fake(pixels):
        seen.append(pixels)
        return len(seen)

    image = np.full((4, 5), 4095, np.uint16)
    assert predict_input(image, fake, 1, "uint12") == 1 and np.allclose(seen[-1], 255.0)  # b-bit arrays: by 2**b - 1
    assert predict_input(image, fake, 1, "uint16") == 2 and np.allclose(seen[-1], 4095 * 255 / 65535)
    assert predict_input(np.zeros((3, 4, 5, 1), np.uint8), fake, 1, "uint8") == [3, 4, 5]  # a batch: a list
    assert seen[-1].shape == (4, 5, 1)
    assert predict_input([image, image], fake, 1, "uint8") == [6, 7]
    with pytest.raises(DataError, match="nowhere.png: file not found"):
        predict_input("nowhere.png", fake, 1, "uint8")
    with pytest.raises(DataError, match="expected an image array"):
        predict_input(np.zeros((2, 3, 4, 5, 1)), fake, 1, "uint8")


def test_the_package_lists_its_public_names():
    import segtrain

    public = {"fit", "load", "evaluate", "Prediction", "FitResult", "Segmenter", "ExportedSegmenter", "__version__"}
    assert set(segtrain.__all__) == public
    assert public <= set(dir(segtrain))
    for name in public:
        assert getattr(segtrain, name) is not None
    from segtrain.api import Prediction

    assert segtrain.Prediction is Prediction
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        segtrain.nope
