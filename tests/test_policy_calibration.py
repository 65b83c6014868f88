"""Temperature scaling (segtrain.calibration): the fit, the ECE, and how fit, predict, eval and export use it."""

import json
import math
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from segtrain.calibration import (
    ReliabilityBins,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from tests.helpers import invoke, make_stripes_dataset, write_config


def draw_labels(rng, logits, temperature):
    """Class indices drawn from softmax(z / T) (sigmoid for one channel), by the inverse CDF."""
    p = apply_temperature(logits, temperature)
    return (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)[:, :-1]).sum(axis=1)


def log_t_standard_error(logits, temperature):
    """Asymptotic standard error of the maximum-likelihood log T at the true T.

    With b = 1/T, -log p_y = logsumexp(b z) - b z_y has second derivative Var_{k~p}(z_k) in b
    (one channel: the two-class logits [0, z]); u = log T has db/du = -b, and the first derivative
    has mean 0 at the truth, so the Fisher information per pixel is I_u = b^2 E[Var_p(z)] and
    SE = 1 / sqrt(N I_u).
    """
    z = np.asarray(logits, np.float64)
    if z.shape[-1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=-1)
    p = apply_temperature(z, temperature)
    mean = (p * z).sum(-1)
    var = (p * z**2).sum(-1) - mean**2
    b = 1.0 / temperature
    return 1.0 / math.sqrt(len(z) * b**2 * var.mean())


@pytest.mark.parametrize("channels, true_t", [(1, 0.5), (1, 2.0), (3, 0.7), (3, 3.0)])
def test_fit_recovers_a_known_temperature(channels, true_t):
    rng = np.random.default_rng(7)
    n = 100_000
    logits = rng.normal(0.0, 3.0, (n, channels))
    labels = draw_labels(rng, logits, true_t)
    fitted = fit_temperature(logits, labels)
    se = log_t_standard_error(logits, true_t)
    print(f"C={channels}: true T {true_t}, fitted {fitted:.4f}, |log ratio| {abs(math.log(fitted / true_t)):.4f}, "
          f"SE {se:.4f}")
    assert abs(math.log(fitted / true_t)) < 4 * se + 1e-5  # 4 standard errors + the search's tolerance


def test_calibration_lowers_the_nll_of_held_out_data():
    rng = np.random.default_rng(3)
    fit_z, test_z = rng.normal(0, 4, (50_000, 4)), rng.normal(0, 4, (50_000, 4))
    fit_y, test_y = draw_labels(rng, fit_z, 2.5), draw_labels(rng, test_z, 2.5)  # an over-confident "model"
    t = fit_temperature(fit_z, fit_y)
    before, after = negative_log_likelihood(test_z, test_y), negative_log_likelihood(test_z, test_y, t)
    assert after < before - 0.05
    ece_before = expected_calibration_error(apply_temperature(test_z), test_y)
    ece_after = expected_calibration_error(apply_temperature(test_z, t), test_y)
    assert ece_after < ece_before / 3


