"""Class weights: streaming counts, strategies against NumPy, scaling invariant, cap, stats."""

import json
import warnings

import numpy as np
import pytest

from segtrain.class_weights import (
    STRATEGIES,
    ClassCounter,
    class_stats_dict,
    compute_class_weights,
    format_stats_table,
    scale_weights,
)
from segtrain.errors import ConfigError, DataError
from segtrain.labels import IGNORE_INDEX


def masks(seed=0, n=6, k=4, shape=(5, 7)):
    """Random masks with skewed class frequencies and some ignored pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        probs = rng.dirichlet(np.ones(k) * 0.5)
        m = rng.choice(k, size=shape, p=probs)
        m[rng.random(shape) < 0.1] = IGNORE_INDEX
        out.append(m)
    out[0][0, :k] = np.arange(k)  # every class present somewhere
    return out


def numpy_weights(strategy, ms, k):
    """Independent reference, straight from the definitions, then scaled to sum p w = 1."""
    flat = np.concatenate([m.ravel() for m in ms])
    flat = flat[flat >= 0]
    counts = np.array([(flat == c).sum() for c in range(k)], float)
    p = counts / counts.sum()
    if strategy == "none":
        w = np.ones(k)
    elif strategy == "balanced":
        w = counts.sum() / (k * counts)
    elif strategy == "inverse_frequency":
        w = 1 / p
    elif strategy == "inverse_sqrt_frequency":
        w = 1 / np.sqrt(p)
    elif strategy == "log":
        w = 1 / np.log(1.02 + p)
    elif strategy == "median_frequency":
        freq = []
        for c in range(k):
            holders = [m for m in ms if (m == c).any()]
            freq.append(counts[c] / sum((m >= 0).sum() for m in holders))
        w = np.median(freq) / np.array(freq)
    return w / np.sum(p * w), p


def counter_of(ms, k):
    counter = ClassCounter(k)
    for m in ms:
        counter.update(m)
    return counter


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_match_numpy_and_keep_the_loss_scale(strategy):
    ms = masks()
    counter = counter_of(ms, 4)
    ours = compute_class_weights(strategy, counter)
    ref, p = numpy_weights(strategy, ms, 4)
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    assert np.sum(p * ours) == pytest.approx(1.0)


def test_rare_class_gets_the_larger_weight():
    ms = masks(seed=3)
    counter = counter_of(ms, 4)
    rarest, commonest = np.argmin(counter.counts), np.argmax(counter.counts)
    for strategy in STRATEGIES[1:]:
        w = compute_class_weights(strategy, counter)
        assert w[rarest] > w[commonest], strategy


def test_balanced_worked_example():
    # 59 background pixels, 1 foreground: n / (k * count) = 60/118 = 0.5085, 60/2 = 30.
    # sum p w = 59/60 * 60/118 + 1/60 * 30 = 0.5 + 0.5 = 1 already.
    w = compute_class_weights("balanced", np.array([59, 1]))
    np.testing.assert_allclose(w, [60 / 118, 30.0])


def test_median_frequency_hand_worked():
    # Image A (4 px): class 0 x3, class 1 x1.  Image B (4 px): class 0 x2, class 2 x2.
    # Image C (4 px): class 0 x4.
    # freq_0 = 9 / 12 = 0.75 (in A, B, C); freq_1 = 1 / 4 = 0.25 (A); freq_2 = 2 / 4 = 0.5 (B).
    # median = 0.5 => raw w = [0.6667, 2, 1]; p = [9/12, 1/12, 2/12]
    # sum p w = 0.5 + 0.1667 + 0.1667 = 0.8333 => scaled [0.8, 2.4, 1.2].
    counter = ClassCounter(3)
    counter.update(np.array([[0, 0], [0, 1]]))
    counter.update(np.array([[0, 2], [2, 0]]))
    counter.update(np.zeros((2, 2), int))
    np.testing.assert_array_equal(counter.image_pixels, [12, 4, 4])
    np.testing.assert_allclose(compute_class_weights("median_frequency", counter), [0.8, 2.4, 1.2])


def test_streaming_equals_all_at_once():
    ms = masks(seed=5)
    one_by_one = counter_of(ms, 4)
    batched = ClassCounter(4).update_batch(np.stack(ms))
    halves = counter_of(ms[:3], 4).merge(counter_of(ms[3:], 4))
    flat = np.concatenate([m.ravel() for m in ms])
    expected = np.bincount(flat[flat >= 0], minlength=4)
    for counter in (one_by_one, batched, halves):
        np.testing.assert_array_equal(counter.counts, expected)
        np.testing.assert_array_equal(counter.image_pixels, one_by_one.image_pixels)
        assert counter.num_images == len(ms)


def test_ignored_pixels_are_not_counted_and_bad_values_are_rejected():
    counter = ClassCounter(2).update(np.array([[IGNORE_INDEX, 1], [0, 0]]))
    np.testing.assert_array_equal(counter.counts, [2, 1])
    np.testing.assert_array_equal(counter.image_pixels, [3, 3])
    with pytest.raises(DataError, match="class 2"):
        ClassCounter(2).update(np.array([0, 2]))


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_absent_class_warns_and_gets_weight_one(strategy):
    counter = ClassCounter(3).update(np.array([[0, 0, 0, 1]]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = compute_class_weights(strategy, counter, class_names=["bg", "road", "car"])
    assert any("'car' has no pixels" in str(c.message) for c in caught)
    assert w[2] == 1.0 and np.all(np.isfinite(w))
    assert np.sum(counter.frequencies * w) == pytest.approx(1.0)


@pytest.mark.parametrize("strategy", ["balanced", "inverse_frequency", "median_frequency"])
@pytest.mark.parametrize("cap", [1.0, 1.5, 3.0, 10.0])
def test_cap_keeps_the_invariant_and_the_cap(strategy, cap):
    counter = counter_of(masks(seed=7), 4)
    w = compute_class_weights(strategy, counter, max_weight=cap)
    assert np.max(w) <= cap + 1e-12
    assert np.sum(counter.frequencies * w) == pytest.approx(1.0)
    free = compute_class_weights(strategy, counter)
    order = np.argsort(free)
    assert np.all(np.diff(w[order]) >= -1e-12)  # the cap keeps the order of the weights


def test_cap_worked_example():
    # p = [0.9, 0.09, 0.01], raw [1, 10, 100] (scaled: /2.8). Cap 5: the rare class is set to
    # 5 (mass 0.05); the others share 0.95: s * (0.9 * 1 + 0.09 * 10) = 0.95 => s = 0.5278,
    # weights [0.5278, 5.278, 5] -> 5.278 > 5, so cap it too: 0.9 * s = 1 - 5 * 0.1 = 0.5,
    # s = 0.5556 => [0.5556, 5, 5].
    w = scale_weights([1.0, 10.0, 100.0], [0.9, 0.09, 0.01], max_weight=5.0)
    np.testing.assert_allclose(w, [0.5 / 0.9, 5.0, 5.0])


def test_cap_below_one_is_rejected():
    with pytest.raises(ConfigError, match="max_weight"):
        compute_class_weights("balanced", np.array([10, 1]), max_weight=0.5)


def test_explicit_weights_are_scaled_relative_weights():
    # [1, 59] on p = [59/60, 1/60]: sum p w = 118/60 => [60/118, 59 * 60/118].
    w = compute_class_weights([1, 59], np.array([59, 1]))
    np.testing.assert_allclose(w, [60 / 118, 59 * 60 / 118])


def test_explicit_weights_of_an_absent_class_are_scaled_by_the_same_factor():
    # Issue 9 worked example: [1, 10, 5] on counts [900, 100, 0], p = [0.9, 0.1, 0].
    # sum p w = 0.9 * 1 + 0.1 * 10 = 1.9, so every weight is divided by 1.9:
    # [1/1.9, 10/1.9, 5/1.9] = [0.5263, 5.2632, 2.6316]. The absent class keeps its ratio
    # to the others (5 : 1 to class 0), it is not left at its raw 5 (ratio 9.5 : 1).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = compute_class_weights([1, 10, 5], np.array([900, 100, 0]), class_names=["bg", "road", "car"])
    np.testing.assert_allclose(w, [1 / 1.9, 10 / 1.9, 5 / 1.9])
    assert w[2] / w[0] == pytest.approx(5.0) and w[1] / w[0] == pytest.approx(10.0)
    assert 0.9 * w[0] + 0.1 * w[1] == pytest.approx(1.0)
    assert any("'car' has no pixels" in str(c.message) and "2.63158" in str(c.message) for c in caught)


def test_explicit_weights_of_an_absent_class_with_a_cap():
    # Same example, cap 3. Scaled [0.526, 5.263, 2.632]: 5.263 > 3, so class 1 is set to 3
    # (mass 0.1 * 3 = 0.3); the uncapped classes 0 and 2 share the factor s with
    # 0.9 * 1 * s = 1 - 0.3 => s = 0.7 / 0.9 = 0.7778: [0.7778, 3, 5 * 0.7778 = 3.889];
    # 3.889 > 3, so class 2 is capped too (p = 0: nothing else moves) => [0.7778, 3, 3].
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = compute_class_weights([1, 10, 5], np.array([900, 100, 0]), max_weight=3.0)
    np.testing.assert_allclose(w, [0.7 / 0.9, 3.0, 3.0])
    # A cap the absent class stays under: it keeps the uncapped classes' factor.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = compute_class_weights([1, 10, 2], np.array([900, 100, 0]), max_weight=3.0)
    np.testing.assert_allclose(w, [0.7 / 0.9, 3.0, 2 * 0.7 / 0.9])
    stats = class_stats_dict(ClassCounter(3).update(np.array([0] * 9 + [1])), ["a", "b", "c"], [1, 10, 5])
    np.testing.assert_allclose(stats["class_weights"], [1 / 1.9, 10 / 1.9, 5 / 1.9])


def test_stats_dict_shape_and_json():
    counter = counter_of(masks(seed=9), 4)
    names = ["bg", "road", "car", "sign"]
    stats = class_stats_dict(counter, names, "median_frequency", max_weight=None)
    json.dumps(stats)
    assert stats["classes"] == names
    assert stats["counts"] == counter.counts.tolist()
    np.testing.assert_allclose(stats["frequencies"], counter.frequencies)
    assert list(stats["weights"]) == list(STRATEGIES)
    np.testing.assert_allclose(stats["weights"]["balanced"], compute_class_weights("balanced", counter))
    np.testing.assert_allclose(stats["class_weights"], stats["weights"]["median_frequency"])
    assert stats["raw_weights"] != stats["class_weights"]
    table = format_stats_table(stats)
    lines = table.splitlines()
    assert "median_frequency*" in lines[0] and all(n in table for n in names)
    assert len({len(line) for line in lines[:6]}) == 1  # header, rule and rows aligned


def test_stats_dict_reports_absent_classes():
    counter = ClassCounter(3).update(np.array([0, 0, 1]))
    stats = class_stats_dict(counter, ["bg", "road", "car"], "balanced")
    assert len(stats["warnings"]) == 1 and "'car'" in stats["warnings"][0]
    assert stats["raw_weights"][2] is None and stats["class_weights"][2] == 1.0
