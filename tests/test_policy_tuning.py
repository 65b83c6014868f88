"""`segtrain tune`: objectives against metrics_from_confusion and hand sums, each search against a brute force
written here, and the command end to end (eval reproduces tune's figures; warnings; several classes)."""

import json
from pathlib import Path

import numpy as np
import pytest

from segtrain.metrics import ProbabilityHistogram, metrics_from_confusion
from segtrain.operating_point import equivalent_threshold, prior_adjust
from segtrain.policy.postprocess import postprocess
from segtrain.tuning import (SIZE_GRID, TAU_GRID, PostprocessSearch, TauSearch, best_index, confusion,
                             default_objective, objective_values, threshold_search)

from tests.helpers import (THREE_CLASSES, TINY, invoke, make_stripes_dataset, make_three_class_dataset,
                           write_config)


def random_cm(rng, k):
    return rng.integers(0, 50, (k, k))


@pytest.mark.parametrize("k", [2, 4])
def test_objectives_match_metrics_from_confusion_and_a_hand_cost(k):
    rng = np.random.default_rng(k)
    cm = random_cm(rng, k)
    cm[k - 1, :] = 0
    cm[:, k - 1] = 0  # one class absent from truth and prediction: not counted in the means
    m = metrics_from_confusion(cm, [f"c{i}" for i in range(k)])
    f1, iou = objective_values(cm, "f1")[0], objective_values(cm, "iou")[0]
    if k == 2:
        assert np.isnan(f1) and np.isnan(iou)  # the foreground is the absent class
    else:
        dice = [v["dice"] for v in m["per_class"].values() if v["dice"] is not None]
        assert f1 == pytest.approx(np.mean(dice), rel=1e-12)
        assert iou == pytest.approx(m["mean_iou"], rel=1e-12)
    costs = rng.random((k, k)) * (1 - np.eye(k))
    by_hand = sum(cm[i, j] * costs[i, j] for i in range(k) for j in range(k)) / cm.sum()
    assert objective_values(cm, "cost", costs)[0] == pytest.approx(-by_hand, rel=1e-12)
    assert objective_values(cm, "cost")[0] == pytest.approx(-(1 - np.trace(cm) / cm.sum()), rel=1e-12)


def test_two_class_objectives_score_the_foreground():
    cm = np.array([[50, 10], [5, 15]])  # tp 15, fp 10, fn 5
    assert objective_values(cm, "f1")[0] == pytest.approx(30 / 45)
    assert objective_values(cm, "iou")[0] == pytest.approx(15 / 30)


def test_default_objective_and_ties():
    assert default_objective(2, None) == "f1" and default_objective(5, None) == "iou"
    assert default_objective(2, np.ones((2, 2))) == "cost"
    assert best_index(np.array([0.1, 0.5, 0.5, 0.2]), [0.0, 0.3, 0.6, 0.9], prefer=0.5) == 2
    assert best_index(np.array([np.nan, np.nan]), [0.0, 1.0], prefer=0.0) == 0


def scores_and_truth(seed, n=20000):
    """Foreground probabilities that rank positives higher, but not calibrated at 0.5."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(n) < 0.15).astype(np.int64)
    p = np.clip(rng.normal(0.25 + 0.35 * truth, 0.15), 0.0, 1.0)
    truth[rng.random(n) < 0.05] = -1  # ignored pixels count nowhere
    return p, truth


@pytest.mark.parametrize("objective", ["f1", "iou", "cost"])
def test_threshold_search_finds_the_brute_force_best_edge(objective):
    p, truth = scores_and_truth(3)
    histogram = ProbabilityHistogram()
    histogram.update(p, truth)
    costs = np.array([[0.0, 1.0], [4.0, 0.0]])
    threshold, value, cm = threshold_search(histogram, objective, costs)
    valid = truth >= 0
    brute = []
    for t in np.arange(1001) / 1000:
        cm_t = confusion(truth[valid], (p[valid] >= t).astype(np.int64), 2)
        brute.append(objective_values(cm_t, objective, costs)[0])
    brute = np.nan_to_num(np.array(brute), nan=-np.inf)
    assert value == pytest.approx(brute.max(), rel=1e-12)
    np.testing.assert_array_equal(cm, confusion(truth[valid], (p[valid] >= threshold).astype(np.int64), 2))
    assert threshold != 0.5  # these scores are not calibrated at 0.5: the search must move


class FakePredictor:
    """What TauSearch reads from a Predictor."""

    def __init__(self, k, weights, decision="argmax", threshold=None, cost_matrix=None):
        from types import SimpleNamespace

        self.config = SimpleNamespace(data=SimpleNamespace(classes=[f"c{i}" for i in range(k)]))
        self.class_weights, self.decision, self.threshold, self.cost_matrix = weights, decision, threshold, cost_matrix


def weighted_model_outputs(seed, k=3, n=6000):
    """Probabilities of a model trained with weights w: true posteriors tilted by w (renormalised)."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.7, 0.25, 0.05])[:k]
    truth = rng.choice(k, size=n, p=prior / prior.sum())
    logits = rng.normal(0.0, 1.0, (n, k)) + 1.2 * np.eye(k)[truth]
    posterior = np.exp(logits) * prior
    posterior /= posterior.sum(-1, keepdims=True)
    weights = 1.0 / prior
    tilted = posterior * weights
    return tilted / tilted.sum(-1, keepdims=True), truth, weights