def test_temperature_one_leaves_probabilities_unchanged():
    import keras
    from keras import layers

    from segtrain.policy.inference import predict_probabilities

    z = np.random.default_rng(0).normal(size=(5, 3))
    reference = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(apply_temperature(z, 1.0), reference, rtol=1e-12)
    # through the tiled forward pass: T = 1 is today's result bit for bit, T = 2 is softmax(z / 2) per pixel
    keras.utils.set_random_seed(1)
    inp = keras.Input((None, None, 2))
    model = keras.Model(inp, layers.Conv2D(3, 1)(layers.Conv2D(8, 1, activation="tanh")(inp)))
    image = np.random.default_rng(1).normal(size=(70, 50, 2)).astype("float32")  # several tiles of 32
    plain = predict_probabilities(model, image, tile_size=32, divisor=4)
    np.testing.assert_array_equal(predict_probabilities(model, image, tile_size=32, divisor=4, temperature=1.0), plain)
    logits = np.asarray(model(image[None], training=False))[0]
    hot = predict_probabilities(model, image, tile_size=32, divisor=4, temperature=2.0)
    np.testing.assert_allclose(hot, apply_temperature(logits, 2.0), atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        predict_probabilities(model, image, tile_size=32, divisor=4, temperature=0.0)


def test_ece_hand_worked():
    # Two classes, top-class confidence max(p, 1 - p); 15 bins of width 1/15, (m-1)/15 < conf <= m/15:
    #   p_fg 0.90, truth 1: predicted 1, right, conf 0.90 -> bin (13/15, 14/15]
    #   p_fg 0.90, truth 0: predicted 1, wrong, conf 0.90 -> same bin: accuracy 1/2, confidence 0.90
    #   p_fg 0.15, truth 0: predicted 0, right, conf 0.85 -> bin (12/15, 13/15]: |1 - 0.85| = 0.15
    #   p_fg 0.70, truth 1: predicted 1, right, conf 0.70 -> bin (10/15, 11/15]: |1 - 0.70| = 0.30
    #   p_fg 0.50, ignored: counts nowhere
    # ECE = 2/4 * 0.40 + 1/4 * 0.15 + 1/4 * 0.30 = 0.3125
    p = np.array([0.9, 0.9, 0.15, 0.7, 0.5])
    probs = np.stack([1 - p, p], axis=-1)
    truth = np.array([1, 0, 0, 1, -1])
    assert expected_calibration_error(probs, truth) == pytest.approx(0.3125)
    # Three classes: [0.5, 0.3, 0.2] truth 0 (right, conf 0.5); [0.1, 0.25, 0.65] truth 1 (wrong, conf 0.65):
    # ECE = 1/2 * |1 - 0.5| + 1/2 * |0 - 0.65| = 0.575
    three = np.array([[0.5, 0.3, 0.2], [0.1, 0.25, 0.65]])
    assert expected_calibration_error(three, np.array([0, 1])) == pytest.approx(0.575)
    # streaming: two updates count as one
    bins = ReliabilityBins()
    bins.update(probs[:2], truth[:2])
    bins.update(probs[2:], truth[2:])
    assert bins.ece() == pytest.approx(0.3125) and bins.count.sum() == 4
    curve = bins.curve()
    assert curve["count"][13] == 2 and curve["accuracy"][13] == 0.5 and curve["confidence"][13] == pytest.approx(0.9)
    assert curve["accuracy"][0] is None


# ---------------------------------------------------------------------------- in a run

PROB_ATOL = 1e-4  # the parity rule of tests/test_export.py: float32 kernel differences only


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("calibration")
    root = make_stripes_dataset(base / "stripes", n_train=6, n_val=3)
    config = write_config(base / "tiny.yaml", root)
    result = invoke("fit", config, "--out", base / "run")
    assert result.exit_code == 0, result.output
    assert "Calibration on val" in result.output
    return base / "run", root, result.output


def val_image(root, i=0):
    return np.array(Image.open(root / "val" / "images" / f"img{i:02d}.png"))


def model_logits(run_dir, image):
    import keras

    model = keras.models.load_model(run_dir / "best.keras", compile=False)
    return np.asarray(model(image[None].astype("float32"), training=False))[0]


def with_predict_settings(run_dir, target, **predict):
    """A copy of a run folder whose config.yaml has these predict settings."""
    shutil.copytree(run_dir, target)
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["predict"].update(predict)
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def set_temperature(run_dir, temperature):
    path = run_dir / "calibration.json"
    info = json.loads(path.read_text())
    info["temperature"] = temperature
    path.write_text(json.dumps(info))


@pytest.mark.slow
def test_fit_writes_calibration_json_and_eval_reports_the_ece(run):
    run_dir, _, output = run
    info = json.loads((run_dir / "calibration.json").read_text())
    assert info["split"] == "val" and info["pixels"] == 3 * 32 * 32 and info["model"] == "best.keras"
    assert info["nll_after"] <= info["nll_before"] and info["temperature"] != 1.0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    calibration = metrics["calibration"]
    print(f"tiny run: T {info['temperature']:.4f}; ECE {calibration['ece_before']:.4f} -> "
          f"{calibration['ece_after']:.4f}; NLL {info['nll_before']:.4f} -> {info['nll_after']:.4f}")
    assert calibration["temperature"] == pytest.approx(info["temperature"])
    # eval counts every pixel of the same split as the fit's (all of it: 3 images of 32 x 32)
    # (float32 there, float64 here: a pixel on a bin edge may move, 1/3072 of weight at most)
    assert calibration["ece_before"] == pytest.approx(info["ece_before"], abs=1e-3)
    assert calibration["ece_after"] == pytest.approx(info["ece_after"], abs=1e-3)
    assert sum(calibration["reliability_after"]["count"]) == 3 * 32 * 32
    assert (run_dir / "reliability.png").is_file() and "ECE" in output


@pytest.mark.slow
def test_predict_uses_the_temperature(run, tmp_path):
    import segtrain

    run_dir, root, _ = run
    t = json.loads((run_dir / "calibration.json").read_text())["temperature"]
    image = val_image(root)
    z = model_logits(run_dir, image)[..., 0]
    prediction = segtrain.load(run_dir).predict(image)  # 32 x 32: one tile, one exact forward pass
    np.testing.assert_allclose(prediction.probabilities[..., 1], 1 / (1 + np.exp(-z / t)), atol=1e-5)
    # `segtrain predict --probabilities-format npy` writes the same calibrated probabilities
    result = invoke("predict", root / "val" / "images" / "img00.png", "--checkpoint", run_dir, "--out",
                    tmp_path / "pred", "--probabilities-format", "npy")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "pred" / "img00.npy"), prediction.probabilities, atol=1e-6)


