"""Calibration: the temperature fit (segtrain.policy.temperature) on known temperatures, reliability bins and the ECE
and the pixel sample (segtrain.policy.calibration), fitting and storing a run's temperature (segtrain.policy.calibrate),
and how fit, predict, eval, calibrate and export use it (policy.json `calibration`)."""

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from segtrain.config import load_config
from segtrain.errors import DataError
from segtrain.labels import IGNORE_INDEX
from segtrain.policy.calibrate import calibration_line, fit_temperature_on, store_calibration
from segtrain.policy.calibration import ECE_BINS, PixelSample, ReliabilityBins, expected_calibration_error
from segtrain.policy.store import POLICY_FILE, model_digest, read_stored
from segtrain.policy.temperature import apply_temperature, fit_temperature, negative_log_likelihood
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


def nll_reference(logits, labels, temperature=1.0):
    """Mean -log p_y of softmax(z / T) (one channel: the logits [0, z]), by np.log of the probabilities."""
    z = np.asarray(logits, np.float64)
    if z.shape[-1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=-1)
    s = z / np.asarray(temperature, np.float64)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def ece_reference(probs, truth, bins=ECE_BINS):
    """The ECE by its definition, bin by bin: B_m = {(m - 1)/M < conf <= m/M}, sum_m |B_m|/N |acc - conf|; two
    classes predict the foreground when p_fg >= 0.5; IGNORE_INDEX pixels skipped."""
    probs, truth = np.asarray(probs, np.float64).reshape(-1, np.shape(probs)[-1]), np.asarray(truth).ravel()
    keep = truth != IGNORE_INDEX
    probs, truth = probs[keep], truth[keep]
    pred = (probs[:, 1] >= 0.5).astype(int) if probs.shape[1] == 2 else probs.argmax(1)
    conf = probs[np.arange(len(pred)), pred]
    total = 0.0
    for m in range(1, bins + 1):
        members = (conf > (m - 1) / bins) & (conf <= m / bins)
        if members.any():
            total += members.sum() / len(conf) * abs((pred[members] == truth[members]).mean() - conf[members].mean())
    return total


# ---------------------------------------------------------------------------- the fit


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

    from segtrain.policy.inference import predict_logits, predict_probabilities

    z = np.random.default_rng(0).normal(size=(5, 3))
    reference = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(apply_temperature(z, 1.0), reference, rtol=1e-12)
    # through the tiled forward pass: T = 1 is the default bit for bit, T = 2 is softmax(z / 2) per pixel
    keras.utils.set_random_seed(1)
    inp = keras.Input((None, None, 2))
    model = keras.Model(inp, layers.Conv2D(3, 1)(layers.Conv2D(8, 1, activation="tanh")(inp)))
    image = np.random.default_rng(1).normal(size=(70, 50, 2)).astype("float32")  # several tiles of 32
    plain = predict_probabilities(model, image, tile_size=32, divisor=4)
    np.testing.assert_array_equal(predict_probabilities(model, image, tile_size=32, divisor=4, temperature=1.0), plain)
    logits = np.asarray(model(image[None], training=False))[0]  # a 1x1 network: tiles blend to the same logits
    hot = predict_probabilities(model, image, tile_size=32, divisor=4, temperature=2.0)
    np.testing.assert_allclose(hot, apply_temperature(logits, 2.0), atol=1e-5)
    # the temperature divides the blended logits: exactly apply_temperature of predict_logits, cast to float32
    blended = predict_logits(model, image, tile_size=32, divisor=4)
    np.testing.assert_array_equal(hot, apply_temperature(blended, 2.0).astype(np.float32))
    with pytest.raises(ValueError, match="temperature"):
        predict_probabilities(model, image, tile_size=32, divisor=4, temperature=0.0)


# ---------------------------------------------------------------------------- reliability bins and the ECE


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


