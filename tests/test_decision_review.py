"""The eight wrong-number bugs an outside review of the decision layer found (issue 19), one test each, every figure
checked against an independent computation: NumPy on the files a command wrote, a worked example, or another
command's own figures. Each failed on the code before `segtrain/policy/` (the bug numbers are the issue's)."""

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import invoke, make_stripes_dataset, write_config

pytestmark = pytest.mark.slow


def _fit(tmp_path_factory, name, **sections):
    base = tmp_path_factory.mktemp(name)
    root = make_stripes_dataset(base / "data", n_train=6, n_val=4)
    train = {"epochs": 3, "steps_per_epoch": 3, **sections.pop("train", {})}
    config = write_config(base / "c.yaml", root, train=train, **sections)
    result = invoke("fit", config, "--out", base / "run")
    assert result.exit_code == 0, result.output
    return base / "run", root


@pytest.fixture(scope="module")
def weighted_run(tmp_path_factory):
    """Class weights 1:10 (stripe up-weighted), predict.prior_correction: weights (tau 1)."""
    return _fit(tmp_path_factory, "weighted", loss={"class_weights": [1.0, 10.0]},
                predict={"prior_correction": "weights"})


@pytest.fixture(scope="module")
def postprocessed_run(tmp_path_factory):
    """Configured post-processing for both classes (the background's too)."""
    return _fit(tmp_path_factory, "postprocessed", predict={"min_size": {"background": 30, "stripe": 12}})


def _edit_config(run, **predict):
    path = run / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["predict"].update(predict)
    path.write_text(yaml.safe_dump(config))


def _f1(truth, labels):
    valid = truth != 255
    t, p = truth[valid] == 1, labels[valid] == 1
    tp = np.sum(t & p)
    return 2 * tp / (2 * tp + np.sum(~t & p) + np.sum(t & ~p))


def _val_truth(root):
    return [(np.asarray(Image.open(p)) > 127).astype(np.int64) for p in sorted((root / "val" / "masks").iterdir())]


def _metrics(run, split="val"):
    return json.loads((run / f"eval_{split}" / "metrics.json").read_text())


def test_1_eval_marks_the_best_threshold_on_the_probability_the_threshold_reads(weighted_run, tmp_path):
    run, root = weighted_run
    assert invoke("eval", run).exit_code == 0
    best = _metrics(run)["thresholds"]["best F1"]
    # independently: the q that --threshold reads, as predict writes it, thresholded by NumPy at every edge
    assert invoke("predict", run, root / "val" / "images", "--out", tmp_path / "q",
                  "--probabilities-format", "npy").exit_code == 0
    q = [np.load(p)[..., 1] for p in sorted((tmp_path / "q").glob("*.npy"))]
    truth = np.concatenate([t.ravel() for t in _val_truth(root)])
    q = np.concatenate([v.ravel() for v in q]).astype(np.float64)
    edges = np.arange(1001) / 1000
    f1s = [_f1(truth, (q >= t).astype(np.int64)) for t in edges]
    assert invoke("eval", run, "--threshold", best).exit_code == 0
    at_mark = _metrics(run)["per_class"]["stripe"]["dice"]
    # the mark is the best edge: eval at it scores the NumPy maximum (float32 q in the npy: pixels within 6e-8 of
    # an edge could flip, so allow one pixel's worth of F1)
    assert at_mark == pytest.approx(max(f1s), abs=2.0 / len(truth))
    assert at_mark == pytest.approx(f1s[int(round(best * 1000))], abs=2.0 / len(truth))


def test_2_tune_scores_exactly_the_rule_eval_applies_and_never_writes_a_worse_point(postprocessed_run, tmp_path):
    source, _ = postprocessed_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    assert invoke("eval", run).exit_code == 0
    untuned = _metrics(run)["per_class"]["stripe"]["dice"]
    result = invoke("tune", run, "--objective", "f1")
    assert result.exit_code == 0, result.output
    record = json.loads((run / "policy.json").read_text())["tuned"] or {}
    policy = json.loads((run / "policy.json").read_text())
    # before: the configured rule with its post-processing, exactly what eval scored
    printed = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()
               if line.strip().startswith("f1 ")}
    before, after = float(printed["f1"][0]), float(printed["f1"][1])
    assert before == pytest.approx(untuned, abs=5e-5)  # printed with 4 decimals
    assert after >= before
    if policy["tuned"] is not None:
        assert invoke("eval", run).exit_code == 0
        assert _metrics(run)["per_class"]["stripe"]["dice"] == pytest.approx(record["after"]["f1"], abs=1e-12)
    else:
        assert after == before


def test_3_a_point_tuned_under_other_settings_is_not_applied(weighted_run, tmp_path):
    source, _ = weighted_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    assert invoke("tune", run, "--objective", "f1", "--no-postprocess").exit_code == 0
    policy = json.loads((run / "policy.json").read_text())
    if policy["tuned"] is None:
        pytest.skip("nothing beat the untuned rule on held-out images for this tiny model")
    assert policy["tuned"]["under"]["prior_correction"] == "weights"
    _edit_config(run, prior_correction="none")
    changed = invoke("eval", run)
    assert "prior_correction 'weights' -> 'none'" in changed.output
    with_change = _metrics(run)
    _edit_config(run, tuned=False)
    assert invoke("eval", run).exit_code == 0
    untuned = _metrics(run)
    assert with_change["confusion_matrix"] == untuned["confusion_matrix"]
    assert with_change["decision"]["rule"] == "argmax"


