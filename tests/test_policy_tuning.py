"""`segtrain tune` (segtrain.policy.tuning): objectives against metrics_from_confusion and hand sums, each search
against a brute force written here, the folds and the held-out estimate against a hand recomputation, the choice of
level, and the command end to end (eval reproduces tune's figures exactly; a point is never worse than the untuned
rule; a point tuned under other settings is not applied; several classes)."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from segtrain.metrics import ProbabilityHistogram, metrics_from_confusion
from segtrain.policy import tuning
from segtrain.policy.policy import DecisionPolicy
from segtrain.policy.postprocess import postprocess
from segtrain.policy.prior import foreground_cut
from segtrain.policy.tuning import (BIAS_GRID, BIAS_PENALTY, FOLDS, LEVELS, SIZE_GRID, TAU_GRID, PostprocessSearch,
                                    TuningData, best_index, bias_search, choose_level, confusion, cross_validate,
                                    default_objective, fold_assignment, objective_values, searched_levels,
                                    tau_confusions, threshold_search)

from tests.helpers import (THREE_CLASSES, TINY, invoke, make_stripes_dataset, make_three_class_dataset,
                           write_config)

EDGES = np.arange(1001) / 1000  # the threshold search's candidates: the ProbabilityHistogram's edges


def random_cm(rng, k):
    return rng.integers(0, 50, (k, k))


def corrected(probs, weights, tau, bias=None):
    """q_c = p_c w_c**-tau exp(b_c) / sum_j (...), written out here (weights > 0)."""
    scale = np.asarray(weights, np.float64) ** -float(tau)
    if bias is not None:
        scale = scale * np.exp(np.asarray(bias, np.float64))
    q = np.asarray(probs, np.float64) * scale
    return q / q.sum(-1, keepdims=True)


def hand_f1(cm):
    """Foreground F1 of a 2 x 2 matrix: 2 tp / (2 tp + fp + fn)."""
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    return 2 * tp / (2 * tp + fp + fn)


def best_of(values, candidates, prefer):
    """Index of the highest value, NaN lowest, ties to the candidate nearest `prefer` (first such on a draw)."""
    values = np.where(np.isnan(values), -np.inf, values)
    top = [i for i, v in enumerate(values) if v == max(values)]
    return min(top, key=lambda i: abs(candidates[i] - prefer))


# ---------------------------------------------------------------------------- objectives


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


# ---------------------------------------------------------------------------- the searches


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
    for t in EDGES:
        cm_t = confusion(truth[valid], (p[valid] >= t).astype(np.int64), 2)
        brute.append(objective_values(cm_t, objective, costs)[0])
    brute = np.nan_to_num(np.array(brute), nan=-np.inf)
    assert value == pytest.approx(brute.max(), rel=1e-12)
    np.testing.assert_array_equal(cm, confusion(truth[valid], (p[valid] >= threshold).astype(np.int64), 2))
    assert threshold != 0.5  # these scores are not calibrated at 0.5: the search must move


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


def test_tau_confusions_match_a_brute_force_over_the_grid_and_undo_the_tilt():
    probs, truth, weights = weighted_model_outputs(0)
    # the policy's own tau and bias are replaced by each candidate (no bias): they must not leak in
    policy = DecisionPolicy(["c0", "c1", "c2"], class_weights=list(weights), tau=0.5, bias=[0.0, 0.5, -0.5])
    chunks = np.array_split(np.arange(len(truth)), 4)  # per image, summed: as TuningData sums them
    cms = sum(tau_confusions(probs[c], truth[c], policy) for c in chunks)
    brute = np.stack([confusion(truth, np.argmax(corrected(probs, weights, t), -1), 3) for t in TAU_GRID])
    np.testing.assert_array_equal(cms, brute)
    # undoing the tilt entirely (tau = 1: the true posteriors' arg-max, the Bayes rule for accuracy) is, up to
    # sampling noise on these 6000 pixels (a binomial sd of about 0.006), as accurate as the best tau, and the
    # uncorrected arg-max is far worse
    accuracy = 1.0 + objective_values(cms, "cost")  # minus the error rate
    assert accuracy[-1] >= accuracy.max() - 0.01
    assert accuracy[-1] > accuracy[0] + 0.05


def test_two_class_tau_is_a_foreground_cut_on_p():
    """For two classes a tau is a threshold on p: w_fg**tau / (w_bg**tau + w_fg**tau) (by hand), and every tau's
    confusion matrix is that threshold's."""
    p, truth = scores_and_truth(5)
    weights = [0.6, 3.5]
    probs = np.stack([1 - p, p], -1)
    policy = DecisionPolicy(["bg", "fg"], class_weights=weights)
    cms = tau_confusions(probs, truth, policy)
    valid = truth >= 0
    for i, tau in enumerate(TAU_GRID):
        cut = 3.5**tau / (0.6**tau + 3.5**tau)
        assert foreground_cut(0.5, weights, tau) == pytest.approx(cut, rel=1e-12)
        assert DecisionPolicy(["bg", "fg"], class_weights=weights, tau=tau).foreground_cut() == pytest.approx(cut)
        np.testing.assert_array_equal(cms[i], confusion(truth[valid], (p[valid] >= cut).astype(np.int64), 2))