def test_bins_are_closed_on_the_right():
    # (m - 1)/M < conf <= m/M: a confidence on an edge belongs to the bin below it (these edges are exact in binary)
    probs = np.array([[0.6, 0.3, 0.1],  # conf 0.6 = 9/15 -> bin 9 (index 8)
                      [0.0, 1.0, 0.0],  # conf 1 -> the last bin
                      [0.2, 0.0, 0.8],  # 0.8 = 12/15 -> index 11
                      [0.4, 0.3, 0.3]])  # 0.4 = 6/15 -> index 5
    bins = ReliabilityBins()
    bins.update(probs, np.array([0, 1, 0, 2]))
    assert np.flatnonzero(bins.count).tolist() == [5, 8, 11, 14]
    assert bins.correct[[5, 8, 11, 14]].tolist() == [0, 1, 0, 1]
    # two classes: p_fg 0.5 is foreground (the rules' tie), confidence 0.5 in (7/15, 8/15]
    two = ReliabilityBins()
    two.update(np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([1, 0]))
    assert np.flatnonzero(two.count).tolist() == [7] and two.correct[7] == 1
    curve = ReliabilityBins(4).curve()
    assert curve["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0] and curve["count"] == [0, 0, 0, 0]


@pytest.mark.parametrize("k, bins", [(2, 15), (4, 15), (3, 7)])
def test_ece_matches_its_definition_on_random_data(k, bins):
    rng = np.random.default_rng(k + bins)
    probs = rng.dirichlet(np.full(k, 0.6), size=(40, 50))
    truth = rng.integers(0, k, (40, 50))
    truth[rng.random((40, 50)) < 0.1] = IGNORE_INDEX
    expected = ece_reference(probs, truth, bins)
    assert expected_calibration_error(probs, truth, bins) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    streamed = ReliabilityBins(bins)
    for rows in np.array_split(np.arange(40), 3):  # three updates of whole rows
        streamed.update(probs[rows], truth[rows])
    one = ReliabilityBins(bins)
    one.update(probs, truth)
    np.testing.assert_array_equal(streamed.count, one.count)
    np.testing.assert_array_equal(streamed.correct, one.correct)
    np.testing.assert_allclose(streamed.confidence, one.confidence, rtol=1e-12)
    assert one.count.sum() == (truth != IGNORE_INDEX).sum()
    curve = one.curve()
    filled = [i for i, c in enumerate(curve["count"]) if c]
    weighted_gap = sum(c / one.count.sum() * abs(curve["accuracy"][i] - curve["confidence"][i])
                       for i, c in enumerate(curve["count"]) if c)
    assert weighted_gap == pytest.approx(expected, rel=1e-12, abs=1e-15) and filled


def test_ece_is_small_for_calibrated_probabilities_and_none_without_pixels():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 2, (200_000, 3))
    labels = draw_labels(rng, z, 1.0)  # drawn from the very probabilities: calibrated
    calibrated = expected_calibration_error(apply_temperature(z), labels)
    # sampling noise only: about sum_m sqrt(|B_m| acc (1 - acc)) / N <= sqrt(15 / N) / 2 = 0.004
    assert calibrated < 0.01
    overconfident = expected_calibration_error(apply_temperature(z, 0.5), labels)
    assert overconfident > 0.05
    assert expected_calibration_error(apply_temperature(z[:3]), np.full(3, IGNORE_INDEX)) is None
    assert ReliabilityBins().ece() is None


# ---------------------------------------------------------------------------- the pixel sample


def encoded_images(rng, sizes, ignore_share=0.2):
    """Images whose logits name their pixel: channel 0 the image index, channel 1 the flat pixel index (exact in
    float32); truth a class in 0..2 or IGNORE_INDEX."""
    images = []
    for g, (h, w) in enumerate(sizes):
        logits = np.stack([np.full((h, w), g), np.arange(h * w).reshape(h, w)], -1).astype(np.float32)
        truth = rng.integers(0, 3, (h, w))
        truth[rng.random((h, w)) < ignore_share] = IGNORE_INDEX
        images.append((logits, truth))
    return images


def test_pixel_sample_keeps_every_valid_pixel_below_its_limit():
    rng = np.random.default_rng(0)
    images = encoded_images(rng, [(5, 7), (4, 4), (6, 3)])
    images[1][1][:] = IGNORE_INDEX  # an image without a labelled pixel still counts as an image
    sample = PixelSample(limit=1000)
    for logits, truth in images:
        sample.add(logits, truth)
    valid = [truth != IGNORE_INDEX for _, truth in images]
    assert sample.images == 3 and sample.seen == sum(v.sum() for v in valid) == len(sample.labels)
    np.testing.assert_array_equal(sample.logits, np.concatenate([z[v] for (z, _), v in zip(images, valid)]))
    np.testing.assert_array_equal(sample.labels, np.concatenate([t[v] for (_, t), v in zip(images, valid)]))
    np.testing.assert_array_equal(sample.groups, np.repeat([0, 1, 2], [v.sum() for v in valid]))
    assert sample.logits.dtype == np.float32 and (sample.labels != IGNORE_INDEX).all()


