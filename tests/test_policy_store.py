"""Prior correction (segtrain.policy.prior) against hand-computed values, its two-class cut and TensorFlow twin; and
a run's policy.json (segtrain.policy.store): what `resolve_policy` applies, and when a stored part is left out.

The resolve tests need no real model: `resolve_policy` only hashes the model file, so a few bytes stand in for it.
"""

import json

import numpy as np
import pytest

from segtrain.config import load_config
from segtrain.errors import ConfigError
from segtrain.policy.prior import foreground_cut, prior_adjust, prior_adjust_tf, prior_scale
from segtrain.policy.store import (LEGACY_CALIBRATION_FILE, LEGACY_OPERATING_POINT_FILE, POLICY_FILE, Overrides,
                                   StoredPolicy, model_digest, read_stored, resolve_policy, trained_class_weights,
                                   tuning_conditions, write_stored)
from tests.helpers import THREE_CLASSES, TINY, write_config

# ---------------------------------------------------------------------------- prior correction


def test_prior_adjust_divides_by_the_weights_to_the_power_tau_and_normalises():
    p = np.array([0.2, 0.3, 0.5])
    q = prior_adjust(p, [1.0, 4.0, 9.0], 0.5)  # divide by sqrt(w) = 1, 2, 3
    expected = np.array([0.2, 0.15, 0.5 / 3])
    np.testing.assert_allclose(q, expected / expected.sum(), rtol=1e-12)
    np.testing.assert_array_equal(prior_adjust(p, [1.0, 4.0, 9.0], 0.0), p)
    np.testing.assert_allclose(prior_adjust(p, [2.0, 2.0, 2.0], 1.0), p, rtol=1e-12)  # equal weights: no change