def skewed_probabilities(seed=2, n=20000, k=3):
    """Probabilities from a model that over-calls class 2 (its score inflated by e**1)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(k, size=n, p=[0.6, 0.3, 0.1])
    scores = rng.normal(0.0, 1.0, (n, k)) + 1.5 * np.eye(k)[truth]
    scores[:, 2] += 1.0  # the skew
    return np.exp(scores) / np.exp(scores).sum(-1, keepdims=True), truth


def test_bias_search_undoes_a_class_that_absorbs_another_and_never_loses():
    """The search puts a negative bias on class 2, its value is the recomputed objective of arg-max(log p + b), and
    its penalised score beats no bias."""
    probs, truth = skewed_probabilities()
    bias, value = bias_search(probs, truth, DecisionPolicy(["a", "b", "c"], class_weights=[1.0, 1.0, 1.0]), 0.0, "iou")
    assert bias[2] < 0 and all(b in BIAS_GRID for b in bias)
    labels = np.argmax(np.log(probs) + np.asarray(bias), -1)
    assert value == pytest.approx(objective_values(confusion(truth, labels, 3), "iou")[0], rel=1e-12)
    untuned = objective_values(confusion(truth, np.argmax(probs, -1), 3), "iou")[0]
    assert value - BIAS_PENALTY * np.mean(np.abs(bias)) > untuned + 0.01


def test_bias_search_shrinks_toward_no_bias():
    """Coordinate ascent from b = 0 over a grid holding every current value never lowers the penalised score; a
    penalty larger than any gain of the objective (at most 1) leaves every bias at 0."""
    probs, truth = skewed_probabilities(seed=7, n=5000)
    policy = DecisionPolicy(["a", "b", "c"])

    def penalised(bias, penalty):
        labels = np.argmax(np.log(probs) + np.asarray(bias), -1)
        return objective_values(confusion(truth, labels, 3), "iou")[0] - penalty * np.mean(np.abs(bias))

    for penalty in (0.0, BIAS_PENALTY, 0.2):
        bias, _ = bias_search(probs, truth, policy, 0.0, "iou", penalty=penalty)
        assert penalised(bias, penalty) >= penalised([0.0, 0.0, 0.0], penalty) - 1e-12
    assert bias_search(probs, truth, policy, 0.0, "iou", penalty=10.0)[0] == [0.0, 0.0, 0.0]


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


# ---------------------------------------------------------------------------- folds, held-out estimate, level


@pytest.mark.parametrize("images", [1, 2, 4, 5, 7, 23])
def test_fold_assignment_is_a_balanced_partition_into_contiguous_blocks(images):
    folds = fold_assignment(images)
    n = min(FOLDS, images)
    assert folds.shape == (images,) and folds.dtype.kind == "i"
    assert sorted(set(folds.tolist())) == list(range(n))  # every image in exactly one fold, no fold empty
    counts = np.bincount(folds, minlength=n)
    assert counts.max() - counts.min() <= 1  # balanced
    assert np.all(np.diff(folds) >= 0)  # contiguous blocks in file order: neighbours stay in one fold
    if images == 23:
        np.testing.assert_array_equal(np.bincount(folds), [5, 5, 5, 4, 4])


def tiny_split(seed, n_images=7, shape=(10, 12), channels=1, k=2):
    """(pair, image, truth, logits) tuples, as SplitLogits yields them: logits that rank the truth higher but are
    noisy (so thresholds and post-processing have work to do), a few ignored pixels."""
    rng = np.random.default_rng(seed)
    split = []
    for i in range(n_images):
        truth = np.zeros(shape, np.int64)
        truth[2:7, 3 + i % 3: 8 + i % 3] = 1
        if k == 3:
            truth[rng.random(shape) < 0.15] = 2
        logits = rng.normal(0.0, 1.2, shape + (channels,))
        if channels == 1:
            logits[..., 0] += 1.3 * truth - 0.4
        else:
            logits += 1.3 * np.eye(channels)[truth]
        truth[0, i % shape[1]] = -1
        split.append((None, None, truth, logits.astype(np.float32)))
    return split


def hand_threshold_and_sizes(train, objective_of, grid, postprocess_on=True):
    """The tuned point of images `train` [(truth, q_fg)], written out: the best edge (ties nearest 0.5), then
    min_size and max_hole over `grid` (ties to the smallest), each by recomputing whole label maps."""
    values = []
    for t in EDGES:
        cm = sum(confusion(truth, (q >= t).astype(np.int64), 2) for truth, q in train)
        values.append(objective_of(cm))
    t = EDGES[best_of(np.array(values), EDGES, 0.5)]
    if not postprocess_on:
        return t, (0, 0)
    maps = [(truth, (q >= t).astype(np.int64)) for truth, q in train]

    def score(settings):
        return objective_of(sum(confusion(truth, postprocess(lab, 1 - lab, settings), 2) for truth, lab in maps))

    n = grid[best_of(np.array([score({1: (g, 0)}) for g in grid]), grid, 0)]
    m = grid[best_of(np.array([score({1: (n, g)}) for g in grid]), grid, 0)]
    return t, (n, m)


def test_cross_validate_two_classes_equals_a_hand_recomputation():
    """7 images, 5 folds: for every fold the threshold and the post-processing are searched by brute force on the
    other folds' images and applied to the fold's; the summed held-out matrices give each level's F1."""
    split = tiny_split(0)
    weights, temperature, grid = [0.6, 2.5], 0.8, (0, 2, 4, 8, 16)
    base = DecisionPolicy(["bg", "fg"], temperature=temperature, class_weights=weights, tau=1.0)
    data = TuningData(split, base, search_threshold=True, search_tau=False, search_bias=False)
    estimate = cross_validate(data, "f1", None, True, grid)

    # q by hand: sigmoid(z / T) corrected by the weights
    images = []
    for _, _, truth, z in split:
        p = 1.0 / (1.0 + np.exp(-z[..., 0].astype(np.float64) / temperature))
        images.append((truth, corrected(np.stack([1 - p, p], -1), weights, 1.0)[..., 1]))
    folds = fold_assignment(len(split))
    held_out = {name: np.zeros((2, 2), np.int64) for name in LEVELS}
    chosen = []
    for fold in range(FOLDS):
        train = [images[i] for i in np.flatnonzero(folds != fold)]
        t, sizes = hand_threshold_and_sizes(train, hand_f1, grid)
        chosen.append((t, sizes))
        for i in np.flatnonzero(folds == fold):
            truth, q = images[i]
            labels = (q >= t).astype(np.int64)
            held_out["threshold_or_tau"] += confusion(truth, labels, 2)
            held_out["class_biases"] += confusion(truth, labels, 2)  # nothing searched at that level: the same
            held_out["postprocess"] += confusion(truth, postprocess(labels, 1 - labels, {1: sizes}), 2)
    before = sum(confusion(truth, (q >= 0.5).astype(np.int64), 2) for truth, q in images)

    assert estimate["folds"] == FOLDS and estimate["images"] == 7
    assert estimate["before"] == pytest.approx(hand_f1(before), rel=1e-12)
    for name in LEVELS:
        assert estimate["levels"][name] == pytest.approx(hand_f1(held_out[name]), rel=1e-12), name
    # the case is not degenerate: thresholds move off 0.5 and post-processing is chosen somewhere
    assert any(t != 0.5 for t, _ in chosen) and any(sizes != (0, 0) for _, sizes in chosen)
    assert estimate["levels"]["postprocess"] != estimate["levels"]["threshold_or_tau"]


