"""`segtrain report RUN`: one self-contained page per run. A real tiny run's page rendered in headless Chromium holds
its numbers and fetches nothing; pictures show (one-colour PNGs found in a screenshot); an older run's page says
what is missing; bad input exits 2 and writes nothing."""

import json
import re

import numpy as np
import pytest

from segtrain.html_report import CONTENT_SECURITY_POLICY, REPORT_FILE, fmt
from tests.browser import class_figures, colour_pixels, fake_run, page_dom, page_screenshot, read_page
from tests.helpers import folder_digest, invoke, make_stripes_dataset, write_config


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A tiny trained run, evaluated once (eval_val/), with its report written by `segtrain report`."""
    base = tmp_path_factory.mktemp("report")
    config = write_config(base / "tiny.yaml", make_stripes_dataset(base / "stripes", n_train=4, n_val=2))
    run = base / "run"
    for args in (("fit", config, "--out", run), ("eval", run), ("report", run)):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    assert result.output.strip() == f"Wrote {run / REPORT_FILE}"
    return run


def per_class_cells(metrics):
    """The per-class rows the page must show, formatted here from metrics.json (absent classes as eval prints them)."""
    rows = [["Class", "IoU", "Dice (F1)", "Precision", "Recall", "Support"]]
    for name, m in metrics["per_class"].items():
        shown = [fmt(m[k]) for k in ("iou", "dice", "precision", "recall")] if m["present"] else ["absent"] + ["-"] * 3
        rows.append([name, *shown, str(m["support"])])
    return rows


@pytest.mark.slow
def test_a_trained_runs_page_holds_its_numbers_and_fetches_nothing(evaluated_run):
    run = evaluated_run
    dom, requests = page_dom(run / REPORT_FILE)
    assert requests == []
    tables, text = read_page(dom)
    metrics = json.loads((run / "metrics.json").read_text())
    evaluated = json.loads((run / "eval_val" / "metrics.json").read_text())
    assert tables["per-class"] == per_class_cells(metrics)
    assert tables["eval-0-per-class"] == per_class_cells(evaluated)
    overall = dict(row for row in tables["overall"])
    assert overall["Mean IoU"] == f"{metrics['mean_iou']:.4f}"
    assert overall["Pixel accuracy"] == f"{metrics['pixel_accuracy']:.4f}"
    assert overall["Pixels"] == str(sum(map(sum, metrics["confusion_matrix"])))
    history = (run / "history.csv").read_text().splitlines()
    assert len(tables["history"]) == len(history) and tables["history"][0] == history[0].split(",")
    assert [row[0] for row in tables["class-stats"][1:]] == ["background", "stripe"]
    stats = json.loads((run / "class_stats.json").read_text())
    assert [int(row[1]) for row in tables["class-stats"][1:]] == stats["counts"]
    temperature = json.loads((run / "policy.json").read_text())["calibration"]["temperature"]
    assert dict(tables["decision"])["Fit's evaluation applied"] == f"argmax, temperature {temperature:.4f}"
    assert "Never evaluated" not in text and "eval_val/ (split val)" in text
    # every PNG of the run folder and of eval_val/ is inlined, none drawn again
    pngs = len(list(run.glob("*.png"))) + len(list((run / "eval_val").glob("*.png")))
    assert dom.count('src="data:image/png;base64,') == pngs and "drawn for this report" not in text


@pytest.mark.slow
def test_the_pictures_show_and_the_page_is_not_blank(tmp_path):
    colours = {"class_iou.png": (255, 0, 255), "history.png": (0, 200, 200), "worst_images.png": (250, 200, 0),
               "a_new_plot.png": (10, 120, 10)}  # a PNG the report does not know: shown under "Other pictures"
    run = fake_run(tmp_path / "run", pictures=colours)
    assert invoke("report", run).exit_code == 0
    shot, requests = page_screenshot(run / REPORT_FILE, tmp_path / "shot.png", 1280, 3000)
    assert requests == []
    for name, rgb in colours.items():  # each 320 x 160 one-colour PNG, shown at its own size
        assert colour_pixels(shot, rgb) == 320 * 160, name
    text_pixels = (shot.min(axis=-1) < 100).sum()  # dark text and the drawn confusion matrix
    packed = (shot[..., 0].astype(np.int32) << 16) | (shot[..., 1].astype(np.int32) << 8) | shot[..., 2]
    assert text_pixels > 20_000 and len(np.unique(packed)) > 50  # text, plot and pictures: many colours


@pytest.mark.slow
def test_the_proxy_sees_a_pages_requests_and_the_policy_stops_them(tmp_path):
    """The check that nothing is fetched can fail: without the page's policy the proxy records an external picture
    and stylesheet; the same tags under the report's Content-Security-Policy fetch nothing."""
    tags = '<img src="http://example.invalid/pixel.png"><link rel="stylesheet" href="http://127.0.0.1:8999/a.css">'
    bare = tmp_path / "bare.html"
    bare.write_text(f"<!DOCTYPE html><html><head>{tags}</head><body><p>control</p></body></html>")
    guarded = tmp_path / "guarded.html"
    guarded.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                       f'content="{CONTENT_SECURITY_POLICY}">{tags}</head><body><p>control</p></body></html>')
    _, requests = page_dom(bare)
    assert sorted(requests) == ["GET http://127.0.0.1:8999/a.css", "GET http://example.invalid/pixel.png"]
    assert page_dom(guarded)[1] == []


