"""`segtrain export`: SavedModel, ONNX and TFLite against `segtrain predict` on the shipped sample data, the
decision policy inside the graph against its NumPy twin, and metadata.json against the policy it describes.

Parity rule: the exported graph runs the same float32 network on the same reflect-padded
pixels as `predict` (images no larger than a tile are one forward pass there), so the
probabilities may differ only by float32 kernel differences between runtimes (ONNX Runtime's
and XNNPACK's convolutions sum in other orders: ~1e-6 relative per layer, a few 1e-6 absolute
after the sigmoid); PROB_ATOL = 1e-4 leaves a margin of 10x or more. A label may differ only
where q lies within PROB_ATOL of the rule's boundary (0.5 for arg-max with two classes).

The policy twins (`DecisionPolicy.apply`, float64, and `tf_scores_and_labels`, float32) are compared on the same
logits: q within TWIN_ATOL = 1e-6 (float32 softmax and normalisation of values <= 1: a few 2**-24 relative), labels
equal wherever the rule's margin exceeds TIE = 1e-5 (10x TWIN_ATOL).
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from segtrain.policy.policy import DecisionPolicy
from tests.helpers import REPO, invoke

PROB_ATOL = 1e-4
TWIN_ATOL = 1e-6
TIE = 1e-5
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


def margin(policy, q):
    """How far each pixel's q is from changing the rule's label (0 at a tie)."""
    q = np.asarray(q, np.float64)
    if policy.rule == "cost":
        expected = np.sort(q @ np.asarray(policy.cost_matrix, np.float64), axis=-1)
        return expected[..., 1] - expected[..., 0]
    if policy.num_classes == 2:
        return np.abs(q[..., 1] - (policy.threshold if policy.rule == "threshold" else 0.5))
    top = np.sort(q, axis=-1)
    return top[..., -1] - top[..., -2]


def corrected(probs, weights, tau, bias=None):
    """q_c = p_c w_c**-tau exp(b_c) / sum_j (...), written out here (weight 0: no correction)."""
    w = np.asarray(weights, np.float64)
    scale = np.where(w > 0, np.where(w > 0, w, 1.0) ** -float(tau), 1.0)
    if bias is not None:
        scale = scale * np.exp(np.asarray(bias, np.float64))
    q = np.asarray(probs, np.float64) * scale
    return q / q.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------- the policy in the graph (fast)


POLICIES = {
    "per-class T, prior correction, biases": dict(
        classes=["a", "b", "c"], temperature=[0.5, 1.0, 2.5], class_weights=[0.5, 1.5, 6.0], tau=0.7,
        bias=[0.2, -0.3, 0.5]),
    "cost rule, per-class T, biases": dict(
        classes=["a", "b", "c"], temperature=[1.5, 0.7, 1.0], bias=[0.0, 0.4, -0.6], rule="cost",
        cost_matrix=np.array([[0, 1, 4], [2, 0, 1], [1, 3, 0]], float)),
    "a class of weight 0": dict(classes=["a", "b", "c"], class_weights=[0.0, 2.0, 0.5], tau=1.0),
    "sigmoid, threshold, prior correction, bias": dict(
        classes=["bg", "fg"], temperature=0.6, class_weights=[0.6, 3.0], tau=1.0, bias=[0.0, 0.3],
        rule="threshold", threshold=0.3),
    "sigmoid, cost rule, prior correction": dict(
        classes=["bg", "fg"], temperature=1.7, class_weights=[0.6, 3.0], tau=0.5, rule="cost",
        cost_matrix=np.array([[0.0, 1.0], [4.0, 0.0]])),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_tf_and_numpy_policies_agree_on_the_same_logits(name):
    policy = DecisionPolicy(**POLICIES[name])
    channels = 1 if policy.num_classes == 2 else policy.num_classes
    logits = np.random.default_rng(0).normal(0.0, 2.0, (40, 50, channels)).astype(np.float32)
    q, labels = policy.apply(logits)
    q_tf, labels_tf = (t.numpy() for t in policy.tf_scores_and_labels(logits[None]))
    np.testing.assert_allclose(q_tf[0], q, atol=TWIN_ATOL, rtol=0)
    clear = margin(policy, q) > TIE
    assert clear.mean() > 0.99  # near-ties are rare: the comparison below covers almost every pixel
    np.testing.assert_array_equal(labels_tf[0][clear], labels[clear])
    # q is written out here independently: softmax(z / T) (sigmoid for one channel), then the correction
    z = logits.astype(np.float64) / np.asarray(policy.temperature, np.float64)
    if channels == 1:
        p = 1.0 / (1.0 + np.exp(-z))
        p = np.concatenate([1.0 - p, p], -1)
    else:
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    weights = policy.class_weights or [1.0] * policy.num_classes
    np.testing.assert_allclose(q, corrected(p, weights, policy.tau, policy.bias), rtol=1e-12, atol=1e-15)
    # and the settings do change the labels against plain arg-max of the model's probabilities
    assert not np.array_equal(labels, DecisionPolicy(policy.classes).apply(logits)[1])


@pytest.mark.parametrize("tta, resize", [(False, None), (True, None), (False, [16, 20])])
def test_the_serving_module_applies_the_policy_to_the_model_logits(tta, resize):
    """The exported function of a small U-Net (per-class temperatures, biases, prior correction; flips with TTA;
    data.resize) on a 21 x 27 image (padded inside to 24 x 28, cropped back) against `Predictor.predict`: its logits
    (predict's padding, flips and resizing) through the NumPy policy."""
    import keras

    from segtrain.config import config_from_dict
    from segtrain.export import serving_module
    from segtrain.model import build_unet
    from segtrain.policy.predictor import Predictor

    keras.utils.set_random_seed(3)
    config = config_from_dict({"data": {"root": "x", "classes": ["a", "b", "c"], "resize": resize},
                               "model": {"depth": 2, "base_filters": 4}})
    model = build_unet(3, 3, depth=2, base_filters=4)
    policy = DecisionPolicy(**POLICIES["per-class T, prior correction, biases"], tta=tta)
    image = np.random.default_rng(1).integers(0, 256, (21, 27, 3)).astype(np.uint8)
    out = serving_module(model, config, policy).serve(image[None])
    _, q, labels = Predictor(model, config, policy).predict(image.astype(np.float32))
    assert out["labels"].dtype.name == "int32" and out["labels"].shape == (1, 21, 27)
    np.testing.assert_allclose(out["probabilities"].numpy()[0], q, atol=TWIN_ATOL * 10, rtol=0)
    clear = margin(policy, q) > TIE
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(out["labels"].numpy()[0][clear], labels[clear])


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
    module = serving_module(model, config, DecisionPolicy(["a", "b"]), input_type="uint12")
    raw = (np.arange(64).reshape(1, 8, 8, 1) * 64).astype(np.uint16)  # 0 .. 4032
    out = module.serve(raw)
    from segtrain.decision import probabilities_tf

    expected = probabilities_tf(model(raw.astype(np.float32) * (255.0 / 4095.0))).numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-6, rtol=0)


