"""`segtrain compare RUN RUN...`: the table (printed and --json) equals each run's metrics.json, --sort orders it,
classes not in every run are named, the config keys that differ are listed, the page renders offline; bad input
exits 2 and writes nothing."""

import json

import numpy as np
import pytest

from segtrain.html_report import fmt
from tests.browser import fake_run, page_dom, page_screenshot, read_page
from tests.helpers import folder_digest, invoke

MATRICES = {"a": ((900, 40), (60, 200)), "b": ((950, 10), (30, 250)), "c": ((800, 150), (90, 100))}


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """Three runs of two classes with known confusion matrices; b trained more epochs within a budget. The working
    directory is tmp_path (compare writes compare.html there by default)."""
    monkeypatch.chdir(tmp_path)
    made = {}
    for name, cm in MATRICES.items():
        epochs = 5 if name == "b" else 3
        made[name] = fake_run(tmp_path / name, cm=cm, epochs=epochs, budget="1m" if name == "b" else None)
    return made


def printed_rows(output):
    """The runs table of compare's output: {run: {column: cell}}."""
    lines = output.splitlines()
    header = lines[0].split()
    rows = {}
    for line in lines[2:]:
        if not line.strip() or line.startswith("*"):
            break
        cells = line.split(None, len(header) - 1)
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_the_table_equals_each_runs_metrics_json(runs):
    result = invoke("compare", *runs.values())
    assert result.exit_code == 0, result.output
    printed = printed_rows(result.output)
    listed = json.loads(invoke("compare", *runs.values(), "--json").output.split("\nWrote ")[0])["runs"]
    assert [row["run"] for row in listed] == list(runs) == list(printed)
    for row in listed:
        metrics = json.loads((runs[row["run"]] / "metrics.json").read_text())
        assert row["mean_iou"] == metrics["mean_iou"]
        cm = np.asarray(MATRICES[row["run"]], dtype=float)  # the mean IoU by hand, from the matrix
        iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
        assert row["mean_iou"] == pytest.approx(iou.mean(), abs=1e-12)
        for c in ("background", "road"):
            assert row[f"iou_{c}"] == metrics["per_class"][c]["iou"]
            assert row[f"f1_{c}"] == metrics["per_class"][c]["dice"]
        cells = printed[row["run"]]
        assert cells["mean_iou"] == f"{metrics['mean_iou']:.4f}"
        assert cells["iou_road"] == fmt(metrics["per_class"]["road"]["iou"])
        assert cells["f1_background"] == fmt(metrics["per_class"]["background"]["dice"])
        epochs = 5 if row["run"] == "b" else 3
        assert cells["steps"] == str(5 * epochs) and cells["epochs"] == str(epochs)
        assert cells["time"] == f"{2.5 * epochs:.1f}s*"  # history.csv: 2.5 s an epoch, no training_seconds
        assert cells["decision"] == "argmax, temperature 0.8000"
    assert printed["b"]["budget"] == "1m" and printed["a"]["budget"] == "-"
    assert "Wrote compare.html" in result.output and (runs["a"].parent / "compare.html").is_file()


def test_sort_orders_rows_best_first_for_scores_and_ascending_otherwise(runs):
    def order(key):
        result = invoke("compare", *runs.values(), "--sort", key)
        assert result.exit_code == 0, result.output
        return list(printed_rows(result.output))

    mean_iou = {name: json.loads((run / "metrics.json").read_text())["mean_iou"] for name, run in runs.items()}
    assert order("mean_iou") == sorted(mean_iou, key=mean_iou.get, reverse=True) == ["b", "a", "c"]
    assert order("steps") == ["a", "c", "b"] and order("run") == ["a", "b", "c"]
    assert order("budget") == ["b", "a", "c"]  # runs without a budget last
    result = invoke("compare", *runs.values(), "--sort", "iou_river")
    assert result.exit_code == 2 and "--sort iou_river: not a column" in result.output
    assert "mean_iou, iou_background, iou_road, f1_background, f1_road, steps" in result.output