def test_the_page_is_self_contained_and_escapes_every_text(tmp_path):
    run = fake_run(tmp_path / "run", classes=("back<ground", "<script>alert(1)</script>"),
                   pictures={"class_iou.png": (1, 2, 3)})
    assert invoke("report", run).exit_code == 0
    page = (run / REPORT_FILE).read_text()
    assert "<script" not in page.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f'content="{CONTENT_SECURITY_POLICY}"' in page and "default-src 'none'" in CONTENT_SECURITY_POLICY
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)


def test_an_older_run_says_what_is_missing_and_draws_what_it_can(tmp_path):
    run = fake_run(tmp_path / "old", cm=((50, 5, 0), (4, 31, 0), (0, 0, 0)), classes=("a", "b", "c"), minimal=True)
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    tables, text = read_page((run / REPORT_FILE).read_text())
    for said in ("history.csv is not in the run folder", "class_stats.json is not in the run folder",
                 "policy.json is not in the run folder", "Never evaluated with `segtrain eval`",
                 "No budget.json", "not recorded (metrics.json of an older segtrain)",
                 "pr_curve.png is not in old/ (drawn for two classes only)",
                 "Confusion matrix (drawn for this report: confusion_matrix.png is not in the folder)"):
        assert said in text, said
    expected = class_figures(((50, 5, 0), (4, 31, 0), (0, 0, 0)))
    assert tables["per-class"][3] == ["c", "absent", "-", "-", "-", "0"]  # absent from truth and prediction
    assert tables["per-class"][1][1] == f"{expected[0]['iou']:.4f}" == f"{50 / 59:.4f}"


def test_unreadable_files_are_named_and_shown_as_missing(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "policy.json").write_text("{not json")
    assert invoke("report", run).exit_code == 0
    _, text = read_page((run / REPORT_FILE).read_text())
    assert "Unreadable, shown as missing: run/policy.json: not valid JSON" in text


def test_a_tuned_point_is_shown_in_words_as_tune_printed_it(tmp_path):
    run = fake_run(tmp_path / "run")
    stored = json.loads((run / "policy.json").read_text())
    scores = {"objective": 0.61, "mean_iou": 0.7, "pixel_accuracy": 0.9, "mean_cost": 0.1, "precision": 0.5,
              "recall": 0.8, "f1": 0.61, "iou": 0.44}
    stored["tuned"] = {
        "split": "val", "objective": "f1", "images": 6, "pixels": 2400, "level": "threshold", "threshold": 0.42,
        "estimate": {"folds": 3, "before": 0.5512, "levels": {"threshold": 0.6034}}, "cost_matrix": None,
        "searched": {"levels": ["threshold"], "tau": None, "bias": None, "sizes": None},
        "before": {**scores, "objective": 0.55, "f1": 0.55}, "after": {**scores, "classes_never_predicted": []}}
    (run / "policy.json").write_text(json.dumps(stored))
    assert invoke("report", run).exit_code == 0
    _, text = read_page((run / REPORT_FILE).read_text())
    section = text[text.index("Tuned operating point"):]
    assert "Tuned on val (6 images, 2400 labelled pixels) for f1: threshold 0.420 on q" in section
    assert "Held-out estimate (3-fold over images, f1): untuned 0.5512; threshold 0.6034" in section
    assert '"folds"' not in section and "{" not in section.split("Data", 1)[0]  # words, not JSON


@pytest.mark.parametrize("case", ["no folder", "not a run", "not finished", "a file", "bad metrics", "out folder"])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path, case):
    run = fake_run(tmp_path / "run")
    args, expected = {
        "no folder": ((tmp_path / "nope",), "nope: no such folder"),
        "not a run": ((tmp_path / "empty",), "empty: not a run folder (no config.yaml, no metrics.json)"),
        "not finished": ((run,), "run: no metrics.json yet; fit writes it when training ends"),
        "a file": ((run / "config.yaml",), "config.yaml: a file, not a run folder"),
        "bad metrics": ((run,), "metrics.json: not a metrics file segtrain wrote"),
        "out folder": ((run, "--out", tmp_path / "missing" / "r.html"), "the folder"),
    }[case]
    (tmp_path / "empty").mkdir()
    if case == "not finished":
        (run / "metrics.json").unlink()
    if case == "bad metrics":
        (run / "metrics.json").write_text("[1, 2")
    before = folder_digest(tmp_path)
    result = invoke("report", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and expected in result.output and result.output.count("\n") == 1
    assert folder_digest(tmp_path) == before and not (run / REPORT_FILE).exists()


def test_out_writes_elsewhere_and_leaves_the_run_folder_alone(tmp_path):
    run = fake_run(tmp_path / "run")
    before = folder_digest(run)
    result = invoke("report", run, "--out", tmp_path / "page.html")
    assert result.exit_code == 0 and result.output.strip() == f"Wrote {tmp_path / 'page.html'}"
    assert folder_digest(run) == before and (tmp_path / "page.html").read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "run"]  # no temporary file left


def test_worked_example_of_the_figures_helper():
    """class_figures (which the fake runs use) against numbers worked out by hand: tp 40, fn 10, fp 20."""
    background, road = class_figures(((100, 20), (10, 40)))
    assert road["iou"] == pytest.approx(40 / 70) and road["dice"] == pytest.approx(80 / 110)
    assert road["precision"] == pytest.approx(40 / 60) and road["recall"] == pytest.approx(40 / 50)
    assert background["support"] == 120 and road["present"]
