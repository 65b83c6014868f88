"""The `loss` config section: normalisation, validation messages, building, cost matrix."""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from segtrain.config import loss_config  # noqa: E402
from segtrain.decision import loss_cost_matrix  # noqa: E402
from segtrain.errors import ConfigError  # noqa: E402
from segtrain.losses import (  # noqa: E402
    CombinedLoss,
    CostSensitiveCrossEntropy,
    CrossEntropy,
    JaccardLoss,
    TverskyLoss,
    build_loss,
)

BINARY = ["background", "road"]
THREE = ["background", "road", "car"]


def cost_matrix_from_config(section, classes):
    return loss_cost_matrix(loss_config(section, classes), classes)


def test_missing_section_defaults_to_cross_entropy():
    cfg = loss_config(None, BINARY)
    assert [t.name for t in cfg.terms] == ["cross_entropy"]
    assert cfg.terms[0].weight == 1.0
    assert cfg.class_weights == "none" and cfg.max_weight is None
    assert cfg.ignore_false_negatives == []


def test_short_forms():
    assert loss_config("jaccard", BINARY).terms[0].name == "jaccard"
    single = loss_config({"name": "tversky", "alpha": 0.7, "class_weights": "balanced"}, BINARY)
    assert single.terms[0].alpha == 0.7 and single.class_weights == "balanced"
    listed = loss_config({"terms": ["dice", {"name": "focal", "gamma": 1}]}, BINARY)
    assert [t.name for t in listed.terms] == ["dice", "focal"]
    assert listed.terms[1].gamma == 1.0


def test_full_section_is_normalised_with_defaults_and_lists():
    cfg = loss_config(
        {
            "terms": [
                {"name": "cross_entropy", "weight": 1.0},
                {"name": "cost_sensitive", "fn_cost": {"road": 10}},
                {"name": "tversky", "alpha": 0.7, "beta": 0.3, "weight": 0.5},
            ],
            "class_weights": {"car": 3},
            "max_weight": 20,
            "ignore_false_negatives": ["car"],
        },
        THREE,
    )
    cost, tversky = cfg.terms[1], cfg.terms[2]
    assert cost.fn_cost == [1.0, 10.0, 1.0] and cost.fp_cost is None
    assert dataclasses.asdict(tversky) == {
        "name": "tversky", "weight": 0.5, "use_class_weights": True, "ignore_false_negatives": [],
        "alpha": 0.7, "beta": 0.3, "gamma": 1.0, "smooth": 1.0, "per_image": False,
        "include_background": False,
    }
    assert cfg.class_weights == [1.0, 1.0, 3.0]
    assert cfg.max_weight == 20.0 and cfg.ignore_false_negatives == ["car"]
    assert loss_config(dataclasses.asdict(cfg), THREE) == cfg  # idempotent


@pytest.mark.parametrize(
    "section, message",
    [
        ({"terms": [{"name": "cross_entropy"}, {"name": "tversky", "alpah": 0.7}]},
         "loss.terms[1].alpah: unknown key for tversky. Did you mean 'alpha'?"),
        ("jacard", "loss: unknown loss 'jacard'. Did you mean 'jaccard'?"),
        ({"terms": [{"name": "dise"}]}, "loss.terms[0].name: unknown loss 'dise'. Did you mean 'dice'?"),
        ({"terms": [{"weight": 1}]}, "loss.terms[0].name: missing"),
        ({"term": ["dice"]}, "loss.term: unknown key. Did you mean 'terms'?"),
        ({"terms": []}, "loss.terms: expected a non-empty list"),
        ({"terms": [{"name": "dice", "weight": -1}]}, "loss.terms[0].weight: must be >= 0"),
        ({"terms": [{"name": "dice", "weight": "1"}]}, "loss.terms[0].weight: expected a number"),
        ({"terms": [{"name": "dice", "weight": 0}]}, "needs a weight > 0"),
        ({"terms": [{"name": "dice", "per_image": "yes"}]}, "loss.terms[0].per_image: expected true or false"),
        ({"terms": [{"name": "dice", "alpha": 0.5}]}, "loss.terms[0].alpha: unknown key for dice"),
        ({"terms": [{"name": "tversky", "gamma": 0}]}, "loss.terms[0].gamma: must be > 0"),
        ({"terms": [{"name": "cross_entropy", "label_smoothing": 1.0}]}, "loss.terms[0].label_smoothing: must be < 1"),
        ({"terms": [{"name": "cost_sensitive", "fn_cost": {"road": -2}}]}, "loss.terms[0].fn_cost.road: must be >= 0"),
        ({"terms": [{"name": "cost_sensitive", "fn_cost": {"raod": 2}}]},
         "loss.terms[0].fn_cost.raod: unknown class 'raod'; valid classes: background, road"),
        ({"terms": [{"name": "cost_sensitive", "fp_cost": [1, 2, 3]}]}, "loss.terms[0].fp_cost: expected 2 values"),
        ({"terms": [{"name": "cost_sensitive", "cost_matrix": [[0, 1]]}]}, "loss.terms[0].cost_matrix: expected a 2 x 2"),
        ({"terms": [{"name": "cost_sensitive", "cost_matrix": [[0, 1], [1, 2]]}]},
         "loss.terms[0].cost_matrix[1][1]: the diagonal must be 0"),
        ({"terms": [{"name": "cost_sensitive", "cost_matrix": [[0, -1], [1, 0]]}]},
         "loss.terms[0].cost_matrix[0][1]: must be >= 0"),
        ({"terms": [{"name": "cost_sensitive", "cost_matrix": [[0, 1], [1, 0]], "fn_cost": [1, 2]}]},
         "loss.terms[0].cost_matrix: give either"),
        ({"terms": ["cost_sensitive", "cost_sensitive"]}, "loss.terms[1]: only one cost_sensitive"),
        ({"terms": [{"name": "jaccard", "ignore_false_negatives": ["cat"]}]},
         "loss.terms[0].ignore_false_negatives[0]: unknown class 'cat'"),
        ({"class_weights": "median"}, "loss.class_weights: unknown strategy 'median'. Did you mean 'median_frequency'?"),
        ({"class_weights": [1, 2, 3]}, "loss.class_weights: expected 2 values"),
        ({"class_weights": {"road": -1}}, "loss.class_weights.road: must be >= 0"),
        ({"max_weight": 0.5}, "loss.max_weight: must be >= 1.0"),
        ({"ignore_false_negatives": ["roads"]}, "loss.ignore_false_negatives[0]: unknown class 'roads'"),
        ({"name": "tversky", "alpah": 1}, "loss.alpah: unknown key for tversky. Did you mean 'alpha'?"),
        (42, "loss: expected a loss name"),
    ],
)
def test_config_errors_name_the_dotted_key(section, message):
    with pytest.raises(ConfigError) as info:
        loss_config(section, BINARY)
    assert message in info.value.message