def test_cross_validate_several_classes_tau_equals_a_hand_recomputation():
    """Three classes, tau searched (no biases, no post-processing): each fold's tau is the brute-force best over
    TAU_GRID on the other folds (ties to 0), applied to the fold."""
    split = tiny_split(1, n_images=6, channels=3, k=3)
    weights = [0.5, 1.5, 6.0]
    base = DecisionPolicy(["a", "b", "c"], class_weights=weights)
    data = TuningData(split, base, search_threshold=False, search_tau=True, search_bias=False)
    estimate = cross_validate(data, "iou", None, False, SIZE_GRID)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    images = [(truth, softmax(z.astype(np.float64))) for _, _, truth, z in split]

    def mean_iou(cm):
        tp = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - tp
        return np.mean([tp[c] / union[c] for c in range(3) if union[c] > 0])

    folds = fold_assignment(len(split))
    held_out = np.zeros((3, 3), np.int64)
    for fold in range(FOLDS):
        train = [images[i] for i in np.flatnonzero(folds != fold)]
        values = [mean_iou(sum(confusion(t, np.argmax(corrected(p, weights, tau), -1), 3) for t, p in train))
                  for tau in TAU_GRID]
        tau = TAU_GRID[best_of(np.array(values), TAU_GRID, 0.0)]
        for i in np.flatnonzero(folds == fold):
            truth, p = images[i]
            held_out += confusion(truth, np.argmax(corrected(p, weights, tau), -1), 3)
    before = sum(confusion(t, np.argmax(p, -1), 3) for t, p in images)
    assert estimate["before"] == pytest.approx(mean_iou(before), rel=1e-12)
    for name in LEVELS:  # biases and post-processing not searched: every level is the tau level
        assert estimate["levels"][name] == pytest.approx(mean_iou(held_out), rel=1e-12), name