def test_metadata_describes_the_policy_well_enough_to_rebuild_it():
    """metadata.json's decision and post-processing, read back into a DecisionPolicy, give the labels of the policy
    exported; the rest of the metadata says what the inputs and outputs are."""
    from segtrain.config import config_from_dict
    from segtrain.export import export_metadata
    from segtrain.policy.store import ResolvedPolicy

    config = config_from_dict({"data": {"root": "x", "classes": ["background", "road"], "mask": {"threshold": 127}},
                               "model": {"depth": 3, "base_filters": 4}})
    policy = DecisionPolicy(["background", "road"], temperature=0.7, class_weights=[0.6, 3.0], tau=1.0,
                            bias=[0.0, 0.25], rule="threshold", threshold=0.35, postprocess={1: (12, 4)}, tta=True)
    tuned = {"split": "val", "objective": "f1", "images": 3, "pixels": 300, "threshold": 0.35, "bias": [0.0, 0.25]}
    resolved = ResolvedPolicy(policy, None, tuned, ["threshold 0.35 (policy.json, tuned on val)"])
    meta = export_metadata(config, "text of config.yaml", 3, policy, "uint12", resolved)

    decision = meta["decision"]
    assert decision["rule"] == "threshold" and decision["threshold"] == 0.35 and decision["temperature"] == 0.7
    assert decision["prior_correction"] == {"tau": 1.0, "bias": [0.0, 0.25], "class_weights": [0.6, 3.0]}
    s0, s1 = 0.6**-1.0, 3.0**-1.0 * np.exp(0.25)  # the cut on p: t s0 / (t s0 + (1 - t) s1)
    assert decision["foreground_cut"] == pytest.approx(0.35 * s0 / (0.35 * s0 + 0.65 * s1), rel=1e-12)
    assert decision["sources"] == resolved.sources
    assert decision["tuned"] == {"split": "val", "objective": "f1", "images": 3, "pixels": 300}
    assert "postprocess" not in decision and "inside the model" in decision["applied"]
    assert meta["postprocess"]["settings"] == {"road": {"min_size": 12, "max_hole": 4}}
    assert meta["postprocess"]["applied"].startswith("NOT inside the model")
    assert meta["test_time_augmentation"] is True
    assert meta["classes"] == ["background", "road"]
    assert meta["labels_to_mask"] == {"kind": "values", "values": [0, 255]}
    assert meta["input"] == {"channels": 3, "dtype": "uint16", "max_value": 4095, "sample_type": "uint12",
                             "layout": "B x H x W x C, raw pixel values", "resize": None, "pad_to_multiple_of": 8}
    assert meta["config_sha256"] == hashlib.sha256(b"text of config.yaml").hexdigest()
    json.dumps(meta)  # JSON-ready

    prior = decision["prior_correction"]
    rebuilt = DecisionPolicy(meta["classes"], temperature=decision["temperature"], class_weights=prior["class_weights"],
                             tau=prior["tau"], bias=prior["bias"], rule=decision["rule"],
                             threshold=decision["threshold"], cost_matrix=decision["cost_matrix"],
                             postprocess={meta["classes"].index(n): (v["min_size"], v["max_hole"])
                                          for n, v in meta["postprocess"]["settings"].items()})
    logits = np.random.default_rng(2).normal(0.0, 1.5, (30, 30, 1))
    q, labels = policy.apply(logits)
    q2, labels2 = rebuilt.apply(logits)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(labels2, labels)
    assert not np.array_equal(labels, policy.decide(q))  # the post-processing is part of it here

    plain = export_metadata(config, "", 3, DecisionPolicy(["background", "road"]))
    assert plain["postprocess"] == {"settings": {}, "applied": None}
    assert plain["decision"]["prior_correction"] == {"tau": 0.0, "bias": None, "class_weights": None}
    assert "sources" not in plain["decision"] and plain["input"]["dtype"] == "uint8"