def test_build_single_and_combined():
    single = build_loss(loss_config("cross_entropy", BINARY), BINARY, None)
    assert isinstance(single, CrossEntropy) and single.class_weights is None
    cfg = loss_config(
        {
            "terms": [
                {"name": "cross_entropy"},
                {"name": "jaccard", "weight": 0.5, "use_class_weights": False},
                {"name": "tversky", "alpha": 0.7, "beta": 0.3, "ignore_false_negatives": ["car"]},
            ],
            "ignore_false_negatives": ["road"],
        },
        THREE,
    )
    loss = build_loss(cfg, THREE, np.array([0.5, 2.0, 4.0]))
    assert isinstance(loss, CombinedLoss)
    (w0, ce), (w1, jac), (w2, tv) = loss.terms
    assert (w0, w1, w2) == (1.0, 0.5, 1.0)
    assert ce.class_weights == [0.5, 2.0, 4.0] and jac.class_weights is None
    assert isinstance(jac, JaccardLoss) and isinstance(tv, TverskyLoss)
    assert (tv.alpha, tv.beta) == (0.7, 0.3)
    assert ce.ignore_false_negatives == [1] and tv.ignore_false_negatives == [1, 2]


def test_build_rejects_weights_of_the_wrong_length():
    with pytest.raises(ConfigError, match="loss.class_weights"):
        build_loss(loss_config(None, THREE), THREE, np.ones(2))


def test_shorthand_fn_cost_weights_positives_in_binary():
    # fn_cost road 10: C = [[0, 1], [10, 0]]; logit 0: fg pixel 10 ln2, bg pixel ln2 => mean 5.5 ln2.
    cfg = loss_config({"name": "cost_sensitive", "fn_cost": {"road": 10}}, BINARY)
    np.testing.assert_array_equal(cost_matrix_from_config(cfg, BINARY), [[0, 1], [10, 0]])
    loss = build_loss(cfg, BINARY)
    assert isinstance(loss, CostSensitiveCrossEntropy)
    value = float(loss(np.array([[[1, 0]]]), np.zeros((1, 1, 2, 1), np.float32)))
    np.testing.assert_allclose(value, 5.5 * np.log(2), rtol=1e-6)


def test_shorthand_fp_cost_weights_negatives_in_binary():
    cfg = {"name": "cost_sensitive", "fp_cost": {"road": 4}, "fn_cost": {"road": 2}}
    np.testing.assert_array_equal(cost_matrix_from_config(cfg, BINARY), [[0, 4], [2, 0]])


def test_shorthand_multiclass_is_the_product_of_miss_and_false_alarm_costs():
    # C[t][p] = fn_cost[t] * fp_cost[p] off the diagonal.
    cfg = {"name": "cost_sensitive", "fn_cost": [1, 10, 2], "fp_cost": [1, 3, 1]}
    np.testing.assert_array_equal(
        cost_matrix_from_config(cfg, THREE),
        [[0, 3, 1], [10, 0, 10], [2, 6, 0]],
    )


def test_cost_matrix_zeroes_rows_of_ignored_false_negatives():
    cfg = {
        "terms": [{"name": "cost_sensitive", "cost_matrix": [[0, 1, 2], [3, 0, 4], [5, 6, 0]],
                   "ignore_false_negatives": ["car"]}],
        "ignore_false_negatives": ["road"],
    }
    np.testing.assert_array_equal(cost_matrix_from_config(cfg, THREE), [[0, 1, 2], [0, 0, 0], [0, 0, 0]])


def test_no_cost_term_gives_no_cost_matrix():
    assert cost_matrix_from_config({"terms": ["cross_entropy", "dice"]}, BINARY) is None
    np.testing.assert_array_equal(cost_matrix_from_config("cost_sensitive", THREE), 1 - np.eye(3))
