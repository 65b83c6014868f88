"""Evaluation: per_image.csv (the absent-class rule), the worst-images gallery, and their agreement with the split's
confusion matrix; the split's logits through the decision policy (confusion matrix, histogram and threshold marks on
q, reliability of p before and after the temperature) against a computation written here; metrics.json's `decision`
and `calibration` of a trained run against its policy.json and its model's own logits."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from segtrain.evaluation import PerImage, evaluate_pairs, evaluate_split, foreground_score, write_reports
from segtrain.metrics import ProbabilityHistogram, confusion_matrix_np, metrics_from_confusion
from segtrain.policy.calibration import ReliabilityBins, expected_calibration_error
from segtrain.policy.policy import DecisionPolicy
from segtrain.policy.postprocess import postprocess
from tests.helpers import invoke, make_stripes_dataset, write_config

CLASSES = ["background", "road", "car"]

# Two 2 x 3 images, three classes; -1 is an ignored pixel.
#
# Image "a": truth [[0, 0, 1], [1, 1, -1]], prediction [[0, 1, 1], [1, 0, 2]].
#   The ignored pixel (predicted car) counts nowhere, so car is absent from truth and prediction.
#   cm_a (rows true, columns predicted) = [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
#   background: tp 1, fp 1, fn 1 -> IoU 1/3, Dice 2/4, precision 1/2, recall 1/2, support 2, predicted 2
#   road:       tp 2, fp 1, fn 1 -> IoU 2/4, Dice 4/6, precision 2/3, recall 2/3, support 3, predicted 3
#   car:        absent in both -> not counted: every ratio empty, support 0, predicted 0
#   score (mean IoU of the foreground classes that count: road only) = 0.5
#
# Image "b": truth [[0, 0, 2], [2, 0, 0]], prediction [[0, 1, 0], [0, 0, 0]].
#   cm_b = [[3, 1, 0], [0, 0, 0], [2, 0, 0]]
#   background: tp 3, fp 2, fn 1 -> IoU 3/6, Dice 6/9, precision 3/5, recall 3/4, support 4, predicted 5
#   road:       predicted once, absent from the truth -> IoU 0, Dice 0, precision 0, recall empty
#   car:        2 true pixels, never predicted -> IoU 0, Dice 0, recall 0, precision empty
#   score = mean(0, 0) = 0: "b" is the worse image.
TRUTH_A = np.array([[0, 0, 1], [1, 1, -1]])
PRED_A = np.array([[0, 1, 1], [1, 0, 2]])
TRUTH_B = np.array([[0, 0, 2], [2, 0, 0]])
PRED_B = np.array([[0, 1, 0], [0, 0, 0]])

EXPECTED = {  # (image, class): (iou, dice, precision, recall, support, predicted); None = empty cell
    ("a", "background"): (1 / 3, 2 / 4, 1 / 2, 1 / 2, 2, 2),
    ("a", "road"): (2 / 4, 4 / 6, 2 / 3, 2 / 3, 3, 3),
    ("a", "car"): (None, None, None, None, 0, 0),
    ("b", "background"): (3 / 6, 6 / 9, 3 / 5, 3 / 4, 4, 5),
    ("b", "road"): (0.0, 0.0, 0.0, None, 0, 1),
    ("b", "car"): (0.0, 0.0, None, 0.0, 2, 0),
}


def _image(seed, shape=(2, 3, 3)):
    return np.random.default_rng(seed).integers(0, 255, shape).astype(np.float32)


def _worked_example(worst=6):
    per_image = PerImage(CLASSES, worst)
    cm_a = per_image.add("a", TRUTH_A, PRED_A, _image(0))
    cm_b = per_image.add("b", TRUTH_B, PRED_B, _image(1))
    return per_image, cm_a, cm_b


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(value):
    return None if value == "" else float(value)


def test_worked_example_matrices_and_scores():
    per_image, cm_a, cm_b = _worked_example()
    assert cm_a.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert cm_b.tolist() == [[3, 1, 0], [0, 0, 0], [2, 0, 0]]
    assert per_image.total().tolist() == [[4, 2, 0], [1, 2, 0], [2, 0, 0]]
    assert foreground_score(cm_a) == pytest.approx(0.5) and foreground_score(cm_b) == 0.0
    assert [r["image"] for r in per_image.ranking()] == ["b", "a"]


def test_worked_example_per_image_csv_and_gallery(tmp_path):
    per_image, _, _ = _worked_example()
    metrics = metrics_from_confusion(per_image.total(), CLASSES)
    write_reports(metrics, None, tmp_path, None, per_image)
    rows = _read_csv(tmp_path / "per_image.csv")
    assert list(rows[0]) == ["image", "class", "iou", "dice", "precision", "recall", "support", "predicted",
                             "true_positives"]
    assert [(r["image"], r["class"]) for r in rows] == list(EXPECTED)
    for row in rows:
        iou, dice, precision, recall, support, predicted = EXPECTED[(row["image"], row["class"])]
        for key, value in (("iou", iou), ("dice", dice), ("precision", precision), ("recall", recall)):
            if value is None:
                assert row[key] == "", (row, key)  # undefined: an empty cell, never 0
            else:
                assert _cell(row[key]) == pytest.approx(value), (row, key)
        assert int(row["support"]) == support and int(row["predicted"]) == predicted
    # the rows agree with the split's matrix: supports are its row sums, predicted pixels its column sums
    cm = np.array(metrics["confusion_matrix"])
    for c, name in enumerate(CLASSES):
        assert sum(int(r["support"]) for r in rows if r["class"] == name) == cm[c].sum()
        assert sum(int(r["predicted"]) for r in rows if r["class"] == name) == cm[:, c].sum()
        assert sum(int(r["true_positives"]) for r in rows if r["class"] == name) == cm[c, c]
    # the gallery ranks the image made worse first
    assert [e["image"] for e in metrics["worst_images"]] == ["b", "a"]
    assert metrics["worst_images"][0]["mean_foreground_iou"] == 0.0
    with Image.open(tmp_path / "worst_images.png") as png:
        assert png.format == "PNG"


def test_an_image_with_nothing_to_find_ranks_after_the_scored_ones():
    per_image = PerImage(CLASSES, worst=2)
    per_image.add("empty", np.zeros((2, 2), int), np.zeros((2, 2), int), _image(0, (2, 2, 3)))
    per_image.add("perfect", np.ones((2, 2), int), np.ones((2, 2), int), _image(1, (2, 2, 3)))
    per_image.add("missed", np.ones((2, 2), int), np.zeros((2, 2), int), _image(2, (2, 2, 3)))
    assert [r["mean_foreground_iou"] for r in per_image.ranking()] == [0.0, 1.0, None]
    assert [e["image_name"] for e in per_image.worst_images()] == ["missed", "perfect"]  # only the 2 worst kept


def _gallery_height(tmp_path, n):
    per_image = PerImage(["background", "stripe"], worst=6)
    rng = np.random.default_rng(0)
    for i in range(n):
        truth = rng.integers(0, 2, (16, 16))
        per_image.add(f"img{i}", truth, rng.integers(0, 2, (16, 16)), _image(i, (16, 16, 1)))
    metrics = metrics_from_confusion(per_image.total(), ["background", "stripe"])
    write_reports(metrics, None, tmp_path / str(n), None, per_image)
    assert len(metrics["worst_images"]) == min(n, 6)
    with Image.open(tmp_path / str(n) / "worst_images.png") as png:
        return png.size[1]


def test_gallery_height_grows_with_its_rows_and_stops_at_six(tmp_path):
    one, three, six, eight = (_gallery_height(tmp_path, n) for n in (1, 3, 6, 8))
    row = (six - three) / 3  # the height of one row
    assert row > 150
    assert three == pytest.approx(one + 2 * row, abs=0.1 * row)
    assert eight == six  # k = 6 rows at most by default


# --------------------------------------------------------------------------------------
# A split's logits through the decision policy (no model: logits made up here)
# --------------------------------------------------------------------------------------

EDGES = np.arange(1001) / 1000  # the bin edges of ProbabilityHistogram, where its curve is exact


class FakeSplit:
    """What evaluate_pairs / evaluate_split read of a SplitLogits: its predictor (policy, classes, resolved policy)
    and (pair, image, truth, logits) per image."""

    def __init__(self, policy, items):
        self.predictor = SimpleNamespace(policy=policy, resolved=None,
                                         config=SimpleNamespace(data=SimpleNamespace(classes=list(policy.classes))))
        self.items = items

    def __iter__(self):
        return iter(self.items)


def made_up_split(seed, n=4, shape=(12, 14), channels=1):
    """Logits that rank the truth higher, with noise; class-index truth with a few ignored pixels."""
    rng = np.random.default_rng(seed)
    k = 2 if channels == 1 else channels
    items = []
    for i in range(n):
        truth = rng.choice(k, size=shape, p=[0.7] + [0.3 / (k - 1)] * (k - 1))
        z = rng.normal(0.0, 1.5, shape + (channels,))
        z += (1.5 * truth - 0.8)[..., None] if channels == 1 else 1.5 * np.eye(k)[truth]
        truth[rng.random(shape) < 0.05] = -1
        items.append((SimpleNamespace(stem=f"img{i}"), rng.random(shape + (3,)) * 255, truth, z.astype(np.float32)))
    return items


def sigmoid_pair(z, temperature):
    p = 1.0 / (1.0 + np.exp(-z[..., 0].astype(np.float64) / temperature))
    return np.stack([1.0 - p, p], -1)


def corrected(p, weights, tau):
    q = p * np.asarray(weights, np.float64) ** -tau
    return q / q.sum(-1, keepdims=True)


def test_evaluate_pairs_scores_q_and_counts_the_reliability_of_p():
    """Two classes, T = 0.7, prior correction (weights 0.5, 2: q != p) and post-processing: the confusion matrix is
    the post-processed rule on q, the histogram holds q, the reliability bins hold p at T = 1 and at T."""
    weights, temperature = [0.5, 2.0], 0.7
    policy = DecisionPolicy(["bg", "fg"], temperature=temperature, class_weights=weights, tau=1.0,
                            postprocess={1: (4, 2)})
    items = made_up_split(0)
    per_image, reliability = PerImage(["bg", "fg"]), (ReliabilityBins(), ReliabilityBins())
    cm, histogram = evaluate_pairs(FakeSplit(policy, items), per_image=per_image, reliability=reliability)

    expected_cm = np.zeros((2, 2), np.int64)
    expected_hist, before, after = ProbabilityHistogram(), ReliabilityBins(), ReliabilityBins()
    changed = 0
    for _, _, truth, z in items:
        p = sigmoid_pair(z, temperature)
        q = corrected(p, weights, 1.0)
        raw = (q[..., 1] >= 0.5).astype(np.int64)
        labels = postprocess(raw, 1 - raw, {1: (4, 2)})
        changed += int(np.any(labels != raw))
        expected_cm += confusion_matrix_np(truth, labels, 2)
        expected_hist.update(q[..., 1], truth)
        before.update(sigmoid_pair(z, 1.0), truth)
        after.update(p, truth)
    np.testing.assert_array_equal(cm, expected_cm)
    np.testing.assert_array_equal(per_image.total(), expected_cm)
    assert changed  # the post-processing did something here
    np.testing.assert_array_equal(histogram.positives, expected_hist.positives)
    np.testing.assert_array_equal(histogram.negatives, expected_hist.negatives)
    for got, want in zip(reliability, (before, after)):
        np.testing.assert_array_equal(got.count, want.count)
        np.testing.assert_array_equal(got.correct, want.correct)
        np.testing.assert_allclose(got.confidence, want.confidence, rtol=1e-12)
    assert not np.array_equal(reliability[0].count, reliability[1].count)  # T = 0.7 moves confidences


def test_threshold_marks_are_on_q_so_the_threshold_at_a_mark_gives_its_figures(tmp_path):
    """metrics.json `thresholds` (best F1, least cost) are the brute-force best edges on q (ties nearest 0.5 and
    fp / (fp + fn)); evaluating with rule threshold at the best-F1 mark gives that best F1."""
    costs = np.array([[0.0, 1.0], [3.0, 0.0]])
    policy = DecisionPolicy(["bg", "fg"], temperature=1.2, class_weights=[0.4, 2.5], tau=1.0, cost_matrix=costs)
    items = made_up_split(1, n=5)
    messages = []
    metrics = evaluate_split(FakeSplit(policy, items), "val", tmp_path / "a", log=messages.append)

    truth = np.concatenate([t.ravel() for _, _, t, _ in items])
    q_fg = np.concatenate([corrected(sigmoid_pair(z, 1.2), [0.4, 2.5], 1.0)[..., 1].ravel() for *_, z in items])
    p_fg = np.concatenate([sigmoid_pair(z, 1.2)[..., 1].ravel() for *_, z in items])
    valid = truth >= 0

    def best_edges(score):
        f1, cost = [], []
        for t in EDGES:
            cm = confusion_matrix_np(truth[valid], (score[valid] >= t).astype(np.int64), 2)
            f1.append(2 * cm[1, 1] / (2 * cm[1, 1] + cm[0, 1] + cm[1, 0]))
            cost.append(costs[0, 1] * cm[0, 1] + costs[1, 0] * cm[1, 0])
        f1, cost = np.array(f1), np.array(cost)
        top = np.flatnonzero(f1 == f1.max())
        low = np.flatnonzero(cost == cost.min())
        return (EDGES[top[np.argmin(np.abs(EDGES[top] - 0.5))]], f1.max(),
                EDGES[low[np.argmin(np.abs(EDGES[low] - 0.25))]])

    best_f1_mark, best_f1, least_cost_mark = best_edges(q_fg)
    assert metrics["thresholds"]["best F1"] == pytest.approx(best_f1_mark, abs=1e-12)
    assert metrics["thresholds"]["least cost"] == pytest.approx(least_cost_mark, abs=1e-12)
    assert best_edges(p_fg)[0] != best_f1_mark  # on p the mark would be elsewhere: the test tells them apart
    marked = DecisionPolicy(["bg", "fg"], temperature=1.2, class_weights=[0.4, 2.5], tau=1.0, cost_matrix=costs,
                            rule="threshold", threshold=metrics["thresholds"]["best F1"])
    again = evaluate_split(FakeSplit(marked, items), "val", tmp_path / "b", log=messages.append)
    assert again["per_class"]["fg"]["dice"] == pytest.approx(best_f1, rel=1e-12)
    # what was written: metrics.json with the policy (no run: no sources), the split, the reports
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["decision"] == json.loads(json.dumps(policy.to_dict())) and saved["split"] == "val"
    assert saved["confusion_matrix"] == metrics["confusion_matrix"]
    for name in ("per_class.csv", "per_image.csv", "pr_curve.png", "reliability.png", "confusion_matrix.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert any(m.startswith("Decision: ") and "prior correction tau 1" in m for m in messages)


def test_per_class_temperatures_in_the_calibration_report(tmp_path):
    """Three classes with per-class temperatures: metrics.json `calibration` holds them, and its ECE before and
    after are those of softmax(z) and softmax(z / T) over the split's valid pixels."""
    temperature = [0.6, 1.4, 2.0]
    policy = DecisionPolicy(["a", "b", "c"], temperature=temperature)
    items = made_up_split(2, channels=3)
    messages = []
    metrics = evaluate_split(FakeSplit(policy, items), "test", tmp_path, log=messages.append)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    truth = np.concatenate([t.ravel() for _, _, t, _ in items])
    z = np.concatenate([z.reshape(-1, 3).astype(np.float64) for *_, z in items])
    calibration = metrics["calibration"]
    assert calibration["temperature"] == temperature
    assert calibration["ece_before"] == pytest.approx(expected_calibration_error(softmax(z), truth), rel=1e-12)
    assert calibration["ece_after"] == pytest.approx(expected_calibration_error(softmax(z / temperature), truth),
                                                     rel=1e-12)
    assert calibration["ece_before"] != calibration["ece_after"]
    labels = np.argmax(softmax(z / temperature), -1)  # per-class temperatures can change the arg-max
    np.testing.assert_array_equal(metrics["confusion_matrix"], confusion_matrix_np(truth, labels, 3))
    assert any("per class 0.6, 1.4, 2" in m for m in messages)