@pytest.mark.slow
def test_calibrate_false_ignores_it_and_another_model_is_not_given_it(run, tmp_path):
    import segtrain

    run_dir, root, _ = run
    image = val_image(root, 1)
    z = model_logits(run_dir, image)[..., 0]
    off = with_predict_settings(run_dir, tmp_path / "off", calibrate=False)
    set_temperature(off, 3.0)
    np.testing.assert_allclose(segtrain.load(off).predict(image).probabilities[..., 1], 1 / (1 + np.exp(-z)),
                               atol=1e-5)
    # a calibration.json fitted for best.keras does not apply to last.keras
    messages = []
    other = segtrain.load(run_dir / "last.keras", log=messages.append)
    assert other._predictor.temperature == 1.0 and any("another model file" in m for m in messages)


@pytest.mark.slow
def test_the_calibrate_command_refits_on_demand(run, tmp_path):
    run_dir, _, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    fitted = json.loads((copy / "calibration.json").read_text())
    (copy / "calibration.json").unlink()
    result = invoke("calibrate", copy, "--split", "val")
    assert result.exit_code == 0, result.output
    again = json.loads((copy / "calibration.json").read_text())
    assert again["temperature"] == pytest.approx(fitted["temperature"], rel=1e-6) and "T = " in result.output
    assert invoke("calibrate", copy, "--split", "nope").exit_code == 2


def run_saved_model(path, image):
    import tensorflow as tf

    out = tf.saved_model.load(str(path / "saved_model")).signatures["serving_default"](images=tf.constant(image[None]))
    return out["labels"].numpy()[0], out["probabilities"].numpy()[0]


def run_onnx(path, image):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path / "model.onnx"))
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": image[None]})))
    return out["labels"][0], out["probabilities"][0]


def run_tflite(path, image):
    from ai_edge_litert.interpreter import Interpreter

    out = Interpreter(model_path=str(path / "model.tflite")).get_signature_runner("serving_default")(images=image[None])
    return out["labels"][0], out["probabilities"][0]


RUNNERS = {"saved_model": run_saved_model, "onnx": run_onnx, "tflite": run_tflite}


@pytest.fixture(scope="module")
def hot_run(run, tmp_path_factory):
    """A copy of the run with T = 2.5 and flip TTA."""
    run_dir, _, _ = run
    hot = with_predict_settings(run_dir, tmp_path_factory.mktemp("hot") / "run", tta=True)
    set_temperature(hot, 2.5)
    return hot


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(RUNNERS))
def test_export_with_a_temperature_matches_predict(run, hot_run, tmp_path, fmt):
    import segtrain

    if fmt != "saved_model":
        pytest.importorskip({"onnx": "onnxruntime", "tflite": "ai_edge_litert"}[fmt])
    _, root, _ = run
    out = tmp_path / fmt
    result = invoke("export", hot_run, "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["calibration"]["temperature"] == 2.5 and meta["test_time_augmentation"] is True
    reference = segtrain.load(hot_run)
    assert reference._predictor.temperature == 2.5
    first = val_image(root)
    for image in (first, val_image(root, 2), first[3:30, 1:26]):  # 27 x 25: padded inside, cropped back
        expected = reference.predict(image)
        labels, probabilities = RUNNERS[fmt](out, image)
        np.testing.assert_allclose(probabilities, expected.probabilities, atol=PROB_ATOL, rtol=0)
        differ = labels != expected.labels
        assert np.all(np.abs(expected.probabilities[..., 1][differ] - 0.5) < PROB_ATOL)
    # and the temperature did something: T = 1 gives other probabilities
    predictor = reference._predictor
    assert not np.allclose(predictor.probabilities(first.astype("float32")),
                           predictor.probabilities(first.astype("float32"), calibrated=False), atol=1e-3)