def test_classes_not_in_every_run_and_the_config_keys_that_differ(runs, tmp_path):
    three = fake_run(tmp_path / "three", classes=("background", "road", "car"),
                     cm=((500, 10, 5), (20, 100, 0), (3, 0, 40)), epochs=3)
    result = invoke("compare", runs["a"], runs["b"], three, "--json")
    data = json.loads(result.output.split("\nWrote ")[0])
    assert data["classes"] == ["background", "road"] and data["unshared_classes"] == {"car": ["three"]}
    assert all("iou_car" not in row for row in data["runs"])
    # a and three have the same train section; b differs in epochs and budget; the classes differ for three
    assert data["config_keys"] == ["data.classes", "train.budget", "train.epochs"]
    assert [row["config"]["train.epochs"] for row in data["runs"]] == ["3", "5", "3"]
    printed = invoke("compare", runs["a"], runs["b"], three).output
    assert "Class 'car' is not in every run (only in three): left out of the table." in printed
    config_lines = printed.split("Config keys that differ:\n")[1].splitlines()
    assert config_lines[0].split() == ["config", "key", "a", "b", "three"]
    assert [line.split()[0] for line in config_lines[2:5]] == data["config_keys"]
    assert config_lines[5].startswith("Wrote ")
    assert "train.learning_rate" not in printed


def test_the_page_renders_the_same_table_and_fetches_nothing(runs, tmp_path):
    result = invoke("compare", *runs.values(), "--out", tmp_path / "page.html")
    assert result.exit_code == 0, result.output
    dom, requests = page_dom(tmp_path / "page.html")
    assert requests == []
    tables, text = read_page(dom)
    printed = printed_rows(result.output)
    header = tables["runs"][0]
    assert {row[0]: dict(zip(header, row)) for row in tables["runs"][1:]} == printed
    assert tables["config"][0] == ["config key", "a", "b", "c"] and [r[0] for r in tables["config"][1:]] == [
        "train.budget", "train.epochs"]
    assert dom.count('src="data:image/png;base64,') == 1  # the overlaid curves
    shot, requests = page_screenshot(tmp_path / "page.html", tmp_path / "shot.png", 1280, 1400)
    blue = np.all(np.abs(shot.astype(int) - (31, 119, 180)) <= 20, axis=-1).sum()  # matplotlib's first line colour
    assert requests == [] and blue > 200


@pytest.mark.parametrize("case", ["not a run", "not finished", "out folder", "one run"])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(runs, tmp_path, case):
    (tmp_path / "empty").mkdir()
    if case == "not finished":
        (runs["c"] / "metrics.json").unlink()
    args, expected = {
        "not a run": ((runs["a"], tmp_path / "empty"), "empty: not a run folder"),
        "not finished": ((runs["a"], runs["c"]), "c: no metrics.json yet"),
        "out folder": ((runs["a"], runs["b"], "--out", tmp_path / "missing" / "c.html"), "the folder"),
        "one run": ((runs["a"],), "compare needs two or more runs, segtrain compare RUN RUN... (given 1)"),
    }[case]
    before = folder_digest(tmp_path)
    result = invoke("compare", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output and expected in result.output
    assert folder_digest(tmp_path) == before and not (tmp_path / "compare.html").exists()


def test_the_training_time_metrics_json_records_is_shown_as_is(runs):
    metrics = json.loads((runs["a"] / "metrics.json").read_text())
    (runs["a"] / "metrics.json").write_text(json.dumps({**metrics, "training_seconds": 75.0}))
    printed = printed_rows(invoke("compare", runs["a"], runs["c"]).output)
    assert printed["a"]["time"] == "1m15s" and printed["c"]["time"] == "7.5s*"


def test_a_run_named_twice_is_refused(tmp_path):
    from tests.browser import fake_run

    run = fake_run(tmp_path / "a")
    result = invoke("compare", run, tmp_path / "a", "--out", tmp_path / "c.html")
    assert result.exit_code == 2 and "named twice; compare each run once" in result.output
    assert not (tmp_path / "c.html").exists()