def test_pixel_sample_beyond_its_limit_is_uniform_and_keeps_groups_with_their_pixels():
    rng = np.random.default_rng(1)
    sizes = [(20, 25), (40, 40), (10, 10), (30, 50), (64, 32), (15, 40), (50, 50), (5, 5)]
    images = encoded_images(rng, sizes)
    limit = 3000
    sample = PixelSample(limit=limit, seed=3)
    for logits, truth in images:
        sample.add(logits, truth)
    valid_counts = np.array([(t != IGNORE_INDEX).sum() for _, t in images])
    n = valid_counts.sum()
    assert sample.seen == n > limit and len(sample.labels) == len(sample.groups) == len(sample.logits) == limit
    # every kept pixel is a labelled pixel of the image its group names, with that pixel's label, at most once
    g, index = sample.logits[:, 0].astype(int), sample.logits[:, 1].astype(int)
    np.testing.assert_array_equal(g, sample.groups)
    truths = [t.ravel() for _, t in images]
    kept_truth = np.array([truths[a][b] for a, b in zip(g, index)])
    np.testing.assert_array_equal(kept_truth, sample.labels)
    assert (kept_truth != IGNORE_INDEX).all()
    assert len(set(zip(g.tolist(), index.tolist()))) == limit  # without replacement
    # uniform: each image keeps its share limit * n_i / n within 5 hypergeometric standard deviations
    share = valid_counts / n
    sd = np.sqrt(limit * share * (1 - share) * (n - limit) / (n - 1))
    kept = np.bincount(sample.groups, minlength=len(sizes))
    assert np.all(np.abs(kept - limit * share) < 5 * sd + 1), (kept, limit * share)
    # ... and within an image: the kept pixels' relative positions have mean 1/2 (sd 1/sqrt(12 limit))
    positions = index / np.array([h * w for h, w in sizes])[g]
    assert abs(positions.mean() - 0.5) < 5 / math.sqrt(12 * limit)
    # seeded: the same seed keeps the same pixels, another seed others
    again, other = PixelSample(limit=limit, seed=3), PixelSample(limit=limit, seed=4)
    for logits, truth in images:
        again.add(logits, truth)
        other.add(logits, truth)
    key = lambda s: sorted(zip(s.groups.tolist(), s.logits[:, 1].astype(int).tolist()))  # noqa: E731
    assert key(again) == key(sample) and key(other) != key(sample)


# ---------------------------------------------------------------------------- fitting a run's temperature


class FakeSplit:
    """What fit_temperature_on reads of a SplitLogits: `pairs`, and (pair, image, truth, logits) per image."""

    def __init__(self, images):
        self.images = images
        self.pairs = [SimpleNamespace(stem=f"img{i}") for i in range(len(images))]

    def __iter__(self):
        for pair, (logits, truth) in zip(self.pairs, self.images):
            yield pair, None, truth, logits


def binary_split(rng, true_t, count=4, size=24):
    images = []
    for _ in range(count):
        z = rng.normal(0, 3, (size, size, 1)).astype(np.float32)
        truth = draw_labels(rng, z.reshape(-1, 1), true_t).reshape(size, size)
        truth[rng.random((size, size)) < 0.1] = IGNORE_INDEX
        images.append((z, truth))
    return images


def valid_pixels(images):
    z = np.concatenate([logits[truth != IGNORE_INDEX] for logits, truth in images])
    y = np.concatenate([truth[truth != IGNORE_INDEX] for _, truth in images])
    return z.astype(np.float64), y