# ---------------------------------------------------------------------------- runs, exported (slow)


@pytest.mark.slow
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


@pytest.mark.slow
def test_export_metadata_says_how_to_read_the_outputs(run, tmp_path):
    out = tmp_path / "sm"
    assert invoke("export", run, "--out", out).exit_code == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["classes"] == ["background", "road"] and meta["format"] == "saved_model"
    assert meta["labels_to_mask"] == {"kind": "values", "values": [0, 255]}  # threshold 127: road written as 255
    assert meta["decision"]["rule"] == "argmax" and meta["input"]["channels"] == 3
    assert meta["test_time_augmentation"] is True
    assert meta["config_sha256"] == hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    # the decision is the run's resolved policy: fit's temperature from policy.json, said where it came from
    stored = json.loads((run / "policy.json").read_text())
    assert meta["decision"]["temperature"] == stored["calibration"]["temperature"]
    assert meta["decision"]["sources"] and "policy.json" in meta["decision"]["sources"][0]
    assert meta["decision"]["tuned"] is None and meta["postprocess"] == {"settings": {}, "applied": None}
    # the export folder loads through the Python API, with the mask encoding of the metadata
    import segtrain

    image = sample_images()[0]
    exported, direct = segtrain.load(out).predict(image), segtrain.load(run).predict(image)
    np.testing.assert_allclose(exported.probabilities, direct.probabilities, atol=PROB_ATOL, rtol=0)
    assert set(np.unique(exported.mask)) <= {0, 255}