def test_tau_search_matches_a_brute_force_over_the_grid_and_undoes_the_tilt():
    probs, truth, weights = weighted_model_outputs(0)
    search = TauSearch(FakePredictor(3, weights))
    for chunk in np.array_split(np.arange(len(truth)), 4):  # streamed in pieces
        search.update(probs[chunk], truth[chunk])
    tau, value, cm = search.best("iou")
    brute = [objective_values(confusion(truth, np.argmax(prior_adjust(probs, weights, t), -1), 3), "iou")[0]
             for t in TAU_GRID]
    assert value == pytest.approx(max(brute), rel=1e-12)
    assert brute[TAU_GRID.index(tau)] == max(brute)
    # undoing the tilt entirely (tau = 1: the true posteriors' arg-max, the Bayes rule for accuracy) is, up to
    # sampling noise on these 6000 pixels (a binomial sd of about 0.006), as accurate as the best tau, and the
    # uncorrected arg-max is far worse
    accuracy = 1.0 + objective_values(search.cms, "cost")  # minus the error rate
    assert accuracy[-1] >= accuracy.max() - 0.01
    assert accuracy[-1] > accuracy[0] + 0.05


def test_two_class_tau_agrees_with_the_tuned_threshold():
    """For two classes a tau is a threshold: the tau search's best equals the threshold search's best over the
    thresholds the taus reach, and its decisions are the threshold's."""
    p, truth = scores_and_truth(5)
    weights = [0.6, 3.5]
    probs = np.stack([1 - p, p], -1)
    search = TauSearch(FakePredictor(2, weights))
    search.update(probs, truth)
    tau, value, cm = search.best("f1")
    t = equivalent_threshold(weights, tau)
    valid = truth >= 0
    np.testing.assert_array_equal(cm, confusion(truth[valid], (p[valid] >= t).astype(np.int64), 2))
    reachable = [equivalent_threshold(weights, x) for x in TAU_GRID]
    best_by_threshold = max(objective_values(confusion(truth[valid], (p[valid] >= r).astype(np.int64), 2), "f1")[0]
                            for r in reachable)
    assert value == pytest.approx(best_by_threshold, rel=1e-12)


def test_bias_search_undoes_a_class_that_absorbs_another_and_never_loses():
    """Probabilities from a model that over-calls class 2 (its score inflated by e**1): the search puts a negative
    bias on class 2, its value is the recomputed objective of arg-max(log p + b), and it beats no bias."""
    from segtrain.tuning import BIAS_GRID, bias_search

    rng = np.random.default_rng(2)
    n, k = 20000, 3
    truth = rng.choice(k, size=n, p=[0.6, 0.3, 0.1])
    scores = rng.normal(0.0, 1.0, (n, k)) + 1.5 * np.eye(k)[truth]
    scores[:, 2] += 1.0  # the skew
    probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    bias, value = bias_search(probs, truth, FakePredictor(k, [1.0, 1.0, 1.0]), 0.0, "iou")
    assert bias[2] < 0 and all(b in BIAS_GRID for b in bias)
    labels = np.argmax(np.log(probs) + np.asarray(bias), -1)
    assert value == pytest.approx(objective_values(confusion(truth, labels, k), "iou")[0], rel=1e-12)
    assert value > objective_values(confusion(truth, np.argmax(probs, -1), k), "iou")[0] + 0.01