def test_fit_temperature_on_a_split_of_logits():
    rng = np.random.default_rng(2)
    images = binary_split(rng, 2.0)
    record = fit_temperature_on(FakeSplit(images), "val")
    z, y = valid_pixels(images)
    t = record["temperature"]
    assert record["split"] == "val" and record["images"] == 4 and record["method"] == "scalar"
    assert record["pixels"] == record["valid_pixels_seen"] == len(y)  # ignored pixels excluded, none dropped
    # T minimises the NLL: lower than at 1% either side; 2.0 generated it (2304 pixels: SE of log T about 0.05)
    assert nll_reference(z, y, t) < min(nll_reference(z, y, t * 1.01), nll_reference(z, y, t / 1.01))
    assert abs(math.log(t / 2.0)) < 4 * log_t_standard_error(z, 2.0)
    assert record["nll_before"] == pytest.approx(nll_reference(z, y, 1.0), rel=1e-6)
    assert record["nll_after"] == pytest.approx(nll_reference(z, y, t), rel=1e-6) and record["nll_after"] < record[
        "nll_before"]
    assert record["ece_before"] == pytest.approx(ece_reference(apply_temperature(z), y), rel=1e-9)
    assert record["ece_after"] == pytest.approx(ece_reference(apply_temperature(z, t), y), rel=1e-9)
    assert record["ece_bins"] == ECE_BINS and "rejected" not in record
    assert record["heldout"]["groups_fit"] + record["heldout"]["groups_scored"] == 4
    # at most `limit` pixels are fitted on; all are seen
    small = fit_temperature_on(FakeSplit(images), "val", limit=500)
    assert small["pixels"] == 500 and small["valid_pixels_seen"] == len(y)
    assert abs(math.log(small["temperature"] / 2.0)) < 4 * log_t_standard_error(z[:500], 2.0)


def test_fit_temperature_on_chooses_per_class_temperatures_when_they_generate_the_data():
    rng = np.random.default_rng(4)
    generating = np.array([0.4, 1.0, 4.0])
    images = []
    for _ in range(6):
        z = rng.normal(0, 3, (32, 32, 3))
        truth = draw_labels(rng, z.reshape(-1, 3) / generating, 1.0).reshape(32, 32)
        images.append((z.astype(np.float32), truth))
    record = fit_temperature_on(FakeSplit(images), "val")
    z, y = valid_pixels(images)
    assert record["method"] == "per_class" and len(record["temperature"]) == 3
    np.testing.assert_allclose(record["temperature"], generating, rtol=0.15)  # 6144 pixels
    assert record["nll_after"] == pytest.approx(nll_reference(z, y, record["temperature"]), rel=1e-6)
    best_scalar = fit_temperature(z, y)
    assert record["nll_after"] < nll_reference(z, y, best_scalar)  # it beats one temperature on these pixels
    assert "per class" in calibration_line(record)


def test_a_temperature_that_worsens_the_ece_is_not_kept():
    # Two kinds of pixels in one confidence bin (13/15, 14/15]: p 0.87 always right and p 0.93 right 80% of the time;
    # at T = 1 their errors cancel (bin accuracy 0.9 = bin confidence 0.9, ECE ~ 0), but the NLL-optimal T > 1
    # softens both, out of balance: the fitted T would raise the ECE, so T = 1 is kept.
    n = 100
    za, zb = math.log(0.87 / 0.13), math.log(0.93 / 0.07)
    z = np.concatenate([np.full(n, za), np.full(n, zb)]).reshape(10, 20, 1).astype(np.float32)
    truth = np.concatenate([np.ones(n), np.ones(80), np.zeros(20)]).astype(int).reshape(10, 20)
    images = [(z[:5], truth[:5]), (z[5:], truth[5:])]
    zz, y = valid_pixels(images)
    fitted = fit_temperature(zz, y)
    assert fitted > 1.05
    assert ece_reference(apply_temperature(zz, fitted), y) > ece_reference(apply_temperature(zz), y) + 0.01
    record = fit_temperature_on(FakeSplit(images), "val")
    assert record["temperature"] == 1.0 and record["method"] == "scalar"
    assert record["rejected"]["temperature"] == pytest.approx(fitted, rel=1e-9)
    assert record["nll_after"] == record["nll_before"] and record["ece_after"] == record["ece_before"] < 1e-6
    assert "T = 1 is kept" in calibration_line(record)


def test_a_split_without_labelled_pixels_is_refused():
    images = [(np.zeros((4, 4, 1), np.float32), np.full((4, 4), IGNORE_INDEX))]
    with pytest.raises(DataError, match="no labelled"):
        fit_temperature_on(FakeSplit(images), "test")


def test_calibration_line_warns_at_the_bound_of_the_search():
    record = {"temperature": 0.01, "split": "val", "pixels": 10, "images": 1, "nll_before": 1.0, "nll_after": 0.5,
              "ece_before": 0.3, "ece_after": 0.1}
    assert "at the bound" in calibration_line(record)
    assert "warning" not in calibration_line({**record, "temperature": 0.5})


