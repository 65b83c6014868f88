"""Per-image evaluation: per_image.csv (the absent-class rule), the worst-images gallery, and their agreement
with the split's confusion matrix."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from segtrain.evaluation import PerImage, foreground_score, write_reports
from segtrain.metrics import metrics_from_confusion
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
# A tiny trained run (the few lines of tests/test_cli.py's setup it needs)
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_per_image_matrices_sum_to_the_split_matrix_on_a_trained_run(tmp_path):
    root = make_stripes_dataset(tmp_path / "stripes", n_val=4)
    run = tmp_path / "run"
    result = invoke("fit", write_config(tmp_path / "tiny.yaml", root), "--out", run)
    assert result.exit_code == 0, result.output
    result = invoke("eval", "--checkpoint", run, "--out", tmp_path / "eval", "--worst", 3)
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