def speckled_maps(seed, n_images=3, size=24):
    """Truth with blobs; labels = truth plus speckle (false specks and pin holes) the search should clean."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images):
        truth = np.zeros((size, size), np.int64)
        truth[4:14, 5:15] = 1
        labels = truth.copy()
        specks = rng.random((size, size)) < 0.02
        labels[specks & (truth == 0)] = 1
        labels[specks & (truth == 1)] = 0
        truth[0, :3] = -1  # ignored pixels
        images.append((truth, labels, 1 - labels))
    return images


def test_postprocess_search_counts_equal_a_recomputation_and_never_lose():
    images = speckled_maps(0)
    search = PostprocessSearch(2, "iou")
    for truth, labels, fallback in images:
        search.add(truth, labels, fallback)
    untuned = objective_values(search.total(), "iou")[0]
    settings = search.search([1])
    min_size, max_hole = settings[1]
    assert min_size in SIZE_GRID and max_hole in SIZE_GRID and min_size > 0 and max_hole > 0
    recomputed = sum(confusion(t, postprocess(lab, fb, settings), 2) for t, lab, fb in images)
    np.testing.assert_array_equal(search.total(), recomputed)
    assert objective_values(recomputed, "iou")[0] > untuned


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def stripes_run(tmp_path_factory):
    root = make_stripes_dataset(tmp_path_factory.mktemp("data"), n_train=6, n_val=3, size=32)
    (root / "tune").symlink_to(root / "val")  # a second labelled split with the same images
    work = tmp_path_factory.mktemp("work")
    config = write_config(work / "c.yaml", root)
    assert invoke("fit", config, "--out", work / "run").exit_code == 0
    return work / "run"


@pytest.mark.slow
def test_eval_reproduces_the_tuned_figures_and_reports_the_operating_point(stripes_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stripes_run, run)
    result = invoke("tune", run, "--split", "tune", "--objective", "f1")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output  # "tune" is not the split eval reports
    point = json.loads((run / "operating_point.json").read_text())
    assert point["split"] == "tune" and point["objective"] == "f1" and 0.0 <= point["threshold"] <= 1.0
    assert point["after"]["objective"] >= point["before"]["objective"]
    result = invoke("eval", "--checkpoint", run, "--split", "tune")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval_tune" / "metrics.json").read_text())
    # the same images, probabilities and settings: eval's F1 is tune's "after" exactly
    assert metrics["per_class"]["stripe"]["dice"] == pytest.approx(point["after"]["f1"], rel=1e-12)
    assert metrics["operating_point"]["split"] == "tune" and metrics["decision"]["threshold"] == point["threshold"]
    assert "tuned on 'tune'" in metrics["operating_point"]["warning"]  # eval on the tuning split says so
    assert (run / "eval_tune" / "class_iou.png").stat().st_size > 0
    # the val split: no warning; an explicit --threshold overrides the tuned one
    result = invoke("eval", "--checkpoint", run, "--threshold", "0.5", "--out", tmp_path / "e")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["decision"]["threshold"] == 0.5 and "warning" not in metrics["operating_point"]


@pytest.mark.slow
def test_tune_on_the_eval_split_warns_and_predict_applies_it(stripes_run, tmp_path):
    import shutil

    import yaml
    from PIL import Image

    run = tmp_path / "run"
    shutil.copytree(stripes_run, run)
    result = invoke("tune", run, "--no-postprocess")
    assert result.exit_code == 0 and "optimistic" in result.output
    point = json.loads((run / "operating_point.json").read_text())
    assert point["postprocess"] == {}
    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    image = sorted((root / "val" / "images").glob("*.png"))[0]
    result = invoke("predict", image, "--checkpoint", run, "--out", tmp_path / "p", "--probabilities",
                    "--probabilities-format", "npy")
    assert result.exit_code == 0 and f"threshold {point['threshold']:.4g}" in result.output
    probs = np.load(tmp_path / "p" / f"{image.stem}.npy")
    mask = np.asarray(Image.open(tmp_path / "p" / f"{image.stem}.png"))
    np.testing.assert_array_equal(mask > 0, probs[..., 1] >= point["threshold"])


@pytest.mark.slow
def test_several_classes_tune_tau_and_post_processing(tmp_path):
    root = make_three_class_dataset(tmp_path / "data", n_train=6, n_val=3, size=32)
    config = write_config(tmp_path / "c.yaml", root, data={**TINY["data"], **THREE_CLASSES},
                          predict={"prior_correction": "tuned"})
    assert invoke("fit", config, "--out", tmp_path / "run").exit_code == 0
    result = invoke("tune", tmp_path / "run", "--objective", "iou")
    assert result.exit_code == 0, result.output
    point = json.loads((tmp_path / "run" / "operating_point.json").read_text())
    assert point["tau"] in TAU_GRID and point["threshold"] is None and len(point["bias"]) == 3
    assert set(point["postprocess"]) == {"background", "stripe", "square"}
    assert invoke("eval", "--checkpoint", tmp_path / "run").exit_code == 0
    metrics = json.loads((tmp_path / "run" / "eval_val" / "metrics.json").read_text())
    assert metrics["decision"]["prior_correction_tau"] == point["tau"]
    assert metrics["mean_iou"] == pytest.approx(point["after"]["mean_iou"], rel=1e-12)
    assert "never_predicted" in metrics


@pytest.mark.slow
def test_tune_refuses_a_missing_split_with_exit_2(stripes_run):
    before = sorted(p.name for p in stripes_run.iterdir())
    result = invoke("tune", stripes_run, "--split", "nope")
    assert result.exit_code == 2 and "nope" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in stripes_run.iterdir()) == before  # nothing written
