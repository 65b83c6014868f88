"""End-to-end: fit a couple of epochs on tiny data through the CLI, then eval and predict."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import REPO, SHARED_DATASETS, folder_digest, invoke, make_stripes_dataset, write_config

pytestmark = pytest.mark.slow

CLI_TINY = {
    "model": {"depth": 2, "base_filters": 4},
    "data": {"classes": ["background", "stripe"], "mask": {"threshold": 127}, "crop": 16, "batch_size": 4},
    "loss": {"terms": [{"name": "cross_entropy"}, {"name": "jaccard", "weight": 0.5}], "class_weights": "balanced"},
    "train": {"epochs": 2, "learning_rate": 0.01, "seed": 1},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests of this module."""
    base = tmp_path_factory.mktemp("e2e")
    root = make_stripes_dataset(base / "stripes", n_train=8, n_val=3)
    config = write_config(base / "tiny.yaml", root, CLI_TINY)
    run = base / "run"
    result = invoke("fit", config, "--out", run)
    assert result.exit_code == 0, result.output
    return base, root, config, run, result.output


def test_fit_writes_a_complete_run_folder(trained):
    base, root, config, run, output = trained
    for name in ("config.yaml", "class_stats.json", "best.keras", "last.keras", "history.csv", "metrics.json",
                 "history.png", "per_class.csv", "confusion_matrix.png", "run.json", "report.html"):
        assert (run / name).is_file(), name
    assert any((run / "checkpoints").iterdir()) and (run / "logs").is_dir()
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and len(history) == 3  # header + 2 epochs
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"background", "stripe"}
    for values in metrics["per_class"].values():
        assert {"iou", "dice", "precision", "recall", "support"} <= set(values)
    cm = np.array(metrics["confusion_matrix"])
    # the val split has 3 images of 32x32 pixels, all labelled
    assert cm.sum() == 3 * 32 * 32 and metrics["per_class"]["stripe"]["support"] == cm[1].sum()
    stats = json.loads((run / "class_stats.json").read_text())
    assert stats["classes"] == ["background", "stripe"] and sum(stats["counts"]) == 8 * 32 * 32
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 2 and resolved["data"]["root"] == str(root)


def test_best_model_loads_without_segtrain(trained):
    _, _, _, run, _ = trained
    code = (
        "import sys, keras, numpy as np; "
        "assert 'segtrain' not in sys.modules; "
        f"m = keras.models.load_model(r'{run / 'best.keras'}', compile=False); "
        "print(m(np.zeros((1, 32, 32, 3), 'float32')).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 32, 32, 1)" in out.stdout


def test_eval_matches_numpy_on_predicted_masks(trained, tmp_path):
    base, root, config, run, _ = trained
    result = invoke("eval", run, "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "stripe" in result.output and "IoU" in result.output
    assert result.output.count(f"Using {run / 'best.keras'} (run {run})") == 1
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name in ("per_class.csv", "confusion_matrix.png", "pr_curve.png"):
        assert (tmp_path / "eval" / name).is_file(), name

    result = invoke("predict", run, root / "val" / "images", "--out", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    assert result.output.count(f"Using {run / 'best.keras'} (run {run})") == 1
    cm = np.zeros((2, 2), np.int64)
    for mask_path in sorted((root / "val" / "masks").glob("*.png")):
        truth = (np.asarray(Image.open(mask_path)) > 127).astype(int)
        predicted = np.asarray(Image.open(tmp_path / "pred" / mask_path.name))
        assert predicted.shape == truth.shape and set(np.unique(predicted)) <= {0, 255}
        cm += np.bincount(2 * truth.ravel() + (predicted.ravel() > 127), minlength=4).reshape(2, 2)
    assert np.array_equal(np.array(metrics["confusion_matrix"]), cm)
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    if tp + fp + fn:
        assert metrics["per_class"]["stripe"]["iou"] == pytest.approx(tp / (tp + fp + fn))


def test_eval_relaxed_scores_are_at_least_the_strict_ones(trained, tmp_path):
    _, _, _, run, _ = trained
    result = invoke("eval", run, "--out", tmp_path / "eval", "--relaxed", 2)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    relaxed, strict = metrics["relaxed"], metrics["per_class"]["stripe"]
    assert relaxed["rho"] == 2 and "Relaxed (rho=2 px)" in result.output
    for key in ("precision", "recall"):
        if strict[key] is not None:
            assert relaxed[key] >= strict[key] - 1e-12


def test_without_a_run_nothing_is_chosen_the_newest_is_suggested(trained, tmp_path, monkeypatch):
    _, root, _, run, _ = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(run)
    odd = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 45, 3)).astype(np.uint8)).save(odd)
    before = folder_digest(tmp_path)
    for args in (("predict", "odd.png", "--overlay"), ("eval",)):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "missing RUN" in result.output and "the newest run under runs/ is runs/tiny" in result.output
        assert "Using" not in result.output and result.output.count("Error:") == 1
    assert "segtrain predict RUN odd.png" in invoke("predict", "odd.png").output
    assert folder_digest(tmp_path) == before  # nothing written, in the run or beside it

    result = invoke("predict", "runs/tiny", "odd.png", "--overlay", "--probabilities")
    assert result.exit_code == 0, result.output
    assert result.output.count("Using runs/tiny/best.keras (run runs/tiny)") == 1
    out = run / "predictions"
    assert np.asarray(Image.open(out / "odd.png")).shape == (37, 45)
    assert (out / "odd_overlay.png").is_file() and (out / "odd_prob_stripe.png").is_file()


