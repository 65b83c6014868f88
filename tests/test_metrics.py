"""Tests for segtrain.metrics: confusion matrices, derived metrics, PR curves, relaxed P/R."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from segtrain.labels import IGNORE_INDEX
from segtrain.metrics import (
    ConfusionMatrix,
    ProbabilityHistogram,
    RelaxedPrecisionRecall,
    best_f1_threshold,
    confusion_matrix_np,
    labels_from_logits,
    least_cost_threshold,
    metrics_from_confusion,
    pr_curve,
    relaxed_precision_recall,
)

NAMES4 = ["background", "road", "building", "water"]


def _random_labels(rng, shape, k, ignore_frac=0.1):
    y_true = rng.integers(0, k, size=shape)
    y_true[rng.random(shape) < ignore_frac] = IGNORE_INDEX
    y_pred = rng.integers(0, k, size=shape)
    return y_true, y_pred


def _loop_confusion(y_true, y_pred, k):
    """Slow, obviously correct reference."""
    cm = np.zeros((k, k), np.int64)
    for t, p in zip(np.ravel(y_true), np.ravel(y_pred)):
        if t != IGNORE_INDEX:
            cm[t, p] += 1
    return cm


# ---------------------------------------------------------------- confusion_matrix_np


def test_confusion_matrix_np_matches_loop_and_skips_ignored():
    rng = np.random.default_rng(0)
    y_true, y_pred = _random_labels(rng, (3, 9, 7), 4, ignore_frac=0.3)
    cm = confusion_matrix_np(y_true, y_pred, 4)
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    np.testing.assert_array_equal(cm, _loop_confusion(y_true, y_pred, 4))
    assert cm.sum() == np.count_nonzero(y_true != IGNORE_INDEX)


def test_confusion_matrix_np_accepts_trailing_channel_and_float_labels():
    y_true = np.array([[[0.0], [1.0]], [[-1.0], [1.0]]])  # (2, 2, 1) floats
    y_pred = np.array([[0, 0], [1, 1]])
    # pixels: (0,0) (1,0) ignored (1,1)
    np.testing.assert_array_equal(confusion_matrix_np(y_true, y_pred, 2), [[1, 0], [1, 1]])


def test_confusion_matrix_np_rejects_out_of_range():
    with pytest.raises(ValueError):
        confusion_matrix_np([0, 2], [0, 1], 2)


# ---------------------------------------------------------------- ConfusionMatrix (Keras)


def test_keras_confusion_matrix_streaming_in_tf_function_equals_numpy():
    rng = np.random.default_rng(1)
    y_true, y_pred = _random_labels(rng, (6, 8, 8), 3)
    metric = ConfusionMatrix(3)

    @tf.function
    def step(t, p):
        metric.update_state(t, p)

    for i in range(0, 6, 2):  # three batches of two
        step(tf.constant(y_true[i:i + 2, ..., None], tf.int32), tf.constant(y_pred[i:i + 2], tf.int32))
    result = metric.result().numpy()
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, confusion_matrix_np(y_true, y_pred, 3))
    metric.reset_state()
    np.testing.assert_array_equal(metric.result().numpy(), np.zeros((3, 3)))


def test_keras_confusion_matrix_counts_stay_exact_above_2_pow_24():
    metric = ConfusionMatrix(2)
    big = np.zeros((2, 2))
    big[1, 1] = 2.0**24
    metric.matrix.assign(big)
    metric.update_state(tf.constant([[1]]), tf.constant([[1]]))
    # float32 would round 2**24 + 1 back to 2**24
    assert int(metric.result().numpy()[1, 1]) == 2**24 + 1  # int(): no float32 comparison


def test_keras_confusion_matrix_rejects_logits():
    with pytest.raises(TypeError, match="labels_from_logits"):
        ConfusionMatrix(2).update_state(tf.constant([[0, 1]]), tf.constant([[0.2, 0.9]]))


def test_keras_confusion_matrix_config_round_trip():
    metric = ConfusionMatrix(5, ignore_index=255, name="cm")
    clone = ConfusionMatrix.from_config(metric.get_config())
    assert (clone.num_classes, clone.ignore_index, clone.name) == (5, 255, "cm")


def test_labels_from_logits_binary_and_multiclass():
    # binary: sigmoid(logit) >= 0.5  <=>  logit >= 0 (0 itself is foreground)
    binary = tf.constant([[[[-0.1], [0.0], [3.0]]]], tf.float16)
    np.testing.assert_array_equal(labels_from_logits(binary).numpy(), [[[0, 1, 1]]])
    multi = tf.constant([[[[0.1, 2.0, -1.0], [5.0, 0.0, 4.9]]]])
    np.testing.assert_array_equal(labels_from_logits(multi).numpy(), [[[1, 0]]])



def test_labels_from_logits_follow_the_decision_rule_of_predict_and_evaluate():
    # Validation labels (labels_from_logits) and predict/evaluate labels (probabilities ->
    # decide / decide_tf) must agree pixel for pixel, ties included: a logit of exactly 0 is
    # p = 0.5 exactly, which is foreground everywhere (decide read [0.5, 0.5] as class 0).
    from segtrain.decision import decide, decide_tf, probabilities_tf

    binary = np.array([0.0, -0.0, 1e-8, -1e-8, -1e-7, -3.0, 3.0], np.float32).reshape(1, 1, 7, 1)
    assert labels_from_logits(binary).numpy()[0, 0, :2].tolist() == [1, 1]
    assert decide(np.array([[0.5]])).tolist() == [1] and decide(np.array([[0.5, 0.5]])).tolist() == [1]
    # Multi-class: logits 1e-9 apart have equal float32 softmax; ties go to the lowest index.
    multi = np.array([[0.0, 1e-9, -5.0], [1.0, 1.0, 0.0], [0.1, 2.0, -1.0], [5.0, 0.0, 4.9]], np.float32)
    multi = multi.reshape(1, 1, 4, 3)
    assert labels_from_logits(multi).numpy().tolist() == [[[0, 0, 1, 0]]]
    for logits in (binary, multi):
        probs = probabilities_tf(logits).numpy()
        got = labels_from_logits(logits).numpy()
        np.testing.assert_array_equal(got, decide(probs))
        np.testing.assert_array_equal(got, decide_tf(probs).numpy())
        np.testing.assert_array_equal(got, tf.function(labels_from_logits)(tf.constant(logits)).numpy())
    # The binary rule by hand: foreground where float32 sigmoid(logit) >= 0.5.
    p = tf.sigmoid(tf.constant(binary[..., 0])).numpy()
    np.testing.assert_array_equal(labels_from_logits(binary).numpy(), (p >= 0.5).astype(int))


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    from segtrain.metrics import ConfusionMatrix, confusion_matrix_np
    rng = np.random.default_rng(7)
    y_true = rng.integers(-1, 3, size=(8, 6, 6)).astype(np.int32)
    y_pred = rng.integers(0, 3, size=(8, 6, 6)).astype(np.int32)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        metric = ConfusionMatrix(3)
    ds = tf.data.Dataset.from_tensor_slices((y_true, y_pred)).batch(4)
    dist = strategy.experimental_distribute_dataset(ds)

    @tf.function
    def step(t, p):
        strategy.run(metric.update_state, args=(t, p))

    for t, p in dist:
        step(t, p)
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "got": metric.result().numpy().tolist(),
        "want": confusion_matrix_np(y_true, y_pred, 3).tolist(),
    }))
    """
)