def test_4_a_zero_class_weight_gives_finite_corrected_probabilities():
    from segtrain.policy.prior import prior_adjust

    p = np.array([[0.2, 0.5, 0.3], [0.0, 0.4, 0.6]])
    q = prior_adjust(p, [0.0, 1.0, 2.0], tau=1.0)
    # worked: scales [1 (weight 0: no tilt to undo), 1, 0.5] -> [0.2, 0.5, 0.15] / 0.85 and [0, 0.4, 0.3] / 0.7
    np.testing.assert_allclose(q, [[0.2 / 0.85, 0.5 / 0.85, 0.15 / 0.85], [0.0, 0.4 / 0.7, 0.3 / 0.7]], rtol=1e-12)


def test_5_the_equivalent_cut_follows_the_rule_not_argmax():
    from segtrain.policy.policy import DecisionPolicy

    policy = DecisionPolicy(["background", "road"], class_weights=[0.5, 6.0], tau=1.0, rule="threshold",
                            threshold=0.3)
    # worked (issue): q_fg >= 0.3 <=> p >= 0.3 * 6 / (0.3 * 6 + 0.7 * 0.5) = 1.8 / 2.15
    assert policy.foreground_cut() == pytest.approx(1.8 / 2.15, rel=1e-12)
    logits = np.random.default_rng(0).normal(0, 3, (64, 64, 1))
    p = 1 / (1 + np.exp(-logits[..., 0]))
    _, labels = policy.apply(logits)
    clear = np.abs(p - 1.8 / 2.15) > 1e-9
    np.testing.assert_array_equal(labels[clear], (p >= 1.8 / 2.15)[clear])


def test_6_prior_correction_divides_only_by_weights_the_model_trained_with(tmp_path_factory):
    run, _ = _fit(tmp_path_factory, "unweighted",
                  loss={"terms": [{"name": "cross_entropy", "use_class_weights": False}], "class_weights": [1.0, 10.0]},
                  predict={"prior_correction": "weights"})
    assert json.loads((run / "policy.json").read_text())["class_weights"] is None
    weighted = json.loads((run / "metrics.json").read_text())
    _edit_config(run, prior_correction="none")
    assert invoke("eval", run).exit_code == 0
    assert _metrics(run)["confusion_matrix"] == weighted["confusion_matrix"]


def test_7_and_8_an_export_applies_the_post_processing_and_takes_tiny_images(postprocessed_run, tmp_path):
    import segtrain

    run, root = postprocessed_run
    assert invoke("export", run, "--out", tmp_path / "export").exit_code == 0
    exported, local = segtrain.load(tmp_path / "export"), segtrain.load(run)
    image = np.asarray(Image.open(sorted((root / "val" / "images").iterdir())[0]))
    np.testing.assert_array_equal(exported.predict(image).labels, local.predict(image).labels)
    raw = exported._serve(images=__import__("tensorflow").constant(image[None]))["labels"].numpy()[0]
    from segtrain.policy.postprocess import postprocess, second_choice

    scores = exported.predict(image).probabilities
    expected = postprocess(raw.astype(np.int64), second_choice(scores, raw), {0: (30, 0), 1: (12, 0)})
    np.testing.assert_array_equal(exported.predict(image).labels, expected)
    for height, width in [(1, 1), (3, 5), (8, 2)]:  # sides <= 2**depth / 2 (depth 2: 2) and the 1-px side
        tiny = image[:height, :width]
        got = exported.predict(tiny).labels
        assert got.shape == (height, width)
        np.testing.assert_array_equal(got, local.predict(tiny).labels)


def test_tune_shows_a_stale_calibration_warning(postprocessed_run, tmp_path):
    import keras

    source, _ = postprocessed_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    model = keras.models.load_model(run / "best.keras", compile=False)
    weights = model.get_weights()
    weights[0] = weights[0] + 1e-3  # another model file: policy.json's sha256 no longer matches it
    model.set_weights(weights)
    model.save(run / "best.keras")
    result = invoke("tune", run, "--no-postprocess")
    assert result.exit_code == 0, result.output
    assert "belongs to another model file" in result.output


def test_uint16_arrays_of_a_12_bit_run_are_scaled_by_its_own_range(postprocessed_run, tmp_path):
    import segtrain

    source, _ = postprocessed_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "input_sample_type": "uint12"}))  # as a 12-bit TIFF run records
    values = np.random.default_rng(0).integers(0, 4096, (32, 32, 3)).astype(np.uint16)
    model = segtrain.load(run)
    # the file rule for 12-bit samples is v * 255 / 4095; a float array in [0, 1] is read as x * 255
    expected = model.predict(values.astype(np.float64) / 4095).probabilities
    np.testing.assert_allclose(model.predict(values).probabilities, expected, atol=1e-6)
    eight_bit = segtrain.load(source).predict(values).probabilities  # a uint8 run: uint16 by 65535, as files are
    np.testing.assert_allclose(eight_bit, model.predict(values.astype(np.float64) / 65535).probabilities, atol=1e-6)