def test_cross_validate_needs_two_images():
    data = TuningData(tiny_split(0, n_images=1), DecisionPolicy(["bg", "fg"]), True, False, False)
    assert cross_validate(data, "f1", None, True, SIZE_GRID) is None


def test_tuning_data_score_is_the_exact_rule_eval_applies():
    """`TuningData.score` (tune's before / after) equals DecisionPolicy.apply under the tuned point applied as
    resolve_policy applies it, image by image."""
    split = tiny_split(2)
    base = DecisionPolicy(["bg", "fg"], temperature=1.3, class_weights=[0.7, 2.0], tau=0.5, postprocess={1: (3, 0)})
    data = TuningData(split, base, True, False, False)
    np.testing.assert_array_equal(data.score({}), sum(data.before))
    tuned = {"threshold": 0.42, "postprocess": {"fg": [4, 3]}}
    policy = DecisionPolicy(["bg", "fg"], temperature=1.3, class_weights=[0.7, 2.0], tau=0.5, rule="threshold",
                            threshold=0.42, postprocess={1: (4, 3)})
    expected = sum(confusion(truth, policy.apply(z)[1], 2) for _, _, truth, z in split)
    np.testing.assert_array_equal(data.score(tuned), expected)
    # the configured post-processing stays when the point has none of its own
    keep = DecisionPolicy(["bg", "fg"], temperature=1.3, class_weights=[0.7, 2.0], tau=0.5, rule="threshold",
                          threshold=0.42, postprocess={1: (3, 0)})
    np.testing.assert_array_equal(data.score({"threshold": 0.42}),
                                  sum(confusion(truth, keep.apply(z)[1], 2) for _, _, truth, z in split))


def test_choose_level_picks_the_best_level_only_when_it_beats_the_untuned_rule():
    estimate = {"before": 0.5, "levels": {"threshold_or_tau": 0.6, "class_biases": 0.6, "postprocess": 0.7}}
    assert choose_level(estimate, list(LEVELS)) == "postprocess"
    assert choose_level(estimate, ["threshold_or_tau", "class_biases"]) == "threshold_or_tau"  # tie: fewer settings
    assert choose_level(estimate, ["threshold_or_tau"]) == "threshold_or_tau"  # only searched levels compete
    worse = {"before": 0.7, "levels": {"threshold_or_tau": 0.6, "class_biases": 0.65, "postprocess": 0.7}}
    assert choose_level(worse, list(LEVELS)) is None  # equal is not better
    undefined = {"before": 0.5, "levels": {"threshold_or_tau": float("nan"), "class_biases": 0.55,
                                           "postprocess": float("nan")}}
    assert choose_level(undefined, list(LEVELS)) == "class_biases"  # NaN never wins
    assert choose_level(None, list(LEVELS)) is None and choose_level(estimate, []) is None


