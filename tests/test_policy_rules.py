"""Decision rules: arg-max, least expected cost (= threshold fp / (fp + fn) for two classes)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from segtrain.policy.rules import binary_threshold, decide, decide_tf, probabilities_tf  # noqa: E402
from segtrain.errors import ConfigError  # noqa: E402


def random_probs(k, shape=(3, 4, 5), seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(k), size=shape)


def test_argmax():
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    np.testing.assert_array_equal(decide(probs), [1, 0])


def test_cost_rule_worked_example():
    # p = [0.5, 0.3, 0.2]; C[true][pred] below. Expected cost of predicting j = sum_i p_i C[i][j]:
    # j=0: 0.3*4 + 0.2*1 = 1.4;  j=1: 0.5*1 + 0.2*1 = 0.7;  j=2: 0.5*1 + 0.3*4 = 1.7  => 1.
    costs = [[0, 1, 1], [4, 0, 4], [1, 1, 0]]
    assert decide(np.array([0.5, 0.3, 0.2]), rule="cost", cost_matrix=costs) == 1
    assert decide(np.array([0.5, 0.3, 0.2])) == 0


def test_cost_rule_matches_brute_force():
    probs = random_probs(4)
    costs = np.random.default_rng(1).uniform(0, 5, (4, 4)) * (1 - np.eye(4))
    flat = probs.reshape(-1, 4)
    expected = [
        np.argmin([sum(p[i] * costs[i, j] for i in range(4)) for j in range(4)]) for p in flat
    ]
    np.testing.assert_array_equal(decide(probs, "cost", cost_matrix=costs).ravel(), expected)


def test_identity_costs_give_argmax():
    probs = random_probs(5, seed=2)
    np.testing.assert_array_equal(decide(probs, "cost", cost_matrix=1 - np.eye(5)), decide(probs))


@pytest.mark.parametrize("fp, fn", [(1, 1), (1, 10), (5, 1), (2, 3)])
def test_binary_cost_rule_equals_threshold_fp_over_fp_plus_fn(fp, fn):
    costs = [[0, fp], [fn, 0]]
    t = binary_threshold(costs)
    assert t == pytest.approx(fp / (fp + fn))
    p_fg = np.random.default_rng(fp * 7 + fn).uniform(size=2000)
    p_fg = p_fg[np.abs(p_fg - t) > 1e-9]  # off the boundary: rounding of p @ C vs t (ties below)
    probs = np.stack([1 - p_fg, p_fg], -1)
    by_cost = decide(probs, "cost", cost_matrix=costs)
    np.testing.assert_array_equal(by_cost, decide(probs, "threshold", threshold=t))
    np.testing.assert_array_equal(by_cost, (p_fg >= t).astype(int))
    # One sigmoid channel is read as the foreground probability.
    np.testing.assert_array_equal(decide(p_fg[:, None], "cost", cost_matrix=costs), by_cost)


def test_threshold_rule_is_inclusive():
    probs = np.array([[0.3], [0.2], [0.29]])
    np.testing.assert_array_equal(decide(probs, "threshold", threshold=0.3), [1, 0, 0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rule": "cost"}, "needs a cost matrix"),
        ({"rule": "cost", "cost_matrix": np.zeros((2, 2))}, "expected (3, 3)"),
        ({"rule": "threshold", "threshold": 0.5}, "for two classes"),
        ({"rule": "median"}, "unknown"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decide(random_probs(3), **kwargs)


def test_threshold_needs_a_value():
    with pytest.raises(ConfigError, match="needs a threshold"):
        decide(random_probs(2), rule="threshold")


@pytest.mark.parametrize(
    "k, kwargs",
    [
        (4, {"rule": "argmax"}),
        (4, {"rule": "cost",
             "cost_matrix": [[0, 1, 2, 3], [1, 0, 9, 1], [2, 2, 0, 1], [5, 1, 1, 0]]}),
        (2, {"rule": "threshold", "threshold": 0.3}),
    ],
)
def test_tf_version_agrees(k, kwargs):
    probs = random_probs(k, seed=4).astype(np.float32)
    np.testing.assert_array_equal(decide_tf(probs, **kwargs).numpy(), decide(probs, **kwargs))


@pytest.mark.parametrize("shape", [(1,), (2,)])  # one sigmoid channel, or [1 - p, p]
@pytest.mark.parametrize(
    "kwargs",
    [
        {"rule": "argmax"},
        {"rule": "threshold", "threshold": 0.5},
        {"rule": "cost", "cost_matrix": [[0, 1], [1, 0]]},  # Bayes threshold 1 / (1 + 1) = 0.5
        {"rule": "cost", "cost_matrix": [[0, 3], [1, 0]]},  # threshold 3 / (3 + 1) = 0.75
    ],
)
def test_two_class_ties_go_to_foreground_in_every_rule(shape, kwargs):
    # One rule: a binary pixel is foreground when p_fg >= t (t = 0.5, the threshold, or
    # fp / (fp + fn)). At p_fg = t exactly every rule and both twins say 1; just below, 0.
    t = 0.75 if kwargs.get("cost_matrix") == [[0, 3], [1, 0]] else 0.5
    p_fg = np.array([t, np.nextafter(np.float32(t), np.float32(0)), 0.0, 1.0], np.float32)
    probs = p_fg[:, None] if shape == (1,) else np.stack([1 - p_fg, p_fg], -1)
    expected = [1, 0, 0, 1]
    np.testing.assert_array_equal(decide(probs, **kwargs), expected)
    np.testing.assert_array_equal(decide_tf(probs, **kwargs).numpy(), expected)


def test_probabilities_tf_binary_and_softmax():
    logits = np.array([[0.0], [2.0], [-1.0]], np.float32)
    p = 1 / (1 + np.exp(-logits[:, 0]))  # by hand: 0.5, 0.8808, 0.2689
    np.testing.assert_allclose(probabilities_tf(logits).numpy(), np.stack([1 - p, p], -1), rtol=1e-6)
    multi = np.array([[1.0, 2.0, 3.0]], np.float32)
    e = np.exp(multi - 3.0)
    np.testing.assert_allclose(probabilities_tf(multi).numpy(), e / e.sum(-1, keepdims=True), rtol=1e-6)
    # A logit of exactly 0 is p = 0.5, which the argmax rule calls foreground.
    assert decide(probabilities_tf(np.zeros((1, 1), np.float32)).numpy()) == [1]
