"""Decision rules: arg-max, least expected cost (= threshold fp / (fp + fn) for two classes), threshold; the cost
matrices they read; and the rule inside the decision policy, which decides on q and so amounts to a cut on p."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from segtrain.decision import binary_threshold, decide, decide_tf, probabilities_tf  # noqa: E402
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


# ---------------------------------------------------------------------------- cost matrices


def test_shorthand_costs_are_the_outer_product_off_the_diagonal_and_free_misses_zero_rows():
    from segtrain.decision import cost_matrix_from, shorthand_cost_matrix

    fp, fn = [1.0, 2.0, 5.0], [3.0, 1.0, 0.5]
    expected = [[0 if t == p else fn[t] * fp[p] for p in range(3)] for t in range(3)]  # C[true][pred]
    np.testing.assert_array_equal(shorthand_cost_matrix(fp, fn), expected)
    np.testing.assert_array_equal(shorthand_cost_matrix(num_classes=3), 1 - np.eye(3))  # no costs: 1 - I
    np.testing.assert_array_equal(shorthand_cost_matrix(None, fn), [[0 if t == p else fn[t] for p in range(3)]
                                                                    for t in range(3)])
    free = cost_matrix_from(3, fp_cost=fp, fn_cost=fn, free_misses=[1])
    np.testing.assert_array_equal(free, np.array(expected) * [[1], [0], [1]])  # missing class 1 costs nothing
    given = [[0, 1, 2], [3, 0, 4], [5, 6, 0]]
    np.testing.assert_array_equal(cost_matrix_from(3, given, fp, fn), given)  # a full matrix wins over the shorthand


def test_binary_threshold_refuses_what_gives_no_threshold():
    with pytest.raises(ConfigError, match="2 x 2"):
        binary_threshold(np.zeros((3, 3)))
    with pytest.raises(ConfigError, match="all zeros"):
        binary_threshold([[0, 0], [0, 0]])


# ---------------------------------------------------------------------------- the rule inside the policy


def test_probabilities_tf_is_the_twin_of_the_numpy_probabilities():
    from segtrain.policy.temperature import apply_temperature

    rng = np.random.default_rng(5)
    for channels in (1, 4):
        logits = rng.normal(0.0, 3.0, (6, 7, channels)).astype(np.float32)
        # float32 exp and a sum of at most 4 terms: a few 2**-24 relative
        np.testing.assert_allclose(probabilities_tf(logits).numpy(), apply_temperature(logits), rtol=0, atol=1e-6)


def hand_scale(weights, tau, bias):
    """s_c = w_c**-tau exp(b_c), 1 for a weight of 0 (no tilt to undo)."""
    return np.array([(w ** -tau if w > 0 else 1.0) * np.exp(b) for w, b in zip(weights, bias)])


@pytest.mark.parametrize("rule, extra, cut_on_q", [
    ("argmax", {}, 0.5),
    ("threshold", {"threshold": 0.3}, 0.3),
    ("cost", {"cost_matrix": np.array([[0.0, 2.0], [5.0, 0.0]])}, 2.0 / 7.0),
])
@pytest.mark.parametrize("weights, tau, bias", [([0.6, 3.0], 1.0, [0.0, 0.0]), ([0.6, 3.0], 0.4, [0.2, -0.5]),
                                                ([1.0, 0.0], 1.0, [0.0, 0.3])])
def test_the_rule_reads_q_and_amounts_to_a_cut_on_p(rule, extra, cut_on_q, weights, tau, bias):
    """Two classes: the rule decides on q (prior-corrected p), which is the same as p_fg >= t s0 / (t s0 + (1-t) s1)
    (t: the rule's cut on q, s: the correction's factors, written out here)."""
    from segtrain.policy.policy import DecisionPolicy

    policy = DecisionPolicy(["bg", "fg"], class_weights=weights, tau=tau, bias=bias, rule=rule, **extra)
    s0, s1 = hand_scale(weights, tau, bias)
    cut = cut_on_q * s0 / (cut_on_q * s0 + (1 - cut_on_q) * s1)
    assert policy.foreground_cut() == pytest.approx(cut, rel=1e-12)
    p_fg = np.random.default_rng(9).random(5000)
    p_fg = p_fg[np.abs(p_fg - cut) > 1e-9]  # exact ties are a matter of rounding
    p = np.stack([1 - p_fg, p_fg], -1)
    q = policy.scores(p)
    np.testing.assert_allclose(q[:, 1], s1 * p_fg / (s0 * (1 - p_fg) + s1 * p_fg), rtol=1e-12)
    labels = policy.decide(q)
    np.testing.assert_array_equal(labels, (p_fg >= cut).astype(int))
    np.testing.assert_array_equal(labels, decide(q, rule, extra.get("threshold"), extra.get("cost_matrix")))
    if cut != pytest.approx(cut_on_q):  # the correction moves the cut: deciding on p would be wrong here
        assert not np.array_equal(labels, decide(p, rule, extra.get("threshold"), extra.get("cost_matrix")))


def test_the_policy_applies_temperature_correction_and_rule_in_that_order():
    """Three classes, per-class temperatures, weights, tau and biases: apply(z) = rule(q(softmax(z / T))), each step
    written out here."""
    from segtrain.policy.policy import DecisionPolicy

    temperature, weights, tau, bias = [0.5, 1.0, 2.0], [0.5, 2.0, 0.0], 0.8, [0.1, 0.0, -0.4]
    costs = np.array([[0, 1, 3], [2, 0, 1], [1, 1, 0]], float)
    logits = np.random.default_rng(3).normal(0.0, 2.0, (9, 11, 3))
    s = logits / temperature
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = p * hand_scale(weights, tau, bias)
    q /= q.sum(-1, keepdims=True)
    for rule, expected in (("argmax", np.argmax(q, -1)), ("cost", np.argmin(q @ costs, -1))):
        policy = DecisionPolicy(["a", "b", "c"], temperature=temperature, class_weights=weights, tau=tau, bias=bias,
                                rule=rule, cost_matrix=costs)
        scores, labels = policy.apply(logits)
        np.testing.assert_allclose(scores, q, rtol=1e-12)
        np.testing.assert_array_equal(labels, expected)
    assert DecisionPolicy(["a", "b", "c"]).foreground_cut() is None  # a cut on p exists for two classes only