def test_searched_levels_name_what_is_searched():
    data = lambda t, tau, b: SimpleNamespace(search_threshold=t, search_tau=tau, search_bias=b)  # noqa: E731
    assert searched_levels(data(True, False, False), True) == ["threshold_or_tau", "postprocess"]
    assert searched_levels(data(False, True, True), True) == list(LEVELS)
    assert searched_levels(data(False, True, False), False) == ["threshold_or_tau"]
    assert searched_levels(data(False, False, False), False) == []


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def stripes_run(tmp_path_factory):
    root = make_stripes_dataset(tmp_path_factory.mktemp("data"), n_train=6, n_val=3, size=32)
    (root / "tune").symlink_to(root / "val")  # a second labelled split with the same images
    work = tmp_path_factory.mktemp("work")
    config = write_config(work / "c.yaml", root)
    assert invoke("fit", config, "--out", work / "run").exit_code == 0
    return work / "run"


def copy_run(stripes_run, tmp_path, **predict):
    """A copy of the fixture's run, its config.yaml's predict section updated with `predict`."""
    run = tmp_path / "run"
    shutil.copytree(stripes_run, run)
    if predict:
        set_predict(run, **predict)
    return run


def set_predict(run, **predict):
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["predict"].update(predict)
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def stored_tuned(run):
    return json.loads((run / "policy.json").read_text())["tuned"]


def assert_figures_equal(metrics, figures, fg="stripe"):
    """eval's metrics.json against tune's before/after figures: the same confusion matrix, hence equal floats."""
    assert metrics["mean_iou"] == figures["mean_iou"] and metrics["pixel_accuracy"] == figures["pixel_accuracy"]
    per_class = metrics["per_class"][fg]
    assert (per_class["dice"], per_class["iou"]) == (figures["f1"], figures["iou"])
    assert (per_class["precision"], per_class["recall"]) == (figures["precision"], figures["recall"])


def quiet(*args, **kwargs):
    pass


@pytest.mark.slow
def test_eval_reproduces_the_tuned_figures_and_reports_the_operating_point(stripes_run, tmp_path):
    run = copy_run(stripes_run, tmp_path)
    result = invoke("tune", run, "--split", "tune", "--objective", "f1")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output  # "tune" is not the split eval reports
    point = stored_tuned(run)
    assert point is not None and point["split"] == "tune" and point["objective"] == "f1"
    assert 0.0 <= point["threshold"] <= 1.0 and point["level"] in LEVELS
    assert point["after"]["objective"] >= point["before"]["objective"]
    assert point["under"]["rule"] == "argmax" and point["under"]["prior_correction"] == "none"
    result = invoke("eval", run, "--split", "tune")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval_tune" / "metrics.json").read_text())
    # the same images, logits and policy: eval's figures are tune's "after" exactly
    assert_figures_equal(metrics, point["after"])
    assert metrics["operating_point"]["split"] == "tune" and metrics["decision"]["threshold"] == point["threshold"]
    assert metrics["decision"]["rule"] == "threshold"
    assert any("tuned on tune" in s for s in metrics["decision"]["sources"])
    assert "tuned on 'tune'" in metrics["operating_point"]["warning"]  # eval on the tuning split says so
    assert (run / "eval_tune" / "class_iou.png").stat().st_size > 0
    # the val split: no warning; an explicit --threshold overrides the tuned one (and says so)
    result = invoke("eval", run, "--threshold", "0.5", "--out", tmp_path / "e")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["decision"]["threshold"] == 0.5 and "warning" not in metrics["operating_point"]
    assert any("command line" in s for s in metrics["decision"]["sources"])


@pytest.mark.slow
def test_tune_on_the_eval_split_warns_and_predict_applies_it(stripes_run, tmp_path):
    from PIL import Image

    run = copy_run(stripes_run, tmp_path)
    result = invoke("tune", run, "--no-postprocess")
    assert result.exit_code == 0 and "optimistic" in result.output
    point = stored_tuned(run)
    assert point is not None and point["postprocess"] is None and point["searched"]["sizes"] is None
    assert point["searched"]["levels"] == ["threshold_or_tau"]
    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    image = sorted((root / "val" / "images").glob("*.png"))[0]
    result = invoke("predict", run, image, "--out", tmp_path / "p", "--probabilities",
                    "--probabilities-format", "npy")
    assert result.exit_code == 0 and f"threshold {point['threshold']:.4g}" in result.output
    probs = np.load(tmp_path / "p" / f"{image.stem}.npy")  # q: what the rule reads
    mask = np.asarray(Image.open(tmp_path / "p" / f"{image.stem}.png"))
    np.testing.assert_array_equal(mask > 0, probs[..., 1] >= point["threshold"])