def test_relaxed_metrics_need_two_classes(tmp_path):
    from segtrain.config import config_from_dict
    from segtrain.errors import ConfigError
    from segtrain.evaluation import evaluate_run

    config = config_from_dict({"data": {"root": "x", "classes": ["a", "b", "c"]}})
    with pytest.raises(ConfigError, match="two classes"):
        evaluate_run(tmp_path / "missing.keras", config, [], None, tmp_path, "val", relaxed_rho=1.0)


# --------------------------------------------------------------------------------------
# A tiny trained run (the few lines of tests/test_cli.py's setup it needs)
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained")
    root = make_stripes_dataset(base / "stripes", n_val=4)
    run = base / "run"
    result = invoke("fit", write_config(base / "tiny.yaml", root), "--out", run)
    assert result.exit_code == 0, result.output
    return root, run


@pytest.mark.slow
def test_per_image_matrices_sum_to_the_split_matrix_on_a_trained_run(trained_run, tmp_path):
    root, run = trained_run
    result = invoke("eval", run, "--out", tmp_path / "eval", "--worst", 3)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = _read_csv(tmp_path / "eval" / "per_image.csv")
    assert len(rows) == 4 * 2
    matrices = {}
    for r in rows:  # two classes: every image's 2 x 2 matrix from its rows
        m = matrices.setdefault(r["image"], np.zeros((2, 2), np.int64))
        c, tp = (0 if r["class"] == "background" else 1), int(r["true_positives"])
        m[c, c] = tp
        m[c, 1 - c] = int(r["support"]) - tp
    for m in matrices.values():
        assert m.sum() == 32 * 32  # every pixel of the image counted once
    assert sorted(matrices) == [f"img{i:02d}" for i in range(4)]
    assert np.array_equal(sum(matrices.values()), np.array(metrics["confusion_matrix"]))
    # the predicted counts agree with the reconstructed columns
    for r in rows:
        c = 0 if r["class"] == "background" else 1
        assert int(r["predicted"]) == matrices[r["image"]][:, c].sum()
    # the gallery: the 3 lowest-scored images of the 4, worst first, three rows
    scores = {name: foreground_score(m) for name, m in matrices.items()}
    ranked = sorted(scores, key=lambda n: (scores[n] is None, scores[n] or 0.0, n))[:3]
    assert [e["image"] for e in metrics["worst_images"]] == ranked
    with Image.open(tmp_path / "eval" / "worst_images.png") as png:
        assert png.format == "PNG" and png.size[1] > 3 * 150

    # metrics.json `decision` is the run's resolved policy: the temperature fit stored in policy.json, said so
    stored = json.loads((run / "policy.json").read_text())
    temperature = stored["calibration"]["temperature"]
    decision = metrics["decision"]
    assert decision["temperature"] == temperature == metrics["calibration"]["temperature"]
    assert decision["rule"] == "argmax" and "tuned" not in decision  # no tuned point in force
    assert len(decision["sources"]) == 1 and "policy.json" in decision["sources"][0]
    assert metrics["split"] == "val" and "operating_point" not in metrics
    # ... and its figures are those of the model's own logits under that policy, computed here: sigmoid(z / T),
    # foreground when p >= 0.5 (no prior correction, no post-processing configured)
    from segtrain.policy.predictor import Predictor
    from segtrain.runs import run_config

    predictor = Predictor.load(run / "best.keras", run_config(run), log=lambda *a: None)
    cm, p_all, p1_all, truth_all = np.zeros((2, 2), np.int64), [], [], []
    for stem in sorted(matrices):
        image = np.array(Image.open(root / "val" / "images" / f"{stem}.png")).astype(np.float32)
        truth = (np.array(Image.open(root / "val" / "masks" / f"{stem}.png")) > 127).astype(np.int64)
        z = predictor.logits(image)[..., 0].astype(np.float64)
        p = 1.0 / (1.0 + np.exp(-z / temperature))
        cm += confusion_matrix_np(truth, (p >= 0.5).astype(np.int64), 2)
        p_all.append(np.stack([1 - p, p], -1).reshape(-1, 2))
        p1 = 1.0 / (1.0 + np.exp(-z))
        p1_all.append(np.stack([1 - p1, p1], -1).reshape(-1, 2))
        truth_all.append(truth.ravel())
    np.testing.assert_array_equal(cm, metrics["confusion_matrix"])
    truth_all = np.concatenate(truth_all)
    assert metrics["calibration"]["ece_after"] == pytest.approx(
        expected_calibration_error(np.concatenate(p_all), truth_all), rel=1e-9)
    assert metrics["calibration"]["ece_before"] == pytest.approx(
        expected_calibration_error(np.concatenate(p1_all), truth_all), rel=1e-9)