@pytest.mark.slow
def test_export_refuses_a_non_empty_folder_and_an_unknown_format(run, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("export", run, "--out", out)
    assert result.exit_code == 2 and "not empty" in result.output and "Traceback" not in result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert invoke("export", run, "--format", "pickle").exit_code == 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_export_applies_the_tuned_threshold_and_describes_post_processing(run, tmp_path):
    import segtrain

    tuned = tmp_path / "run"
    shutil.copytree(run, tuned, ignore=shutil.ignore_patterns("export"))
    assert invoke("tune", tuned, "--objective", "iou").exit_code == 0
    point = json.loads((tuned / "policy.json").read_text())["tuned"]
    assert point is not None and point["threshold"] is not None
    assert invoke("export", tuned, "--format", "saved_model", "--out", tmp_path / "e").exit_code == 0
    info = json.loads((tmp_path / "e" / "metadata.json").read_text())
    assert info["decision"]["rule"] == "threshold" and info["decision"]["threshold"] == point["threshold"]
    assert info["decision"]["tuned"]["split"] == "val"
    sizes = {name: {"min_size": n, "max_hole": m} for name, (n, m) in (point["postprocess"] or {}).items() if n or m}
    assert info["postprocess"]["settings"] == sizes
    if sizes:
        assert info["postprocess"]["applied"].startswith("NOT inside the model")
    # the model's labels are the tuned threshold on its own q (no post-processing inside) ...
    direct, exported = segtrain.load(tuned), segtrain.load(tmp_path / "e")
    for image in sample_images():
        labels, probabilities = run_saved_model(tmp_path / "e", image)
        np.testing.assert_array_equal(labels == 1, probabilities[..., 1] >= point["threshold"])
        # ... and the export folder through the API gives what the run gives, post-processing included
        a, b = direct.predict(image), exported.predict(image)
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=PROB_ATOL, rtol=0)
        if np.all(np.abs(a.probabilities[..., 1] - point["threshold"]) > PROB_ATOL):  # no pixel near the cut
            np.testing.assert_array_equal(b.labels, a.labels)


@pytest.mark.slow
def test_export_applies_prior_correction_with_several_classes(tmp_path):
    import segtrain

    from tests.helpers import THREE_CLASSES, TINY, make_three_class_dataset, write_config

    root = make_three_class_dataset(tmp_path / "data", n_train=4, n_val=2, size=32)
    config = write_config(tmp_path / "c.yaml", root, data={**TINY["data"], **THREE_CLASSES},
                          predict={"prior_correction": "weights"})
    assert invoke("fit", config, "--out", tmp_path / "run").exit_code == 0
    assert invoke("export", tmp_path / "run", "--format", "saved_model", "--out", tmp_path / "e").exit_code == 0
    info = json.loads((tmp_path / "e" / "metadata.json").read_text())
    weights = info["decision"]["prior_correction"]["class_weights"]
    assert info["decision"]["prior_correction"]["tau"] == 1.0 and len(weights) == 3
    assert weights == json.loads((tmp_path / "run" / "policy.json").read_text())["class_weights"]
    image = np.array(Image.open(sorted((root / "val" / "images").glob("*.png"))[0]))
    labels, q = run_saved_model(tmp_path / "e", image)
    # q is the corrected p: p from the run's own logits and temperature, divided by the weights by hand
    segmenter = segtrain.load(tmp_path / "run")
    from segtrain.data.images import as_model_input

    logits = segmenter._predictor.logits(as_model_input(image, 3))
    p = segmenter.policy.probabilities(logits)
    np.testing.assert_allclose(q, corrected(p, weights, 1.0), atol=PROB_ATOL, rtol=0)
    top = np.sort(q, axis=-1)
    clear = (top[..., -1] - top[..., -2]) > PROB_ATOL  # away from a tie
    np.testing.assert_array_equal(labels[clear], np.argmax(q, axis=-1)[clear])
    assert not np.array_equal(np.argmax(q, -1), np.argmax(p, -1))  # the correction bites here