def test_checkpoint_still_works_as_a_deprecated_alias_of_run(trained, tmp_path):
    _, root, _, run, _ = trained
    new = invoke("eval", run, "--out", tmp_path / "new", "--worst", 0)
    old = invoke("eval", "--checkpoint", run, "--out", tmp_path / "old", "--worst", 0)
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert "deprecated" not in new.output
    assert old.output.count("note: --checkpoint is deprecated; pass the run first: segtrain eval") == 1
    assert old.output.count(f"Using {run / 'best.keras'}") == 1

    def matrix(folder):
        return json.loads((folder / "metrics.json").read_text())["confusion_matrix"]

    assert matrix(tmp_path / "old") == matrix(tmp_path / "new")
    result = invoke("predict", root / "val" / "images", "--checkpoint", run, "--out", tmp_path / "masks")
    assert result.exit_code == 0, result.output
    assert "--checkpoint is deprecated" in result.output
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == sorted(
        p.name for p in (root / "val" / "masks").iterdir())
    result = invoke("eval", run, "--checkpoint", run, "--out", tmp_path / "twice")
    assert result.exit_code == 2 and "given twice" in result.output and not (tmp_path / "twice").exists()


def test_set_changes_predict_settings_for_one_command_and_reports_them(trained, tmp_path):
    _, root, _, run, _ = trained
    before = folder_digest(run)

    def evaluated(name, *args):
        result = invoke("eval", run, "--out", tmp_path / name, "--worst", 0, *args)
        assert result.exit_code == 0, result.output
        return result.output, json.loads((tmp_path / name / "metrics.json").read_text())

    output, by_set = evaluated("set_tta", "--set", "predict.tta=true")
    assert output.count("--set predict.tta=true (the run's: false)") == 1
    _, by_flag = evaluated("flag_tta", "--tta")
    assert by_set["decision"]["tta"] is True and by_set["confusion_matrix"] == by_flag["confusion_matrix"]
    output, by_set = evaluated("set_threshold", "--set", "predict.decision=threshold",
                               "--set", "predict.threshold=0.9")
    assert "--set predict.decision=threshold (the run's: argmax)" in output
    assert "--set predict.threshold=0.9 (the run's: null)" in output
    _, by_flag = evaluated("flag_threshold", "--threshold", 0.9)
    assert by_set["decision"]["threshold"] == 0.9 and by_set["confusion_matrix"] == by_flag["confusion_matrix"]

    result = invoke("predict", run, root / "val" / "images", "--out", tmp_path / "masks",
                    "--set", "predict.tile_size=16", "--set", "predict.overlap=0.5")
    assert result.exit_code == 0, result.output
    assert "--set predict.tile_size=16 (the run's: null)" in result.output
    assert len(list((tmp_path / "masks").iterdir())) == 3
    assert folder_digest(run) == before  # config.yaml is never written

    refused = tmp_path / "refused"
    for command in (["eval", run, "--out", refused], ["predict", run, root / "val" / "images", "--out", refused],
                    ["calibrate", run], ["tune", run], ["export", run, "--out", refused]):
        result = invoke(*command, "--set", "data.crop=8")
        assert result.exit_code == 2, (command, result.output)
        assert "data.crop is fixed by training" in result.output and "only predict.* keys" in result.output
        assert not refused.exists()
    assert folder_digest(run) == before


def test_calibrate_and_tune_take_run_and_set(trained, tmp_path):
    import shutil

    _, _, _, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = invoke("calibrate", copy, "--set", "predict.tta=true")
    assert result.exit_code == 0, result.output
    assert result.output.count(f"Using {copy / 'best.keras'} (run {copy})") == 1
    assert "--set predict.tta=true (the run's: false)" in result.output and "Calibrating" in result.output
    result = invoke("tune", copy, "--no-postprocess", "--set", "predict.calibrate=false")
    assert result.exit_code == 0, result.output
    assert result.output.count(f"Using {copy / 'best.keras'} (run {copy})") == 1
    assert "--set predict.calibrate=false (the run's: true)" in result.output
    assert yaml.safe_load((copy / "config.yaml").read_text()) == yaml.safe_load((run / "config.yaml").read_text())