def test_keras_confusion_matrix_under_mirrored_strategy_two_cpus():
    # Logical devices must be set before TF initialises: run in a fresh interpreter.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", DISTRIBUTED_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=120, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    # An ON_READ/SUM state read in cross-replica context sums both replicas' counts.
    assert out["got"] == out["want"]
    assert sum(map(sum, out["want"])) > 0


# ---------------------------------------------------------------- metrics_from_confusion


def test_metrics_worked_example_with_ignored_and_absent_classes():
    y_true = np.array([0, 0, 0, 0, 0, 1, 1, 1, -1, -1])
    y_pred = np.array([0, 0, 0, 1, 3, 1, 1, 0, 2, 3])  # the two ignored pixels must not count
    cm = confusion_matrix_np(y_true, y_pred, 4)
    # rows true, cols pred:
    #   true 0: 3 -> 0, 1 -> 1, 1 -> 3       [3, 1, 0, 1]
    #   true 1: 1 -> 0, 2 -> 1               [1, 2, 0, 0]
    #   true 2, 3: nothing                    zeros
    np.testing.assert_array_equal(cm, [[3, 1, 0, 1], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    cost = np.zeros((4, 4))
    cost[0, 1], cost[1, 0], cost[0, 3] = 1.0, 5.0, 3.0
    m = metrics_from_confusion(cm, NAMES4, cost_matrix=cost)
    bg, road, building, water = (m["per_class"][n] for n in NAMES4)
    # background: tp 3, fp 1 (road pixel called bg), fn 2 -> IoU 3/6, Dice 6/9, P 3/4, R 3/5
    assert bg == pytest.approx({"iou": 0.5, "dice": 6 / 9, "precision": 0.75, "recall": 0.6,
                                "support": 5, "present": True})
    # road: tp 2, fp 1, fn 1 -> IoU 2/4, Dice 4/6, P 2/3, R 2/3
    assert road == pytest.approx({"iou": 0.5, "dice": 4 / 6, "precision": 2 / 3, "recall": 2 / 3,
                                  "support": 3, "present": True})
    # building: in neither truth nor prediction -> absent, nothing defined
    assert building == {"iou": None, "dice": None, "precision": None, "recall": None,
                        "support": 0, "present": False}
    # water: predicted once, never true: tp 0, fp 1, fn 0 -> IoU 0, P 0, recall undefined
    assert water == {"iou": 0.0, "dice": 0.0, "precision": 0.0, "recall": None,
                     "support": 0, "present": True}
    assert m["mean_iou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)  # building excluded
    assert m["pixel_accuracy"] == pytest.approx(5 / 8)
    assert m["frequency_weighted_iou"] == pytest.approx(5 / 8 * 0.5 + 3 / 8 * 0.5)
    # cost: one bg->road (1) + one road->bg (5) + one bg->water (3) = 9 over 8 pixels
    assert m["expected_cost"] == pytest.approx(9 / 8)
    assert m["num_pixels"] == 8 and m["classes"] == NAMES4
    assert m["confusion_matrix"] == cm.tolist()
    json.dumps(m, allow_nan=False)  # JSON-ready: plain Python types, no NaN


def test_metrics_against_numpy_on_random_labels():
    rng = np.random.default_rng(3)
    k = 5
    y_true, y_pred = _random_labels(rng, (4, 16, 16), k)
    y_true[y_true == 4] = 0  # class 4 never true ...
    y_pred[y_pred == 4] = 1  # ... nor predicted: absent
    y_pred[y_pred == 3] = 2  # class 3 true but never predicted: precision undefined
    cm = confusion_matrix_np(y_true, y_pred, k)
    cost = rng.random((k, k))
    np.fill_diagonal(cost, 0)
    names = [f"c{i}" for i in range(k)]
    m = metrics_from_confusion(cm.astype(np.float64), names, cost_matrix=cost)

    valid = y_true != IGNORE_INDEX
    t, p = y_true[valid], y_pred[valid]
    ious = []
    for c, name in enumerate(names):
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        got = m["per_class"][name]
        assert got["support"] == np.sum(t == c)
        if c == 4:
            assert not got["present"] and got["iou"] is None and got["dice"] is None
            continue
        assert got["iou"] == pytest.approx(tp / (tp + fp + fn))
        assert got["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert got["recall"] == pytest.approx(tp / (tp + fn))
        if c == 3:
            assert got["precision"] is None
        else:
            assert got["precision"] == pytest.approx(tp / (tp + fp))
        ious.append((np.sum(t == c) / t.size, tp / (tp + fp + fn)))
    assert m["mean_iou"] == pytest.approx(np.mean([i for _, i in ious]))
    assert m["frequency_weighted_iou"] == pytest.approx(sum(f * i for f, i in ious))
    assert m["pixel_accuracy"] == pytest.approx(np.mean(t == p))
    assert m["expected_cost"] == pytest.approx(np.mean(cost[t, p]))


def test_metrics_empty_matrix_and_shape_errors():
    m = metrics_from_confusion(np.zeros((2, 2)), ["a", "b"])
    assert m["mean_iou"] is None and m["pixel_accuracy"] is None and m["frequency_weighted_iou"] is None
    assert "expected_cost" not in m
    with pytest.raises(ValueError):
        metrics_from_confusion(np.zeros((2, 2)), ["a", "b", "c"])
    with pytest.raises(ValueError):
        metrics_from_confusion(np.zeros((2, 2)), ["a", "b"], cost_matrix=np.zeros((3, 3)))


def test_accuracy_hides_background_only_model_but_iou_does_not():
    # 59 background pixels, 1 foreground; the model predicts background everywhere.
    y_true = np.array([0] * 59 + [1])
    m = metrics_from_confusion(confusion_matrix_np(y_true, np.zeros(60, int), 2), ["bg", "fg"])
    assert m["pixel_accuracy"] == pytest.approx(59 / 60)
    assert m["per_class"]["fg"]["iou"] == 0.0 and m["per_class"]["fg"]["recall"] == 0.0
    assert m["per_class"]["fg"]["precision"] is None  # nothing predicted as fg
    assert m["mean_iou"] == pytest.approx((59 / 60 + 0.0) / 2)


# ---------------------------------------------------------------- PR curve


def _exact_curve(p, y, thresholds):
    keep = y != IGNORE_INDEX
    p, y = p[keep].astype(np.float64), y[keep]
    tp = np.array([np.sum((p >= t) & (y == 1)) for t in thresholds])
    fp = np.array([np.sum((p >= t) & (y == 0)) for t in thresholds])
    fn = np.sum(y == 1) - tp
    return tp, fp, fn


@pytest.mark.parametrize("num_bins", [10, 49, 1000])
def test_pr_curve_exact_at_bin_edges(num_bins):
    rng = np.random.default_rng(num_bins)
    n = 5000
    p = rng.random(n)
    edges = np.arange(num_bins + 1) / num_bins
    on_edge = rng.random(n) < 0.3  # many probabilities exactly on a threshold (incl. 0 and 1)
    p[on_edge] = edges[rng.integers(0, num_bins + 1, size=on_edge.sum())]
    below = rng.random(n) < 0.2  # and just below one, where floor(p * n) can round up
    p[below] = np.nextafter(edges[rng.integers(1, num_bins + 1, size=below.sum())], 0.0)
    y = (rng.random(n) < p).astype(np.int64)  # informative but noisy
    y[rng.random(n) < 0.1] = IGNORE_INDEX

    hist = ProbabilityHistogram(num_bins)
    for i in range(0, n, 1234):  # streamed in uneven batches
        hist.update(p[i:i + 1234], y[i:i + 1234])
    curve = pr_curve(hist)
    np.testing.assert_array_equal(curve["thresholds"], edges)
    tp, fp, fn = _exact_curve(p, y, edges)
    np.testing.assert_array_equal(curve["tp"], tp)
    np.testing.assert_array_equal(curve["fp"], fp)
    np.testing.assert_array_equal(curve["fn"], fn)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(curve["precision"], np.where(tp + fp > 0, tp / (tp + fp), np.nan))
    np.testing.assert_allclose(curve["recall"], tp / np.sum(y == 1))
    np.testing.assert_allclose(curve["f1"], 2 * tp / (2 * tp + fp + fn))
    assert hist.positives.size == num_bins + 1  # memory independent of the pixel count

    # best F1 and least cost equal the exact optimum over the thresholds
    t_f1, f1 = best_f1_threshold(hist)
    exact_f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 == pytest.approx(exact_f1.max())
    assert exact_f1[list(edges).index(t_f1)] == pytest.approx(exact_f1.max())
    t_cost, cost = least_cost_threshold(hist, fp_cost=3.0, fn_cost=1.0)
    exact_cost = 3.0 * fp + 1.0 * fn
    assert cost == exact_cost.min()
    assert exact_cost[list(edges).index(t_cost)] == exact_cost.min()


def test_least_cost_threshold_moves_with_costs_and_breaks_ties_at_bayes_threshold():
    hist = ProbabilityHistogram(100)
    # negatives at 0.05, positives at 0.95: every threshold in (0.05, 0.95] costs 0
    hist.update(np.array([0.05] * 10 + [0.95] * 10), np.array([0] * 10 + [1] * 10))
    assert least_cost_threshold(hist, 1.0, 1.0) == (0.5, 0.0)
    assert least_cost_threshold(hist, 3.0, 1.0) == (0.75, 0.0)  # fp / (fp + fn)
    # overlap: a positive at 0.3 and a negative at 0.7
    #   t in (0.05, 0.3]: FP 1, FN 0 -> cost fp;   t in (0.3, 0.7]: fp + fn;   t in (0.7, 0.95]: fn
    hist.update(np.array([0.3, 0.7]), np.array([1, 0]))
    t, cost = least_cost_threshold(hist, 0.1, 1.0)  # cheap false positives: keep the positive
    assert cost == pytest.approx(0.1) and t == pytest.approx(0.09)  # closest to 0.1 / 1.1
    t, cost = least_cost_threshold(hist, 10.0, 1.0)  # dear false positives: drop the negative
    assert cost == pytest.approx(1.0) and t == pytest.approx(0.91)  # closest to 10 / 11


def test_probability_histogram_rejects_logits_and_non_binary_labels():
    hist = ProbabilityHistogram(10)
    with pytest.raises(ValueError, match="logits"):
        hist.update(np.array([1.5]), np.array([1]))
    with pytest.raises(ValueError):
        hist.update(np.array([0.5]), np.array([2]))
    hist.update(np.array([7.0]), np.array([IGNORE_INDEX]))  # ignored pixels are not checked
    assert hist.positives.sum() + hist.negatives.sum() == 0


# ---------------------------------------------------------------- relaxed precision / recall


def test_relaxed_line_shifted_by_one_pixel():
    true = np.zeros((12, 16), bool)
    true[5, 2:13] = True
    pred = np.roll(true, 1, axis=0)  # the same line one row lower
    # rho = 1: every predicted pixel has a true pixel right above it, and vice versa
    assert relaxed_precision_recall(pred, true, 1) == (11, 11, 11, 11)
    # rho = 0: exact matching, no overlap at all
    assert relaxed_precision_recall(pred, true, 0) == (0, 11, 0, 11)


def test_relaxed_distance_is_euclidean():
    true = np.zeros((9, 9), bool)
    pred = np.zeros((9, 9), bool)
    true[4, 4], pred[5, 5] = True, True  # diagonal neighbour: distance sqrt(2)
    assert relaxed_precision_recall(pred, true, 1) == (0, 1, 0, 1)  # chessboard would match
    assert relaxed_precision_recall(pred, true, 1.5) == (1, 1, 1, 1)
    pred[:] = False
    pred[4, 6] = True  # distance 2
    assert relaxed_precision_recall(pred, true, 1.5) == (0, 1, 0, 1)
    assert relaxed_precision_recall(pred, true, 2) == (1, 1, 1, 1)


def test_relaxed_matches_brute_force_and_respects_batch_and_ignore():
    rng = np.random.default_rng(5)
    pred = rng.random((3, 14, 13)) < 0.08
    true = rng.random((3, 14, 13)) < 0.08
    ignore = rng.random((3, 14, 13)) < 0.1
    rho = 2.3
    got = relaxed_precision_recall(pred, true, rho, ignore_mask=ignore)

    def within(a, b):  # pixels of a with a pixel of b in the same image within rho
        count = 0
        for n, y, x in zip(*np.nonzero(a)):
            ys, xs = np.nonzero(b[n])
            count += bool(np.any((ys - y) ** 2 + (xs - x) ** 2 <= rho**2))
        return count

    p, t = pred & ~ignore, true & ~ignore
    assert got == (within(p, t), p.sum(), within(t, p), t.sum())

    acc = RelaxedPrecisionRecall(rho)
    acc.update(pred[:1], true[:1], ignore[:1])
    acc.update(pred[1:], true[1:], ignore[1:])
    assert (acc.tp_pred, acc.n_pred, acc.tp_true, acc.n_true) == got
    r = acc.result()
    assert r["precision"] == pytest.approx(got[0] / got[1]) and r["recall"] == pytest.approx(got[2] / got[3])


def test_relaxed_does_not_match_across_images_in_a_batch():
    pred = np.zeros((2, 4, 4), bool)
    true = np.zeros((2, 4, 4), bool)
    pred[0, 3, 0], true[1, 0, 0] = True, True  # adjacent only if images were stacked
    assert relaxed_precision_recall(pred, true, 1) == (0, 1, 0, 1)


def test_relaxed_accumulator_from_labels():
    y_true = np.array([[0, 1, 1, -1, 0]])
    y_pred = np.array([[0, 0, 1, 1, 1]])
    acc = RelaxedPrecisionRecall(0)
    acc.update_labels(y_true, y_pred)
    # predicted fg at cols 2, 3 (ignored), 4 -> counted 2, correct 1 (col 2)
    # true fg at cols 1, 2 -> recalled 1 (col 2)
    assert acc.result() == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "rho": 0}
    acc.reset()
    assert acc.result()["precision"] is None