def test_prior_adjust_with_class_biases_and_a_zero_weight():
    p = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    bias = [0.0, np.log(2.0), -np.log(4.0)]
    # q_c ∝ p_c * w_c**-tau * exp(b_c); w = [4, 1, 0] at tau 1: the weight 0 class gets exp(b_c) only
    q = prior_adjust(p, [4.0, 1.0, 0.0], 1.0, bias)
    by_hand = p * np.array([1 / 4, 2.0, 1 / 4])
    np.testing.assert_allclose(q, by_hand / by_hand.sum(-1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(prior_scale(None, 0.0, bias), [1.0, 2.0, 0.25], rtol=1e-12)  # bias alone
    assert prior_scale([1.0, 1.0], 1.0) is None and prior_scale([3.0, 5.0], 0.0, [0.0, 0.0]) is None  # nothing to do
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-12)


def test_two_class_correction_is_the_foreground_cut():
    rng = np.random.default_rng(0)
    weights = [0.6, 3.5]
    for tau in (0.0, 0.3, 1.0):
        # arg-max on q: foreground when p_fg >= w1**tau / (w0**tau + w1**tau)
        t = foreground_cut(0.5, weights, tau)
        assert t == pytest.approx(3.5**tau / (0.6**tau + 3.5**tau), rel=1e-12)
    for cut_on_q, tau, bias in ((0.5, 0.7, None), (0.3, 1.0, None), (0.8, 0.5, [0.2, -0.4]), (0.5, 0.0, [0.0, 1.0])):
        t = foreground_cut(cut_on_q, weights, tau, bias)
        p_fg = rng.random(5000)
        p_fg = p_fg[np.abs(p_fg - t) > 1e-9]  # exact ties are a matter of rounding
        q = prior_adjust(np.stack([1 - p_fg, p_fg], -1), weights, tau, bias)
        np.testing.assert_array_equal(q[:, 1] >= cut_on_q, p_fg >= t)
        assert 0 < (p_fg >= t).mean() < 1  # both sides met


def test_tensorflow_twin_matches_numpy():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=(3, 5))
    weights = [0.3, 1.0, 7.0, 20.0]
    for bias in (None, [0.5, -0.25, 0.0, 1.0]):
        got = prior_adjust_tf(p.astype(np.float32), weights, 0.7, bias).numpy()
        # float32 products and one sum of 4 terms: a few units of 2**-24 relative
        np.testing.assert_allclose(got, prior_adjust(p, weights, 0.7, bias), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- what training applied


def _config(tmp_path, name="c.yaml", base=TINY, **sections):
    return load_config(write_config(tmp_path / name, tmp_path, base=base, **sections))


def test_trained_class_weights_reads_class_stats_only_when_a_loss_term_used_them(tmp_path):
    config = _config(tmp_path)  # cross_entropy with class_weights balanced: the term uses them
    assert config.loss.terms[0].use_class_weights
    assert trained_class_weights(config, tmp_path) is None  # no class_stats.json
    (tmp_path / "class_stats.json").write_text(json.dumps({"class_weights": [0.5, None, 4.0]}))
    assert trained_class_weights(config, tmp_path) == [0.5, 1.0, 4.0]  # an absent class's null weighs 1
    unweighted = _config(tmp_path, "u.yaml", loss={"terms": [{"name": "cross_entropy", "use_class_weights": False},
                                                             {"name": "dice", "use_class_weights": False}]})
    assert trained_class_weights(unweighted, tmp_path) is None  # the file exists, but no term applied it
    mixed = _config(tmp_path, "m.yaml", loss={"terms": [{"name": "cross_entropy", "use_class_weights": False},
                                                        {"name": "dice"}]})
    assert trained_class_weights(mixed, tmp_path) == [0.5, 1.0, 4.0]


# ---------------------------------------------------------------------------- policy.json and resolve_policy

WEIGHTS = [0.6, 3.5]


def under(**changes):
    """`tuned.under` of the TINY config at T = 0.8 with WEIGHTS, written out by hand (the stored JSON form)."""
    conditions = {"rule": "argmax", "threshold": None, "cost_matrix": None, "prior_correction": "none", "tta": False,
                  "min_size": {}, "max_hole": {}, "temperature": 0.8, "class_weights": WEIGHTS}
    conditions.update(changes)
    return conditions


def make_run(run, model_bytes=b"model", temperature=0.8, tuned=True, class_weights=WEIGHTS, **tuned_fields):
    """RUN/best.keras (a stand-in) and RUN/policy.json for it: calibration at `temperature`, a tuned threshold 0.3 and
    post-processing stripe (5, 0) tuned under `under()`."""
    (run / "best.keras").write_bytes(model_bytes)
    point = {"threshold": 0.3, "tau": None, "bias": None, "postprocess": {"stripe": [5, 0]}, "split": "val",
             "objective": "f1", "images": 3, "pixels": 3072, "under": under()}
    point.update(tuned_fields)
    stored = {"model": "best.keras", "model_sha256": model_digest(run / "best.keras"), "class_weights": class_weights,
              "calibration": {"method": "scalar", "temperature": temperature, "split": "val"},
              "tuned": point if tuned else None}
    (run / POLICY_FILE).write_text(json.dumps(stored))
    return run / "best.keras"


def resolve(model, config, overrides=None, **kwargs):
    messages = []
    resolved = resolve_policy(model, config, overrides, log=messages.append, **kwargs)
    return resolved, messages


def test_tuning_conditions_are_the_stored_form(tmp_path):
    config = _config(tmp_path)
    assert tuning_conditions(config, 0.8, WEIGHTS, False) == under()
    per_class = tuning_conditions(config, np.array([0.5, 2.0]), WEIGHTS, True)
    assert per_class["temperature"] == [0.5, 2.0] and per_class["tta"] is True
    costly = _config(tmp_path, "k.yaml", predict={"decision": "cost", "fp_cost": {"stripe": 1.0},
                                                  "fn_cost": {"stripe": 4.0}, "min_size": {"stripe": 12}})
    conditions = tuning_conditions(costly, 1.0, None, False)
    assert conditions["cost_matrix"] == [[0.0, 1.0], [4.0, 0.0]] and conditions["min_size"] == {"stripe": 12}
    assert json.loads(json.dumps(conditions)) == conditions  # JSON-ready: a stored copy compares equal


def test_stored_policy_round_trip(tmp_path):
    model = make_run(tmp_path)
    stored = read_stored(tmp_path)
    assert stored.model == "best.keras" and stored.model_sha256 == model_digest(model)
    assert stored.class_weights == WEIGHTS and stored.calibration["temperature"] == 0.8
    assert stored.tuned["threshold"] == 0.3
    (tmp_path / "copy").mkdir()
    assert write_stored(stored, tmp_path / "copy") == tmp_path / "copy" / POLICY_FILE
    assert read_stored(tmp_path / "copy") == stored
    fresh = StoredPolicy.new(model, [1.0, 2.0])
    assert fresh.to_dict() == {"model": "best.keras", "model_sha256": model_digest(model), "class_weights": [1.0, 2.0],
                               "calibration": None, "tuned": None}
    assert read_stored(tmp_path / "nothing_here") is None


def test_the_tuned_point_applies_to_its_model_under_its_settings(tmp_path):
    config = _config(tmp_path)
    model = make_run(tmp_path)
    resolved, messages = resolve(model, config)
    policy = resolved.policy
    assert not messages
    assert policy.temperature == 0.8 and policy.class_weights == WEIGHTS
    assert policy.rule == "threshold" and policy.threshold == 0.3 and policy.postprocess == {1: (5, 0)}
    assert resolved.tuned is not None and resolved.tuned["split"] == "val"
    assert any(s.startswith("temperature 0.8 (policy.json") for s in resolved.sources)
    assert any(s.startswith("threshold 0.3 (policy.json, tuned on val)") for s in resolved.sources)
    assert any(s.startswith("post-processing (policy.json") for s in resolved.sources)
    summary = resolved.summary()
    assert summary["sources"] == resolved.sources and summary["tuned"]["split"] == "val"
    assert summary["rule"] == "threshold" and summary["temperature"] == 0.8


def test_another_model_file_gets_neither_temperature_nor_tuned_point(tmp_path):
    config = _config(tmp_path)
    model = make_run(tmp_path)
    (tmp_path / "class_stats.json").write_text(json.dumps({"class_weights": [0.7, 2.0]}))
    model.write_bytes(b"another model")  # best.keras replaced after policy.json was written
    resolved, messages = resolve(model, config)
    assert len(messages) == 1 and "another model file" in messages[0] and "segtrain calibrate" in messages[0]
    assert resolved.stored is None and resolved.tuned is None and resolved.sources == []
    assert resolved.policy.temperature == 1.0 and resolved.policy.rule == "argmax" and resolved.policy.postprocess == {}
    assert resolved.policy.class_weights == [0.7, 2.0]  # then what training applied comes from class_stats.json


@pytest.mark.parametrize("predict, overrides, stored_weights, named", [
    ({"prior_correction": "weights"}, None, WEIGHTS, "prior_correction 'none' -> 'weights'"),
    ({"tta": True}, None, WEIGHTS, "tta False -> True"),
    ({}, Overrides(tta=True), WEIGHTS, "tta False -> True"),
    ({"decision": "cost", "fp_cost": {"stripe": 1.0}, "fn_cost": {"stripe": 3.0}}, None, WEIGHTS,
     "rule 'argmax' -> 'cost'"),
    ({"decision": "threshold", "threshold": 0.4}, None, WEIGHTS, "rule 'argmax' -> 'threshold'"),
    ({"min_size": {"stripe": 12}}, None, WEIGHTS, "min_size {} -> {'stripe': 12}"),
    ({}, None, [0.6, 3.0], "class_weights"),
], ids=["prior_correction", "tta", "tta-override", "rule-cost", "rule-threshold", "min_size", "class_weights"])
def test_a_changed_setting_makes_the_tuned_point_stale(tmp_path, predict, overrides, stored_weights, named):
    config = _config(tmp_path, predict=predict)
    model = make_run(tmp_path, class_weights=stored_weights)
    resolved, messages = resolve(model, config, overrides)
    stale = [m for m in messages if "tuned operating point" in m]
    assert len(stale) == 1 and named in stale[0] and "not applied" in stale[0], messages
    assert resolved.tuned is None
    policy = resolved.policy
    assert policy.threshold != 0.3 and policy.postprocess.get(1) != (5, 0)  # nothing of the tuned point
    assert not any("tuned on" in s for s in resolved.sources)
    assert policy.temperature == 0.8  # the calibration still applies: it does not depend on these settings


def test_a_changed_temperature_makes_the_tuned_point_stale(tmp_path):
    config = _config(tmp_path)
    model = make_run(tmp_path, temperature=0.9)  # tuned under T = 0.8, calibrated again since
    resolved, messages = resolve(model, config)
    assert resolved.tuned is None and resolved.policy.temperature == 0.9 and resolved.policy.rule == "argmax"
    assert len(messages) == 1 and "temperature 0.8 -> 0.9" in messages[0]


def test_a_json_round_trip_of_the_conditions_still_matches(tmp_path):
    """Stored floats and lists compare equal to freshly computed ones: no spurious staleness."""
    config = _config(tmp_path)
    temperature = 1 / 3  # not exact in binary
    make_run(tmp_path, temperature=temperature)
    info = json.loads((tmp_path / POLICY_FILE).read_text())
    info["tuned"]["under"] = tuning_conditions(config, temperature, WEIGHTS, False)
    (tmp_path / POLICY_FILE).write_text(json.dumps(info))
    resolved, messages = resolve(tmp_path / "best.keras", config)
    assert not messages and resolved.tuned is not None and resolved.policy.temperature == pytest.approx(1 / 3)


def test_predict_calibrate_false_and_tuned_false(tmp_path):
    model = make_run(tmp_path)
    # calibrate: false -> T = 1; the point was tuned under T = 0.8, so it is stale too (and says why)
    resolved, messages = resolve(model, _config(tmp_path, "a.yaml", predict={"calibrate": False}))
    assert resolved.policy.temperature == 1.0 and not any(s.startswith("temperature") for s in resolved.sources)
    assert resolved.tuned is None and len(messages) == 1 and "temperature 0.8 -> 1.0" in messages[0]
    # tuned: false -> the calibration only, silently
    resolved, messages = resolve(model, _config(tmp_path, "b.yaml", predict={"tuned": False}))
    assert resolved.policy.temperature == 0.8 and resolved.tuned is None and not messages
    assert resolved.policy.rule == "argmax" and resolved.policy.postprocess == {}
    # the same from the callers' switches (calibrate fits from T = 1 untuned; tune searches from the untuned rule)
    config = _config(tmp_path)
    resolved, messages = resolve(model, config, use_calibration=False, use_tuned=False)
    assert resolved.policy.temperature == 1.0 and resolved.tuned is None and not messages
    resolved, messages = resolve(model, config, use_tuned=False)
    assert resolved.policy.temperature == 0.8 and resolved.tuned is None and not messages


def test_tuned_post_processing_replaces_the_configured_one(tmp_path):
    config = _config(tmp_path, predict={"min_size": {"stripe": 12}, "max_hole": {"background": 3}})
    untuned, _ = resolve(make_run(tmp_path, tuned=False), config)
    assert untuned.policy.postprocess == {0: (0, 3), 1: (12, 0)}
    conditions = under(min_size={"stripe": 12}, max_hole={"background": 3})
    resolved, messages = resolve(make_run(tmp_path, under=conditions), config)
    assert not messages and resolved.policy.postprocess == {1: (5, 0)}  # every class: background's hole fill goes too
    resolved, _ = resolve(make_run(tmp_path, under=conditions, postprocess={}), config)
    assert resolved.policy.postprocess == {}  # tune searched and chose nothing: nothing
    resolved, _ = resolve(make_run(tmp_path, under=conditions, postprocess=None), config)
    assert resolved.policy.postprocess == {0: (0, 3), 1: (12, 0)}  # not searched: the configured one stays


def test_prior_correction_tuned_applies_the_tuned_tau_and_biases(tmp_path):
    config = _config(tmp_path, data={**TINY["data"], **THREE_CLASSES}, predict={"prior_correction": "tuned"})
    weights = [0.5, 1.0, 6.0]
    model = make_run(tmp_path, class_weights=weights, threshold=None, tau=0.35, bias=[0.0, 0.25, -0.5],
                     postprocess=None, under=under(prior_correction="tuned", class_weights=weights))
    resolved, messages = resolve(model, config)
    policy = resolved.policy
    assert not messages and policy.rule == "argmax" and policy.tau == 0.35 and policy.bias == [0.0, 0.25, -0.5]
    assert policy.class_weights == weights
    p = np.array([[0.5, 0.3, 0.2]])
    expected = p * np.power(weights, -0.35) * np.exp([0.0, 0.25, -0.5])
    np.testing.assert_allclose(policy.scores(p), expected / expected.sum(), rtol=1e-12)
    # without a tuned tau in force: no correction, and a warning that says so
    resolved, messages = resolve(model, config, use_tuned=True, use_calibration=False)  # T = 1: stale
    assert resolved.policy.tau == 0.0 and resolved.policy.bias is None
    assert any("no tuned tau is in force" in m for m in messages)


def test_prior_correction_weights_divides_by_the_stored_weights(tmp_path):
    config = _config(tmp_path, predict={"prior_correction": "weights"})
    (tmp_path / "class_stats.json").write_text(json.dumps({"class_weights": [9.0, 9.0]}))
    resolved, _ = resolve(make_run(tmp_path, tuned=False), config)
    assert resolved.policy.tau == 1.0 and resolved.policy.class_weights == WEIGHTS  # policy.json's, not class_stats'
    assert resolved.policy.foreground_cut() == pytest.approx(3.5 / (0.6 + 3.5), rel=1e-12)


def test_overrides_are_applied_over_the_tuned_point_and_reported(tmp_path):
    config = _config(tmp_path)
    model = make_run(tmp_path)
    resolved, _ = resolve(model, config, Overrides(decision="threshold", threshold=0.42))
    assert resolved.policy.rule == "threshold" and resolved.policy.threshold == 0.42
    assert resolved.sources[-1] == "rule threshold 0.42 (command line; the run's own: threshold 0.3)"
    assert resolved.policy.postprocess == {1: (5, 0)}  # the rest of the tuned point stays
    resolved, _ = resolve(model, config, Overrides(threshold=0.25))  # a threshold alone implies the rule
    assert resolved.policy.rule == "threshold" and resolved.policy.threshold == 0.25
    assert "command line" in resolved.sources[-1] and "0.25" in resolved.sources[-1]
    resolved, _ = resolve(model, config, Overrides(decision="argmax"))
    assert resolved.policy.rule == "argmax" and resolved.policy.threshold is None
    assert resolved.sources[-1].startswith("rule argmax (command line")
    resolved, _ = resolve(model, config, Overrides(tta=False))  # the run's own value: the tuned point holds
    assert resolved.policy.tta is False and resolved.tuned is not None
    assert resolved.sources[-1] == "tta off (command line)"
    assert not Overrides().any() and Overrides(tta=False).any()


def test_overrides_get_the_config_checks(tmp_path):
    model = make_run(tmp_path, tuned=False)
    with pytest.raises(ConfigError, match="needs costs"):
        resolve(model, _config(tmp_path), Overrides(decision="cost"))
    with pytest.raises(ConfigError, match="predict.threshold"):
        resolve(model, _config(tmp_path), Overrides(decision="threshold"))  # the run's rule has no threshold
    three = _config(tmp_path, "3.yaml", data={**TINY["data"], **THREE_CLASSES})
    with pytest.raises(ConfigError, match="two classes only"):
        resolve(model, three, Overrides(threshold=0.5))


def test_every_override_is_reported_when_several_are_given(tmp_path):
    model = make_run(tmp_path, tuned=False)
    resolved, _ = resolve(model, _config(tmp_path), Overrides(decision="threshold", threshold=0.4, tta=True))
    assert resolved.policy.tta is True and resolved.policy.threshold == 0.4
    assert any(s.startswith("rule threshold 0.4 (command line") for s in resolved.sources)
    assert "tta on (command line)" in resolved.sources


def test_a_cost_rule_on_the_loss_costs_warns_that_they_count_twice(tmp_path):
    costly = {"terms": [{"name": "cost_sensitive", "fp_cost": {"stripe": 1.0}, "fn_cost": {"stripe": 5.0}}]}
    config = _config(tmp_path, loss=costly, predict={"decision": "cost"})
    resolved, messages = resolve(make_run(tmp_path, tuned=False), config)
    assert resolved.policy.rule == "cost" and resolved.policy.cost_matrix.tolist() == [[0.0, 1.0], [5.0, 0.0]]
    assert any("count twice" in m for m in messages)
    own = _config(tmp_path, "own.yaml", predict={"decision": "cost", "fp_cost": {"stripe": 1.0},
                                                  "fn_cost": {"stripe": 5.0}})
    assert not any("count twice" in m for m in resolve(tmp_path / "best.keras", own)[1])


# ---------------------------------------------------------------------------- runs from an older segtrain


def test_a_legacy_calibration_json_is_read_for_its_model_only(tmp_path):
    config = _config(tmp_path)
    model = tmp_path / "best.keras"
    model.write_bytes(b"model")
    (tmp_path / LEGACY_CALIBRATION_FILE).write_text(json.dumps({
        "model": "best.keras", "model_sha256": model_digest(model), "temperature": 0.7, "split": "val",
        "pixels": 100}))
    stored = read_stored(tmp_path)
    assert stored.calibration == {"method": "scalar", "temperature": 0.7, "split": "val", "pixels": 100}
    assert stored.tuned is None
    resolved, messages = resolve(model, config)
    assert resolved.policy.temperature == 0.7 and not messages
    assert any(s.startswith("temperature 0.7") and "val" in s for s in resolved.sources)
    # policy.json, once written, wins over calibration.json
    (tmp_path / POLICY_FILE).write_text(json.dumps(StoredPolicy.new(model, None).to_dict()))
    assert resolve(model, config)[0].policy.temperature == 1.0
    (tmp_path / POLICY_FILE).unlink()
    model.write_bytes(b"retrained")
    resolved, messages = resolve(model, config)
    assert resolved.policy.temperature == 1.0 and any("another model file" in m for m in messages)


def test_a_legacy_operating_point_json_is_not_read_and_says_so(tmp_path):
    config = _config(tmp_path)
    model = make_run(tmp_path, tuned=False)
    (tmp_path / LEGACY_OPERATING_POINT_FILE).write_text(json.dumps({"threshold": 0.1, "postprocess": {}}))
    resolved, messages = resolve(model, config)
    assert resolved.policy.rule == "argmax" and resolved.tuned is None
    assert len(messages) == 1 and "older segtrain" in messages[0] and "segtrain tune" in messages[0]
    # once tune has written policy.json's point, the old file is irrelevant: no warning
    make_run(tmp_path)
    resolved, messages = resolve(model, config)
    assert resolved.tuned is not None and not messages


def test_a_legacy_run_keeps_its_class_weights_for_prior_correction(tmp_path):
    config = _config(tmp_path, predict={"prior_correction": "weights"})
    model = tmp_path / "best.keras"
    model.write_bytes(b"model")
    (tmp_path / "class_stats.json").write_text(json.dumps({"class_weights": WEIGHTS}))
    (tmp_path / LEGACY_CALIBRATION_FILE).write_text(json.dumps({
        "model": "best.keras", "model_sha256": model_digest(model), "temperature": 0.7, "split": "val"}))
    resolved, _ = resolve(model, config)
    assert resolved.policy.temperature == 0.7 and resolved.policy.tau == 1.0
    assert resolved.policy.class_weights == WEIGHTS


# ---------------------------------------------------------------------------- the predict section


def test_config_checks_the_new_predict_keys(tmp_path):
    with pytest.raises(ConfigError, match="predict.prior_correction"):
        load_config(write_config(tmp_path / "a.yaml", tmp_path, predict={"prior_correction": "sqrt"}))
    with pytest.raises(ConfigError, match="predict.min_size.tree"):
        load_config(write_config(tmp_path / "b.yaml", tmp_path, predict={"min_size": {"tree": 5}}))
    with pytest.raises(ConfigError, match="predict.max_hole.stripe"):
        load_config(write_config(tmp_path / "c.yaml", tmp_path, predict={"max_hole": {"stripe": 2.5}}))
    config = load_config(write_config(tmp_path / "d.yaml", tmp_path, predict={"min_size": {"stripe": 12}}))
    assert config.predict.min_size == {"stripe": 12} and TINY["data"]["classes"][1] == "stripe"