@pytest.mark.slow
def test_command_line_overrides_are_in_the_decision_and_named_among_its_sources(trained_run, tmp_path):
    from segtrain.evaluation import evaluate_checkpoint

    _, run = trained_run
    quiet = lambda *a: None  # noqa: E731
    tta = evaluate_checkpoint(str(run), None, None, tmp_path / "tta", tta=True, log=quiet)
    assert tta["decision"]["tta"] is True and "tta on (command line)" in tta["decision"]["sources"]
    assert tta["decision"]["rule"] == "argmax"
    strict = evaluate_checkpoint(str(run), None, None, tmp_path / "t", threshold=0.7, log=quiet)
    assert strict["decision"]["rule"] == "threshold" and strict["decision"]["threshold"] == 0.7
    assert any(s.startswith("rule threshold 0.7 (command line") for s in strict["decision"]["sources"])
    # the threshold is on q (= p here): a cut of 0.7 predicts no more foreground than arg-max (0.5) on the same logits
    plain = evaluate_checkpoint(str(run), None, None, tmp_path / "p", log=quiet)
    assert plain["decision"]["rule"] == "argmax" and not any("command line" in s for s in plain["decision"]["sources"])
    assert np.array(strict["confusion_matrix"])[:, 1].sum() <= np.array(plain["confusion_matrix"])[:, 1].sum()
    # several at once: each is applied and each is named
    both = evaluate_checkpoint(str(run), None, None, tmp_path / "both", threshold=0.7, tta=True, log=quiet)
    assert both["decision"]["tta"] is True and both["decision"]["threshold"] == 0.7
    assert any(s.startswith("rule threshold 0.7 (command line") for s in both["decision"]["sources"])
    assert "tta on (command line)" in both["decision"]["sources"]