def test_store_calibration_writes_policy_json_and_drops_a_stale_tuned_point(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", tmp_path))
    model = tmp_path / "best.keras"
    model.write_bytes(b"model")
    (tmp_path / "class_stats.json").write_text(json.dumps({"class_weights": [0.6, 3.5]}))
    record = {"method": "scalar", "temperature": 0.5, "split": "val", "pixels": 10, "images": 1, "nll_before": 1.0,
              "nll_after": 0.5, "ece_before": 0.3, "ece_after": 0.1}
    messages = []
    store_calibration(record, model, config, tmp_path, log=messages.append)
    info = json.loads((tmp_path / POLICY_FILE).read_text())
    assert info == {"model": "best.keras", "model_sha256": model_digest(model), "class_weights": [0.6, 3.5],
                    "calibration": record, "tuned": None}
    assert len(messages) == 1 and str(tmp_path / POLICY_FILE) in messages[0] and "T = 0.5000" in messages[0]
    # a tuned point was chosen on the old probabilities: calibrating again removes it, and says so
    info["tuned"] = {"threshold": 0.3, "under": {}}
    (tmp_path / POLICY_FILE).write_text(json.dumps(info))
    messages.clear()
    store_calibration({**record, "temperature": 0.7}, model, config, tmp_path, log=messages.append)
    stored = read_stored(tmp_path)
    assert stored.tuned is None and stored.calibration["temperature"] == 0.7 and stored.class_weights == [0.6, 3.5]
    assert any("removed" in m and "segtrain tune" in m for m in messages)
    # a policy.json of another model file is replaced, not merged
    info = json.loads((tmp_path / POLICY_FILE).read_text())
    info["tuned"] = {"threshold": 0.3, "under": {}}
    (tmp_path / POLICY_FILE).write_text(json.dumps(info))
    model.write_bytes(b"retrained")
    messages.clear()
    store_calibration(record, model, config, tmp_path, log=messages.append)
    stored = read_stored(tmp_path)
    assert stored.model_sha256 == model_digest(model) and stored.tuned is None and stored.calibration == record
    assert not any("removed" in m for m in messages)  # nothing of the old model's was in force


# ---------------------------------------------------------------------------- in a run

PROB_ATOL = 1e-4  # the parity rule of tests/test_export.py: float32 kernel differences only


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("calibration")
    root = make_stripes_dataset(base / "stripes", n_train=6, n_val=3)
    config = write_config(base / "tiny.yaml", root)
    result = invoke("fit", config, "--out", base / "run")
    assert result.exit_code == 0, result.output
    assert "Calibration fitted on val" in result.output
    return base / "run", root, result.output


def val_image(root, i=0):
    return np.array(Image.open(root / "val" / "images" / f"img{i:02d}.png"))


def model_logits(run_dir, image, name="best.keras"):
    import keras

    model = keras.models.load_model(run_dir / name, compile=False)
    return np.asarray(model(image[None].astype("float32"), training=False))[0]


def with_predict_settings(run_dir, target, **predict):
    """A copy of a run folder whose config.yaml has these predict settings."""
    shutil.copytree(run_dir, target)
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["predict"].update(predict)
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def set_temperature(run_dir, temperature):
    path = run_dir / POLICY_FILE
    info = json.loads(path.read_text())
    info["calibration"]["temperature"] = temperature
    path.write_text(json.dumps(info))


@pytest.mark.slow
def test_fit_writes_the_calibration_into_policy_json_and_eval_reports_the_ece(run):
    run_dir, _, output = run
    stored = json.loads((run_dir / POLICY_FILE).read_text())
    info = stored["calibration"]
    assert stored["model"] == "best.keras" and stored["model_sha256"] == model_digest(run_dir / "best.keras")
    assert stored["tuned"] is None and not (run_dir / "calibration.json").exists()
    class_stats = json.loads((run_dir / "class_stats.json").read_text())
    assert stored["class_weights"] == pytest.approx(class_stats["class_weights"])  # TINY trains with balanced weights
    assert info["split"] == "val" and info["pixels"] == 3 * 32 * 32 and info["method"] == "scalar"
    assert info["nll_after"] <= info["nll_before"] and info["temperature"] != 1.0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    calibration = metrics["calibration"]
    print(f"tiny run: T {info['temperature']:.4f}; ECE {calibration['ece_before']:.4f} -> "
          f"{calibration['ece_after']:.4f}; NLL {info['nll_before']:.4f} -> {info['nll_after']:.4f}")
    assert calibration["temperature"] == pytest.approx(info["temperature"])
    assert metrics["decision"]["temperature"] == pytest.approx(info["temperature"])
    # eval counts every pixel of the same split as the fit's (all of it: 3 images of 32 x 32), from the same logits
    # (float32 there, float64 here: a pixel on a bin edge may move, 1/3072 of weight at most)
    assert calibration["ece_before"] == pytest.approx(info["ece_before"], abs=1e-3)
    assert calibration["ece_after"] == pytest.approx(info["ece_after"], abs=1e-3)
    assert sum(calibration["reliability_after"]["count"]) == 3 * 32 * 32
    assert metrics["post_training_forward_passes"] == 1  # calibration and evaluation share one pass over val
    assert (run_dir / "reliability.png").is_file() and "ECE" in output


@pytest.mark.slow
def test_predict_uses_the_temperature(run, tmp_path):
    import segtrain

    run_dir, root, _ = run
    t = json.loads((run_dir / POLICY_FILE).read_text())["calibration"]["temperature"]
    image = val_image(root)
    z = model_logits(run_dir, image)[..., 0]
    segmenter = segtrain.load(run_dir)
    assert segmenter.policy.temperature == pytest.approx(t) and segmenter.policy.tau == 0.0  # q = p here
    prediction = segmenter.predict(image)  # 32 x 32: one exact forward pass
    np.testing.assert_allclose(prediction.probabilities[..., 1], 1 / (1 + np.exp(-z / t)), atol=1e-5)
    # `segtrain predict --probabilities-format npy` writes the same calibrated probabilities
    result = invoke("predict", run_dir, root / "val" / "images" / "img00.png", "--out",
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
    # a calibration fitted for best.keras does not apply to last.keras
    messages = []
    other = segtrain.load(run_dir / "last.keras", log=messages.append)
    assert other.policy.temperature == 1.0 and any("another model file" in m for m in messages)
    z_last = model_logits(run_dir, image, "last.keras")[..., 0]
    np.testing.assert_allclose(other.predict(image).probabilities[..., 1], 1 / (1 + np.exp(-z_last)), atol=1e-5)


@pytest.mark.slow
def test_the_calibrate_command_refits_on_demand(run, tmp_path):
    run_dir, _, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    fitted = json.loads((copy / POLICY_FILE).read_text())["calibration"]
    (copy / POLICY_FILE).unlink()
    result = invoke("calibrate", copy, "--split", "val")
    assert result.exit_code == 0, result.output
    again = json.loads((copy / POLICY_FILE).read_text())
    assert again["calibration"]["temperature"] == pytest.approx(fitted["temperature"], rel=1e-6)
    assert again["model_sha256"] == model_digest(copy / "best.keras") and "T = " in result.output
    # a tuned point in policy.json was chosen on the old probabilities: calibrate removes it and says so
    again["tuned"] = {"threshold": 0.3, "split": "val", "under": {}}
    (copy / POLICY_FILE).write_text(json.dumps(again))
    result = invoke("calibrate", copy)  # default split: the run's val split
    assert result.exit_code == 0, result.output
    assert json.loads((copy / POLICY_FILE).read_text())["tuned"] is None and "segtrain tune" in result.output
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
    assert meta["decision"]["temperature"] == 2.5 and meta["test_time_augmentation"] is True
    reference = segtrain.load(hot_run)
    assert reference.policy.temperature == 2.5 and reference.policy.tta is True
    first = val_image(root)
    for image in (first, val_image(root, 2), first[3:30, 1:26]):  # 27 x 25: padded inside, cropped back
        expected = reference.predict(image)
        labels, probabilities = RUNNERS[fmt](out, image)
        np.testing.assert_allclose(probabilities, expected.probabilities, atol=PROB_ATOL, rtol=0)
        differ = labels != expected.labels
        assert np.all(np.abs(expected.probabilities[..., 1][differ] - 0.5) < PROB_ATOL)
    # and the temperature did something: T = 1 gives other probabilities of the same (flip-averaged) logits
    logits = reference._predictor.logits(first.astype("float32"))
    assert not np.allclose(reference.policy.probabilities(logits), apply_temperature(logits, 1.0), atol=1e-3)
