"""Bad input through the CLI: exit code 2, one message naming the culprit and the fix, no traceback, and every
existing run folder byte-for-byte untouched (fit is asked to --overwrite it, so an early deletion would show)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import REPO, folder_digest, invoke, make_stripes_dataset, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    root = make_stripes_dataset(base / "data", n_train=4, n_val=2)
    config = write_config(base / "tiny.yaml", root, train={"epochs": 1, "steps_per_epoch": 1})
    run = base / "run"
    result = invoke("fit", config, "--out", run)
    assert result.exit_code == 0, result.output
    return base, root, config, run, folder_digest(run)


def _data_copy(ctx):
    root = ctx["tmp"] / "data"
    shutil.copytree(ctx["root"], root)
    return root


def _with_data(edit):
    """A case that edits a copy of the data set and points data.root at it."""
    def case(ctx):
        root = _data_copy(ctx)
        edit(root)
        return ["--set", f"data.root={root}"]
    return case


def _truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _rgb_mask(root):
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[:, :8] = [255, 0, 0]
    Image.fromarray(mask).save(root / "train" / "masks" / "img01.png")


def _empty(root):
    for sub in ("images", "masks"):
        for path in (root / "train" / sub).iterdir():
            path.unlink()


def _bad_yaml(ctx):
    path = ctx["tmp"] / "broken.yaml"
    path.write_text("data:\n  root: x\n  classes: [a, b\ntrain: {epochs: 1}\n")
    ctx["config"] = path
    return []


def _three_classes():
    return ["--set", "data.classes=[background, stripe, other]",
            "--set", "data.mask={values: {0: 0, 255: 1, 128: 2}}"]


def _stub_replicas(ctx):
    class TwoReplicas:  # only the batch check runs before the error
        num_replicas_in_sync = 2

    ctx["monkeypatch"].setattr("segtrain.engine.devices.make_strategy", lambda distribute: TwoReplicas())
    return ["--set", "data.batch_size=1"]


def _tf_config(value):
    def case(ctx):
        if value is None:
            ctx["monkeypatch"].delenv("TF_CONFIG", raising=False)
        else:
            ctx["monkeypatch"].setenv("TF_CONFIG", value)
        return ["--set", "train.distribute=multi_worker"]
    return case


def _cpu_env(ctx):
    ctx["monkeypatch"].setenv("SEGTRAIN_CPU_DEVICES", "two")
    return []


FIT_CASES = {
    # case: (extra fit arguments from ctx, expected text in the one message)
    "missing_root": (lambda ctx: ["--set", f"data.root={ctx['tmp'] / 'nowhere'}"], "data set folder not found"),
    "missing_split": (_with_data(lambda r: shutil.rmtree(r / "val")), "split folder not found"),
    "missing_masks_folder": (_with_data(lambda r: shutil.rmtree(r / "train" / "masks")), "masks: folder not found"),
    "empty_folders": (_with_data(_empty), "no images found"),
    "image_without_mask": (_with_data(lambda r: shutil.copy(r / "train/images/img00.png", r / "train/images/x.png")),
                           "x.png: no mask with the same stem"),
    "mask_without_image": (_with_data(lambda r: shutil.copy(r / "train/masks/img00.png", r / "train/masks/y.png")),
                           "y.png: no image with the same stem"),
    "corrupt_first_image": (_with_data(lambda r: (r / "train/images/img00.png").write_bytes(b"not a png" * 50)),
                            "img00.png: cannot read the image"),
    # the header is intact (the class scan reads headers only): caught by the full decode check
    "truncated_image": (_with_data(lambda r: _truncate(r / "train/images/img02.png")), "img02.png: cannot read the image"),
    "truncated_val_image": (_with_data(lambda r: _truncate(r / "val/images/img01.png")), "img01.png: cannot read the image"),
    "non_image_file": (_with_data(lambda r: (r / "train/images/notes.txt").write_text("x")),
                       "notes.txt: not a supported image file"),
    "size_mismatch": (_with_data(lambda r: Image.fromarray(np.zeros((16, 16), np.uint8)).save(r / "train/masks/img03.png")),
                      "Masks must match their images"),
    "unmapped_mask_values": (lambda ctx: ["--set", "data.mask={values: {0: 0, 254: 1}}"], "values 255 are not covered"),
    "rgb_mask_without_palette": (_with_data(_rgb_mask), "Set data.mask.palette"),
    # 32 x 32 = 1024 pixels: over the limit, under the 2x where Pillow itself would refuse
    "image_too_large": (lambda ctx: ["--set", "data.max_image_pixels=1000"], "more than data.max_image_pixels = 1000"),
    "yaml_syntax_error": (_bad_yaml, "YAML syntax error at line"),
    "unknown_key": (lambda ctx: ["--set", "train.epohcs=3"], "train.epohcs: unknown key. Did you mean 'epochs'?"),
    "wrong_type": (lambda ctx: ["--set", "train.epochs=many"], "train.epochs: expected int"),
    "negative_term_weight": (lambda ctx: ["--set", "loss={terms: [{name: cross_entropy, weight: -1}]}"],
                             "loss.terms[0].weight: must be >= 0.0"),
    "negative_class_weight": (lambda ctx: ["--set", "loss={terms: [cross_entropy], class_weights: [1, -1]}"],
                              "loss.class_weights[1]: must be >= 0.0"),
    "negative_cost": (lambda ctx: ["--set", "loss={terms: [{name: cost_sensitive, fn_cost: [1, -2]}]}"],
                      "fn_cost[1]: must be >= 0.0"),
    "cost_matrix_shape": (lambda ctx: ["--set", "loss={terms: [{name: cost_sensitive, cost_matrix: [[0, 1, 1], [1, 0, 1]]}]}"],
                          "cost_matrix: expected a 2 x 2"),
    "cost_matrix_diagonal": (lambda ctx: ["--set", "loss={terms: [{name: cost_sensitive, cost_matrix: [[1, 1], [1, 0]]}]}"],
                             "cost_matrix[0][0]: the diagonal must be 0"),
    "crop_not_divisible": (lambda ctx: ["--set", "data.crop=10"], "data.crop: 10 is not a positive multiple of 4 (2**model.depth, or 32 with model.encoder)"),
    "batch_smaller_than_replicas": (_stub_replicas, "data.batch_size: the global batch of 1 cannot be split evenly over 2 replicas"),
    "unknown_monitor": (lambda ctx: ["--set", "train.monitor=val_miou"], "Did you mean 'val_mean_iou'?"),
    "plateau_factor": (lambda ctx: ["--set", "train.schedule=plateau", "--set", "train.plateau_factor=2"],
                       "train.plateau_factor: must be between 0 and 1"),
    "cpu_devices_env": (_cpu_env, "SEGTRAIN_CPU_DEVICES='two': expected a positive integer"),
    "multi_worker_without_tf_config": (_tf_config(None), "multi_worker needs the cluster in the TF_CONFIG"),
    "multi_worker_bad_tf_config": (_tf_config("{not json"), "TF_CONFIG: not valid JSON"),
    "multi_worker_index_outside_cluster": (
        _tf_config('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 5}}'),
        "TF_CONFIG: task 'worker' index 5 is not in the cluster"),
}


def _assert_one_clean_error(result, expected):
    assert result.exit_code == 2, result.output
    assert expected in result.output, result.output
    assert result.output.count("Error:") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_refuses_bad_input_and_leaves_the_run_untouched(trained, tmp_path, monkeypatch, case):
    _, root, config, run, digest = trained
    ctx = {"tmp": tmp_path, "root": root, "config": config, "monkeypatch": monkeypatch}
    make_args, expected = FIT_CASES[case]
    extra = make_args(ctx)
    result = invoke("fit", ctx["config"], "--out", run, "--overwrite", *extra)
    _assert_one_clean_error(result, expected)
    assert folder_digest(run) == digest
    # and no new run folder either
    result = invoke("fit", ctx["config"], "--out", tmp_path / "new", *extra)
    _assert_one_clean_error(result, expected)
    assert not (tmp_path / "new").exists()


def test_resume_with_other_classes_is_refused(trained, tmp_path):
    _, _, config, run, digest = trained
    result = invoke("fit", config, "--out", run, "--resume", *_three_classes())
    _assert_one_clean_error(result, "differs from the run's own")
    assert "data.classes" in result.output and f"segtrain fit {run / 'config.yaml'} --resume" in result.output
    assert folder_digest(run) == digest
    # without the saved config, the cached class statistics catch it
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "config.yaml").unlink()
    before = folder_digest(copy)
    result = invoke("fit", config, "--out", copy, "--resume", *_three_classes())
    _assert_one_clean_error(result, "the run was trained with classes ['background', 'stripe']")
    assert folder_digest(copy) == before
    # without those either, the checkpoint itself does not match
    (copy / "class_stats.json").unlink()
    before = folder_digest(copy)
    result = invoke("fit", config, "--out", copy, "--resume", *_three_classes())
    _assert_one_clean_error(result, "checkpoint does not match this config's model")
    assert folder_digest(copy) == before


def test_eval_with_other_classes_is_refused(trained, tmp_path):
    run = trained[3]
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["data"]["classes"] = ["background", "stripe", "other"]
    saved["data"]["mask"] = {"values": {0: 0, 255: 1, 128: 2}, "threshold": None, "palette": None, "ignore": []}
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    before = folder_digest(copy)
    result = invoke("eval", copy)
    _assert_one_clean_error(result, "output channel(s) but the config names 3 classes")
    assert folder_digest(copy) == before


def test_an_image_that_breaks_inside_the_pipeline_is_a_clean_error_and_leaves_no_run_folder(trained, tmp_path,
                                                                                            monkeypatch):
    """A file that passed the checks but fails to decode in tf.data (e.g. changed on disk meanwhile)."""
    _, root, config, _, _ = trained
    data = tmp_path / "data"
    shutil.copytree(root, data)
    _truncate(data / "train" / "images" / "img02.png")
    # skip the upfront decode (a blank image stands in, for the pixel sample the scan also takes)
    monkeypatch.setattr("segtrain.data.scan.read_image",
                        lambda path, channels, *args: np.zeros((32, 32, channels), np.uint8))
    result = invoke("fit", config, "--out", tmp_path / "new", "--set", f"data.root={data}")
    _assert_one_clean_error(result, "img02.png: cannot read the image")
    assert not (tmp_path / "new").exists()  # the folder this run had just created is removed


# ---------------------------------------------------------------------------- eval, predict, calibrate, tune, export

RUN_CASES = {
    # case: (arguments, texts expected in the one message); run from a folder holding runs/fake (a run folder with
    # config.yaml and a best.keras that is never read), runs/noconfig (best.keras only), data/ and empty/
    "eval_without_run": (["eval"], ["missing RUN", "segtrain eval RUN", "the newest run under runs/ is runs/fake"]),
    "eval_missing_run": (["eval", "runs/roads"], ["runs/roads: no such folder (looked in {cwd})",
                                                 "Pass a run folder written by `segtrain fit` (it holds best.keras "
                                                 "and config.yaml)"]),
    "eval_missing_model_file": (["eval", "runs/fake/last_epoch.keras"], ["runs/fake/last_epoch.keras: no such file"]),
    "eval_folder_without_model": (["eval", "data"], ["data: no best.keras or last.keras in this folder"]),
    "eval_image_as_run": (["eval", "data/val/images/img00.png"], ["a file, but not a .keras model"]),
    "eval_run_without_config": (["eval", "runs/noconfig"], ["runs/noconfig: no config.yaml beside the model"]),
    "eval_missing_split": (["eval", "runs/fake", "--split", "test"], ["data/test: split folder not found"]),
    "eval_missing_data_root": (["eval", "runs/fake", "--data", "nowhere"], ["nowhere: data set folder not found"]),
    "eval_old_checkpoint_missing": (["eval", "--checkpoint", "runs/nope"], ["runs/nope: no such folder"]),
    "predict_without_run": (["predict", "data/val/images"], ["missing RUN", "segtrain predict RUN data/val/images",
                                                             "the newest run under runs/ is runs/fake"]),
    "predict_without_images": (["predict", "runs/fake"], ["missing IMAGES", "segtrain predict RUN IMAGES..."]),
    "predict_missing_run": (["predict", "runs/roads", "data/val/images"], ["runs/roads: no such folder"]),
    "predict_empty_folder": (["predict", "runs/fake", "empty"], ["empty: no images found"]),
    "predict_missing_image": (["predict", "runs/fake", "nothere.png"], ["nothere.png: no such file or folder"]),
    "predict_into_its_inputs": (["predict", "runs/fake", "data/val/images", "--out", "data/val/images"],
                                ["this folder holds input images"]),
    "calibrate_missing_split": (["calibrate", "runs/fake", "--split", "test"], ["split folder not found"]),
    "calibrate_missing_run": (["calibrate", "runs/roads"], ["runs/roads: no such folder"]),
    "tune_missing_data_root": (["tune", "runs/fake", "--data", "nowhere"], ["nowhere: data set folder not found"]),
    "tune_without_run": (["tune"], ["missing RUN", "the newest run under runs/ is runs/fake"]),
    "export_existing_folder": (["export", "runs/fake", "--out", "data"],
                               ["data: the export folder exists and is not empty", "--overwrite"]),
    "export_missing_run": (["export", "runs/roads"], ["runs/roads: no such folder"]),
    "set_fixed_key": (["predict", "runs/fake", "data/val/images", "--set", "model.depth=3"],
                      ["--set model.depth=3: model.depth is fixed by training", "only predict.* keys"]),
    "set_data_root": (["eval", "runs/fake", "--set", "data.root=elsewhere"], ["pass --data DIR"]),
    "set_fixed_key_tune": (["tune", "runs/fake", "--set", "loss.class_weights=none"], ["is fixed by training"]),
    "set_bad_value": (["calibrate", "runs/fake", "--set", "predict.tta=maybe"],
                      ["predict.tta: expected true or false"]),
    "set_unknown_key": (["export", "runs/fake", "--set", "predict.tile=8"], ["predict.tile: unknown key"]),
    "set_without_value": (["eval", "runs/fake", "--set", "predict.tta"], ["expected KEY=VALUE"]),
}

_RUN_CASES_SCRIPT = """
import json, sys
from click.testing import CliRunner
from segtrain.cli import cli
results = {}
for name, args in json.loads(sys.argv[1]).items():
    result = CliRunner().invoke(cli, args)
    results[name] = [result.exit_code, result.output, "tensorflow" in sys.modules, repr(result.exception)]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def run_case_results(tmp_path_factory):
    """Every RUN_CASES case through the CLI in one fresh interpreter (TensorFlow not imported beforehand), and
    whether anything under its working directory changed."""
    base = tmp_path_factory.mktemp("paths")
    root = make_stripes_dataset(base / "data", n_train=2, n_val=1)
    for name in ("fake", "noconfig"):
        (base / "runs" / name).mkdir(parents=True)
        (base / "runs" / name / "best.keras").write_bytes(b"never read: every case fails before the model loads")
    write_config(base / "runs" / "fake" / "config.yaml", root)
    os.utime(base / "runs" / "noconfig" / "best.keras", (1e9, 1e9))  # runs/fake is the newest run
    (base / "empty").mkdir()
    before = folder_digest(base)
    cases = {name: args for name, (args, _) in RUN_CASES.items()}
    cases["control"] = ["eval", "runs/fake"]  # last: the paths are fine, so TensorFlow loads and the model fails
    out = subprocess.run([sys.executable, "-c", _RUN_CASES_SCRIPT, json.dumps(cases)], capture_output=True,
                         text=True, cwd=base, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return base, json.loads(out.stdout.splitlines()[-1]), folder_digest(base) == before


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_path_and_setting_errors_of_run_commands_come_before_tensorflow(run_case_results, case):
    """Bad paths and --set keys of the commands that read a run: exit 2 with one message saying what was looked for
    and where, before TensorFlow is imported (no 6-8 s wait), and nothing written."""
    base, results, untouched = run_case_results
    exit_code, output, tensorflow_loaded, exception = results[case]
    assert exit_code == 2, (output, exception)
    for text in RUN_CASES[case][1]:
        assert text.format(cwd=base) in output, output
    assert output.count("Error:") == 1 and "Traceback" not in output
    assert not tensorflow_loaded
    assert untouched


def test_the_tensorflow_check_sees_a_command_that_loads_it(run_case_results):
    """The control case of run_case_results: correct paths, so TensorFlow loads and the bad best.keras is refused."""
    _, results, untouched = run_case_results
    exit_code, output, tensorflow_loaded, _ = results["control"]
    assert exit_code == 2 and "runs/fake/best.keras: cannot load the model" in output, output
    assert tensorflow_loaded and untouched