@pytest.mark.slow
def test_with_a_configured_min_size_tune_before_is_eval_before_tuning_and_after_is_eval_after(stripes_run, tmp_path):
    from segtrain.data.discovery import find_pairs
    from segtrain.data.masks import MaskMapping
    from segtrain.evaluation import evaluate_run
    from segtrain.runs import run_config

    run = copy_run(stripes_run, tmp_path, min_size={"stripe": 30, "background": 4}, max_hole={"stripe": 6})
    result = invoke("eval", run, "--split", "tune", "--out", tmp_path / "before")
    assert result.exit_code == 0, result.output
    untuned = json.loads((tmp_path / "before" / "metrics.json").read_text())
    assert untuned["decision"]["postprocess"] == {"background": [4, 0], "stripe": [30, 6]}
    # the configured post-processing changes the figures (else this test would prove nothing)
    config = run_config(run)
    config.predict.min_size, config.predict.max_hole = None, None
    pairs = find_pairs(config.data.root, "tune")
    plain = evaluate_run(run / "best.keras", config, pairs, MaskMapping(config.data.mask, config.data.classes),
                         tmp_path / "plain", "tune", log=quiet)
    assert plain["confusion_matrix"] != untuned["confusion_matrix"]

    record = tuning.tune_run(run, "tune", "f1", log=quiet)
    assert_figures_equal(untuned, record["before"])  # tune's "before" is eval's before tuning, exactly
    assert record["under"]["min_size"] == {"stripe": 30, "background": 4}
    result = invoke("eval", run, "--split", "tune", "--out", tmp_path / "after")
    assert result.exit_code == 0, result.output
    tuned = json.loads((tmp_path / "after" / "metrics.json").read_text())
    assert_figures_equal(tuned, record["after"])  # and its "after" is eval's after tuning
    if record["level"] == "postprocess":  # tuned sizes replace the configured ones for every class
        n, m = record["postprocess"]["stripe"]
        assert tuned["decision"]["postprocess"] == ({"stripe": [n, m]} if n or m else {})
    elif record["written"]:
        assert tuned["decision"]["postprocess"] == untuned["decision"]["postprocess"]


@pytest.mark.slow
def test_a_point_tuned_under_one_prior_correction_is_not_applied_under_another(stripes_run, tmp_path):
    from segtrain.policy.store import resolve_policy
    from segtrain.runs import run_config

    run = copy_run(stripes_run, tmp_path, prior_correction="weights")
    record = tuning.tune_run(run, "tune", "f1", postprocess=False, log=quiet)
    assert record["written"] and record["under"]["prior_correction"] == "weights"
    messages = []
    resolved = resolve_policy(run / "best.keras", run_config(run), log=messages.append)
    assert resolved.tuned is not None and not messages  # the settings it was tuned under: applied
    assert resolved.policy.threshold == record["threshold"] and resolved.policy.tau == 1.0

    for change in ({"prior_correction": "none"}, {"prior_correction": "tuned"},
                   {"prior_correction": "weights", "min_size": {"stripe": 5}}):
        set_predict(run, **change)
        messages = []
        resolved = resolve_policy(run / "best.keras", run_config(run), log=messages.append)
        assert resolved.tuned is None and resolved.policy.rule == "argmax" and resolved.policy.threshold is None
        stale = [m for m in messages if "chosen under other settings" in m]
        assert len(stale) == 1, messages
        key = "prior_correction" if change["prior_correction"] != "weights" else "min_size"
        assert key in stale[0], stale
    # eval under the changed config scores the untuned rule and reports no operating point
    set_predict(run, prior_correction="none", min_size=None)
    result = invoke("eval", run, "--split", "tune", "--out", tmp_path / "e")
    assert result.exit_code == 0 and "chosen under other settings" in result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["decision"]["rule"] == "argmax" and "operating_point" not in metrics
    assert metrics["decision"]["prior_correction"]["tau"] == 0.0
    # back to the settings it was tuned under: applied again
    set_predict(run, prior_correction="weights")
    assert resolve_policy(run / "best.keras", run_config(run), log=quiet).tuned is not None


