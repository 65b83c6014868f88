"""Tests for segtrain.reports: table, JSON, CSV and PNG writers."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from segtrain import reports
from segtrain.atomic import write_json
from segtrain.metrics import ProbabilityHistogram, metrics_from_confusion, pr_curve

NAMES = ["background", "road", "building", "water"]
# rows true, cols pred; building absent, water predicted once but never true
CM = [[3, 1, 0, 1], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


@pytest.fixture
def metrics():
    cost = np.zeros((4, 4))
    cost[0, 1], cost[1, 0], cost[0, 3] = 1.0, 5.0, 3.0
    return metrics_from_confusion(CM, NAMES, cost_matrix=cost)


def _assert_png_not_blank(path):
    assert os.path.getsize(path) > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 100 and im.height > 100
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 10  # axes, text, curves: not a blank canvas


def _no_temp_files(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")] == []


def test_table_rows_and_overall_values(metrics):
    table = reports.format_metrics_table(metrics)
    lines = table.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:6]}
    # background: IoU 3/6, Dice 6/9, P 3/4, R 3/5, support 5
    assert rows["background"] == ["background", "0.5000", "0.6667", "0.7500", "0.6000", "5"]
    assert rows["road"] == ["road", "0.5000", "0.6667", "0.6667", "0.6667", "3"]
    assert rows["building"] == ["building", "absent", "-", "-", "-", "0"]
    # water: predicted once, never true -> IoU 0, precision 0, recall undefined
    assert rows["water"] == ["water", "0.0000", "0.0000", "0.0000", "-", "0"]
    # columns aligned: every row has the same length as the header
    assert len({len(line) for line in lines[:6]}) == 1
    assert "Mean IoU:" in table and "0.3333" in table  # (0.5 + 0.5 + 0) / 3
    assert "Pixel accuracy:" in table and "0.6250" in table  # 5 / 8
    assert "Frequency-weighted IoU:" in table and "0.5000" in table.split("Frequency-weighted IoU:")[1]
    assert "Expected cost per pixel:" in table and "1.1250" in table  # 9 / 8


def test_table_without_cost_has_no_cost_line():
    table = reports.format_metrics_table(metrics_from_confusion([[1, 0], [0, 1]], ["a", "b"]))
    assert "cost" not in table.lower()


def test_metrics_json_round_trip_with_null(metrics, tmp_path):
    path = tmp_path / "metrics.json"
    write_json(metrics, path)
    text = path.read_text()
    assert "NaN" not in text and "null" in text
    assert json.loads(text) == metrics
    assert json.loads(text)["per_class"]["building"]["iou"] is None
    assert _no_temp_files(tmp_path)


def test_csv_parses_back_to_metrics(metrics, tmp_path):
    path = tmp_path / "per_class.csv"
    reports.write_per_class_csv(metrics, path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "iou", "dice", "precision", "recall", "support"]
    assert [r[0] for r in rows[1:]] == NAMES
    for row in rows[1:]:
        want = metrics["per_class"][row[0]]
        for key, cell in zip(["iou", "dice", "precision", "recall"], row[1:5]):
            assert (None if cell == "" else float(cell)) == want[key]  # exact: full precision
        assert int(row[5]) == want["support"]
    assert rows[3] == ["building", "", "", "", "", "0"]
    assert _no_temp_files(tmp_path)


def test_plot_confusion_matrix_png(tmp_path):
    path = tmp_path / "confusion.png"
    reports.plot_confusion_matrix(np.array(CM), NAMES, path)
    _assert_png_not_blank(path)
    assert _no_temp_files(tmp_path)
    with pytest.raises(ValueError):
        reports.plot_confusion_matrix(np.array(CM), NAMES[:3], tmp_path / "x.png")


def test_plot_pr_curve_png(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.random(2000)
    hist = ProbabilityHistogram(100)
    hist.update(p, (rng.random(2000) < p).astype(int))
    path = tmp_path / "pr.png"
    reports.plot_pr_curve(pr_curve(hist), path, marks={"0.5": 0.5, "least cost": 0.25})
    _assert_png_not_blank(path)


def test_plot_history_from_rows_and_csv(tmp_path):
    rows = [{"epoch": e, "loss": 1.0 / e, "val_loss": 1.2 / e, "val_mean_iou": 0.1 * e,
             "val_iou_road": 0.05 * e, "lr": 1e-3} for e in range(1, 6)]
    path = tmp_path / "history.png"
    reports.plot_history(rows, path)
    _assert_png_not_blank(path)

    csv_path = tmp_path / "history.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    path2 = tmp_path / "history_csv.png"
    reports.plot_history(str(csv_path), path2)
    _assert_png_not_blank(path2)
    # same data, same picture size whether given as rows or as a CSV
    with Image.open(path) as a, Image.open(path2) as b:
        assert a.size == b.size
    with pytest.raises(ValueError):
        reports.plot_history([], tmp_path / "empty.png")


def test_history_panels_go_by_column_kind_not_substring():
    """A class named `gloss` keeps its IoU and Dice curves among the metrics, not the losses."""
    columns = {name: np.arange(3.0) for name in ("loss", "val_loss", "val_mean_iou", "val_iou_gloss",
                                                   "val_dice_gloss", "val_iou_loss", "train_loss_extra")}
    panels = reports._history_panels(columns)
    assert list(panels["loss"]) == ["loss", "val_loss"]
    assert list(panels["metrics"]) == ["val_mean_iou", "val_iou_gloss", "val_dice_gloss", "val_iou_loss",
                                       "train_loss_extra"]


def test_importing_reports_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, segtrain.reports; print('matplotlib' in sys.modules)"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_never_predicted_classes_are_named_under_the_table_and_drawn_red(tmp_path):
    # rows true, columns predicted: "pole" is in the truth but never predicted, "sign" absent from both
    cm = np.array([[50, 2, 0, 0], [3, 40, 0, 0], [4, 1, 0, 0], [0, 0, 0, 0]])
    metrics = metrics_from_confusion(cm, ["road", "car", "pole", "sign"])
    assert reports.never_predicted(metrics) == ["pole"]
    assert reports.format_metrics_table(metrics).splitlines()[-1].endswith(": pole")
    path = tmp_path / "class_iou.png"
    reports.plot_class_iou(metrics, path)
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (image[..., 0] > 150) & (image[..., 1] < 90) & (image[..., 2] < 90)  # tab:red (214, 39, 40) text
    assert red.sum() > 30
    everything = metrics_from_confusion(np.array([[5, 1], [1, 5]]), ["a", "b"])
    assert reports.never_predicted(everything) == []
    assert "Never predicted" not in reports.format_metrics_table(everything)