def test_export_refuses_an_existing_folder_and_overwrite_replaces_it_only_when_complete(trained, tmp_path,
                                                                                        monkeypatch):
    _, _, _, run, _ = trained
    out = tmp_path / "export"
    result = invoke("export", run, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.output.count(f"Using {run / 'best.keras'} (run {run})") == 1
    (out / "mine.txt").write_text("old")
    before = folder_digest(out)

    result = invoke("export", run, "--out", out)
    assert result.exit_code == 2 and "not empty" in result.output and "--overwrite" in result.output
    assert folder_digest(out) == before

    import segtrain.export

    def crash(module, path):  # a failure halfway through the new export
        path.mkdir()
        (path / "half").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(segtrain.export, "_save_saved_model", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        invoke("export", run, "--out", out, "--overwrite")
    assert folder_digest(out) == before  # the old export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no half-written sibling left
    monkeypatch.undo()

    result = invoke("export", run, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "mine.txt").exists() and (out / "saved_model").is_dir()
    assert json.loads((out / "metadata.json").read_text())["source"] == str(run / "best.keras")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_help_lists_the_commands_in_the_order_of_the_work_each_summary_whole():
    from segtrain.cli import COMMAND_ORDER, cli
    from segtrain.config import PredictConfig

    result = invoke("--help")
    assert result.exit_code == 0
    listed = result.output.split("Commands:\n")[1].splitlines()
    assert [line.split()[0] for line in listed] == list(COMMAND_ORDER)
    assert COMMAND_ORDER == ("plan", "stats", "fit", "eval", "calibrate", "tune", "predict", "export", "report",
                             "compare")
    for line, name in zip(listed, COMMAND_ORDER):
        assert line.split(None, 1)[1] == cli.commands[name].short_help, line  # on one line, not truncated
    assert "..." not in result.output.split("Commands:")[1]
    assert "Per-class metrics of a run on a labelled split." in result.output

    defaults = PredictConfig()
    outs = {}
    for name in ("eval", "predict", "calibrate", "tune", "export"):
        text = " ".join(invoke(name, "--help").output.split())
        assert f" {name} [OPTIONS] RUN" in text, text
        assert "--checkpoint" not in text and "the config's" not in text
        assert "--set KEY=VALUE" in text and "predict.*" in text
        if name in ("eval", "predict"):
            assert f"predict.decision, {defaults.decision} unless set" in text
            assert f"predict.tta, {'on' if defaults.tta else 'off'} unless set" in text
        if name in ("eval", "predict", "export"):
            outs[name] = text.split("--out DIRECTORY ")[1]
    assert outs["eval"].startswith("Report folder for metrics.json") and "(default: RUN/eval_<split>)" in outs["eval"]
    assert outs["predict"].startswith("Mask folder (default: RUN/predictions)")
    assert outs["export"].startswith("A new folder to export into (default: RUN/export/<format>); refused when it "
                                     "exists and is not empty, unless --overwrite.")
    fit_out = " ".join(invoke("fit", "--help").output.split()).split("--out DIRECTORY")[1]
    assert fit_out.startswith(" The run folder to write")


def test_fit_refuses_existing_run_folder_and_leaves_it_untouched(trained):
    base, root, config, run, _ = trained
    before = folder_digest(run)
    result = invoke("fit", config, "--out", run)
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert folder_digest(run) == before


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown_key", "train.epohcs"),
        ("missing_root", "data set folder not found"),
        ("bad_mask_value", "not covered"),
        ("bad_crop", "data.crop"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_run_untouched(trained, tmp_path, case, expected):
    base, root, config, run, _ = trained
    before = folder_digest(run)
    bad_root = make_stripes_dataset(tmp_path / "data", n_train=2, n_val=1)
    overrides = {
        "unknown_key": ["--set", "train.epohcs=3"],
        "missing_root": ["--set", f"data.root={tmp_path / 'nowhere'}"],
        "bad_mask_value": ["--set", f"data.root={bad_root}", "--set", "data.mask={values: {0: 0, 254: 1}}"],
        "bad_crop": ["--set", "data.crop=10"],
    }[case]
    result = invoke("fit", config, "--out", run, "--overwrite", *overrides)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert result.output.count("Error:") == 1
    assert folder_digest(run) == before


def test_stats_json_and_table(trained):
    _, _, config, _, _ = trained
    result = invoke("stats", config, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["classes"] == ["background", "stripe"]
    counts = np.array(stats["counts"], float)
    assert counts.sum() == 8 * 32 * 32
    balanced = np.array(stats["weights"]["balanced"])
    # scaled so that the pixel-frequency-weighted mean weight is 1
    assert float((counts / counts.sum()) @ balanced) == pytest.approx(1.0, rel=1e-6)
    table = invoke("stats", config)
    assert table.exit_code == 0 and "balanced" in table.output


def test_resume_after_completion_continues_to_more_epochs(trained, tmp_path):
    base, root, config, run, _ = trained
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = invoke("fit", config, "--out", copy, "--resume", "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    assert "Resuming" in result.output
    assert len((copy / "history.csv").read_text().splitlines()) == 4


@pytest.mark.skipif(not (SHARED_DATASETS / "membrane").is_dir(), reason="shared data sets not present")
def test_short_membrane_run_maps_membrane_as_minority(tmp_path):
    result = invoke("fit", REPO / "configs" / "membrane.yaml", "--out", tmp_path / "m",
                    "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "data.crop=64",
                    "--set", "model.depth=2", "--set", "model.base_filters=4", "--set", "data.batch_size=2",
                    "--set", "predict.tile_size=256")
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "m" / "class_stats.json").read_text())
    frequency = dict(zip(stats["classes"], stats["frequencies"]))
    assert 0.18 < frequency["membrane"] < 0.26  # about 22% of pixels
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["per_class"]["membrane"]["support"] < metrics["per_class"]["cell"]["support"]


def test_resume_refuses_a_changed_config_but_allows_more_epochs(trained, tmp_path):
    import shutil

    _, _, config, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = folder_digest(copy)
    result = invoke("fit", config, "--out", copy, "--resume", "--set", "data.crop=8")
    assert result.exit_code == 2 and "data.crop" in result.output
    assert f"segtrain fit {copy / 'config.yaml'} --resume --out {copy}" in result.output
    assert folder_digest(copy) == before


def test_eval_defaults_to_the_runs_own_val_split(tmp_path):
    """A run trained with data.val_split: test is evaluated on test/ (there is no val/); --split still wins."""
    root = make_stripes_dataset(tmp_path / "stripes", n_train=3, n_val=2)
    (root / "val").rename(root / "test")
    config = write_config(tmp_path / "tiny.yaml", root, CLI_TINY, data={"val_split": "test", "batch_size": 2},
                          train={"epochs": 1, "steps_per_epoch": 1})
    run = tmp_path / "run"
    result = invoke("fit", config, "--out", run)
    assert result.exit_code == 0, result.output

    assert "Never evaluated with `segtrain eval`" in (run / "report.html").read_text()  # fit's page
    result = invoke("eval", run)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval_test" / "metrics.json").read_text())
    assert metrics["split"] == "test"
    page = (run / "report.html").read_text()  # eval refreshed the run's page: its folder is on it
    assert "Never evaluated" not in page and "eval_test/ (split test)" in page
    assert np.array(metrics["confusion_matrix"]).sum() == 2 * 32 * 32  # the 2 test images, all labelled
    # fit scored best.keras on the same split: the same confusion matrix
    assert metrics["confusion_matrix"] == json.loads((run / "metrics.json").read_text())["confusion_matrix"]

    result = invoke("eval", run, "--split", "train")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval_train" / "metrics.json").read_text())
    assert metrics["split"] == "train" and np.array(metrics["confusion_matrix"]).sum() == 3 * 32 * 32

    result = invoke("eval", run, "--split", "val")
    assert result.exit_code == 2 and "split folder not found" in result.output
    assert "Traceback" not in result.output and result.output.count("Error:") == 1


def test_fit_on_whole_images_of_two_sizes_with_batches_of_two(tmp_path):
    """data.crop: null with images of different sizes, none a multiple of 2**depth, and batch_size 2."""
    from tests.helpers import write_pair

    rng = np.random.default_rng(2)
    sizes = [(20, 12), (9, 26), (17, 17)]
    root = tmp_path / "sizes"
    for i, (h, w) in enumerate(sizes):
        mask = np.zeros((h, w), np.uint8)
        mask[:, w // 3 : w // 3 + 3] = 255
        image = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        for split in ("train", "val"):
            write_pair(root, split, f"img{i}", image, mask)
    config = write_config(tmp_path / "whole.yaml", root, CLI_TINY, data={"crop": None, "batch_size": 2},
                          train={"epochs": 1, "steps_per_epoch": 2})
    result = invoke("fit", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    # validation (batches of 2 padded images) and the final metrics count the real pixels only
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.array(metrics["confusion_matrix"]).sum() == sum(h * w for h, w in sizes)
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "val_loss" in history[0]