@pytest.mark.slow
def test_tune_never_writes_a_point_worse_than_before(stripes_run, tmp_path, monkeypatch):
    """A level that the held-out estimate favours but that is worse than the untuned rule on the whole split is not
    written, and a point stored earlier is removed (it was chosen on other figures)."""
    run = copy_run(stripes_run, tmp_path)
    first = tuning.tune_run(run, "tune", "f1", log=quiet)
    assert first["written"] and stored_tuned(run) is not None

    monkeypatch.setattr(tuning, "cross_validate", lambda data, *a, **k: {
        "folds": 2, "images": data.images, "before": -1.0, "levels": {name: 1.0 for name in LEVELS}})
    monkeypatch.setattr(tuning.TuningData, "search", lambda self, *a, **k: [{"threshold": 1.0}] * len(LEVELS))
    record = tuning.tune_run(run, "tune", "f1", log=quiet)  # threshold 1: hardly any foreground, F1 near 0
    assert not record["written"] and record["level"] is None and record["threshold"] is None
    assert record["after"] == record["before"]
    assert stored_tuned(run) is None
    assert json.loads((run / "policy.json").read_text())["calibration"] is not None  # the temperature stays


@pytest.mark.slow
def test_several_classes_tune_tau_and_post_processing(tmp_path):
    root = make_three_class_dataset(tmp_path / "data", n_train=6, n_val=3, size=32)
    config = write_config(tmp_path / "c.yaml", root, data={**TINY["data"], **THREE_CLASSES},
                          predict={"prior_correction": "tuned"})
    assert invoke("fit", config, "--out", tmp_path / "run").exit_code == 0
    result = invoke("tune", tmp_path / "run", "--objective", "iou")
    assert result.exit_code == 0, result.output
    assert "optimistic" in result.output  # the default split is val, the one eval reports
    record = json.loads((tmp_path / "run" / "policy.json").read_text())["tuned"]
    searched = {"levels": list(LEVELS), "tau": list(TAU_GRID), "sizes": list(tuning.COARSE_SIZE_GRID)}
    assert record is not None, result.output
    assert {k: record["searched"][k] for k in searched} == searched  # 3 images < 50: the coarse size grid
    assert record["searched"]["bias"]["grid"] == list(BIAS_GRID)
    estimate = record["estimate"]
    assert estimate["folds"] == 3 and estimate["levels"][record["level"]] == max(estimate["levels"].values())
    assert estimate["levels"][record["level"]] > estimate["before"]
    assert record["tau"] in TAU_GRID and record["threshold"] is None
    if record["level"] != "threshold_or_tau":
        assert len(record["bias"]) == 3 and all(b in BIAS_GRID for b in record["bias"])
    if record["level"] == "postprocess":
        assert set(record["postprocess"]) == {"background", "stripe", "square"}
    assert record["after"]["objective"] >= record["before"]["objective"]
    assert invoke("eval", tmp_path / "run").exit_code == 0
    metrics = json.loads((tmp_path / "run" / "eval_val" / "metrics.json").read_text())
    assert metrics["decision"]["prior_correction"]["tau"] == record["tau"]
    assert metrics["decision"]["prior_correction"]["bias"] == record["bias"]
    assert metrics["mean_iou"] == record["after"]["mean_iou"]  # exactly: the same confusion matrix
    assert "never_predicted" in metrics


@pytest.mark.slow
def test_tune_refuses_a_missing_split_with_exit_2(stripes_run):
    before = sorted(p.name for p in stripes_run.iterdir())
    result = invoke("tune", stripes_run, "--split", "nope")
    assert result.exit_code == 2 and "nope" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in stripes_run.iterdir()) == before  # nothing written


# ---------------------------------------------------------------------------- --holdout


def test_holdout_stems_are_a_seeded_reproducible_subset_of_the_right_size():
    stems = [f"img{i:02d}" for i in range(10)]
    held = tuning.holdout_stems(stems, 0.3, seed=0)
    assert len(held) == 3 and held == sorted(held) and set(held) <= set(stems)
    assert tuning.holdout_stems(stems[::-1], 0.3, seed=0) == held  # by stem: the listing order does not matter
    assert tuning.holdout_stems(stems, 0.3, seed=0) == held
    assert any(tuning.holdout_stems(stems, 0.3, seed=s) != held for s in range(1, 6))  # the seed chooses
    assert len(tuning.holdout_stems(stems, 0.25)) == 3 and len(tuning.holdout_stems(stems, 0.94)) == 9
    from segtrain.errors import ConfigError

    for share, n in ((0.0, 10), (1.0, 10), (1.5, 10), (-0.2, 10), (0.04, 10), (0.96, 10), (0.5, 1)):
        with pytest.raises(ConfigError, match="--holdout"):
            tuning.holdout_stems(stems[:n], share)


def split_of(root, stems, folder):
    """A data root whose val split holds only `stems` of root/val (symlinks)."""
    for kind in ("images", "masks"):
        (folder / "val" / kind).mkdir(parents=True)
        for path in (root / "val" / kind).iterdir():
            if path.stem in stems:
                (folder / "val" / kind / path.name).symlink_to(path)
    return folder


def per_image_stems(folder):
    import csv

    with open(folder / "per_image.csv") as f:
        return sorted({row["image"] for row in csv.DictReader(f)})


@pytest.mark.slow
def test_tune_holdout_tunes_on_the_others_and_eval_scores_only_the_held_out_images(stripes_run, tmp_path):
    root = make_stripes_dataset(tmp_path / "data8", n_train=0, n_val=8, size=32, seed=3)
    stems = sorted(p.stem for p in (root / "val" / "images").iterdir())
    run = copy_run(stripes_run, tmp_path)
    result = invoke("tune", run, "--data", root, "--split", "val", "--holdout", "0.25", "--objective", "f1")
    assert result.exit_code == 0, result.output
    held = tuning.holdout_stems(stems, 0.25, 0)
    assert len(held) == 2
    assert "Held out 2 of the 8 images of val" in result.output and f"segtrain eval {run} --split val" in result.output
    assert "optimistic" not in result.output  # val is the run's eval split, but eval will report on the held-out images
    point = stored_tuned(run)
    assert point is not None, result.output
    assert point["holdout"] == {"share": 0.25, "seed": 0, "images": held}
    assert point["images"] == 8 - 2 and point["estimate"]["images"] == 6

    # tuning used exactly the other images: tuning a folder of those alone, without a holdout, gives the same record
    others = split_of(root, set(stems) - set(held), tmp_path / "others")
    plain = copy_run(stripes_run, tmp_path / "plain")
    record = tuning.tune_run(plain, "val", "f1", data_root=str(others), log=quiet)
    for key in ("threshold", "postprocess", "level", "estimate", "before", "after", "pixels", "images"):
        assert record[key] == point[key], key

    # eval on val: exactly the held-out images, no optimistic warning
    result = invoke("eval", run, "--data", root, "--split", "val", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert "Scoring the 2 images tune held out of val (policy.json); --all-images scores all 8" in result.output
    assert "optimistic" not in result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["images_scored"] == "holdout" and metrics["holdout_images"] == 2
    assert "warning" not in metrics["operating_point"] and metrics["decision"]["threshold"] == point["threshold"]
    assert per_image_stems(tmp_path / "e") == held
    only = split_of(root, set(held), tmp_path / "only")
    assert invoke("eval", run, "--data", only, "--split", "val", "--all-images", "--out", tmp_path / "o").exit_code == 0
    alone = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert alone["confusion_matrix"] == metrics["confusion_matrix"]

    # --all-images: every image, and the optimistic warning as without a holdout
    result = invoke("eval", run, "--data", root, "--split", "val", "--all-images", "--out", tmp_path / "a")
    assert result.exit_code == 0 and "optimistic" in result.output and "Scoring the" not in result.output
    every = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert per_image_stems(tmp_path / "a") == stems and every["images_scored"] == "all"
    assert "optimistic" in every["operating_point"]["warning"]
    # no tuned point in force (predict.tuned=false): every image, as without a holdout
    result = invoke("eval", run, "--data", root, "--split", "val", "--set", "predict.tuned=false", "--out",
                    tmp_path / "u")
    assert result.exit_code == 0 and per_image_stems(tmp_path / "u") == stems
    assert "images_scored" not in json.loads((tmp_path / "u" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("share", ["0", "1", "1.5", "0.1", "0.9"])
def test_tune_refuses_a_bad_holdout_with_exit_2_and_writes_nothing(stripes_run, share):
    from tests.helpers import folder_digest

    before = folder_digest(stripes_run)
    result = invoke("tune", stripes_run, "--split", "tune", "--holdout", share)  # "tune" holds 3 images
    assert result.exit_code == 2 and "--holdout" in result.output and "Traceback" not in result.output
    if share in ("0.1", "0.9"):
        assert "at least one image is needed on each side" in result.output
    assert folder_digest(stripes_run) == before
