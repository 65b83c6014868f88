"""Prior correction against hand-computed values, its two-class threshold, the TensorFlow twin, and when a stored
operating point applies."""

import json

import numpy as np
import pytest

from segtrain.config import load_config
from segtrain.operating_point import (OPERATING_POINT_FILE, OperatingPoint, equivalent_threshold,
                                      load_operating_point, prior_adjust, prior_adjust_tf, run_class_weights)

from tests.helpers import TINY, write_config


def test_prior_adjust_divides_by_the_weights_to_the_power_tau_and_normalises():
    p = np.array([0.2, 0.3, 0.5])
    q = prior_adjust(p, [1.0, 4.0, 9.0], 0.5)  # divide by sqrt(w) = 1, 2, 3
    expected = np.array([0.2, 0.15, 0.5 / 3])
    np.testing.assert_allclose(q, expected / expected.sum(), rtol=1e-12)
    np.testing.assert_array_equal(prior_adjust(p, [1.0, 4.0, 9.0], 0.0), p)
    np.testing.assert_allclose(prior_adjust(p, [2.0, 2.0, 2.0], 1.0), p, rtol=1e-12)  # equal weights: no change


def test_two_class_correction_is_the_equivalent_threshold():
    rng = np.random.default_rng(0)
    weights = [0.6, 3.5]
    for tau in (0.0, 0.3, 1.0):
        t = equivalent_threshold(weights, tau)
        assert t == pytest.approx(3.5**tau / (0.6**tau + 3.5**tau), rel=1e-12)
        p_fg = rng.random(5000)
        p_fg = p_fg[np.abs(p_fg - t) > 1e-9]  # exact ties are a matter of rounding
        q = prior_adjust(np.stack([1 - p_fg, p_fg], -1), weights, tau)
        np.testing.assert_array_equal(q[:, 1] >= q[:, 0], p_fg >= t)


def test_tensorflow_twin_matches_numpy():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=(3, 5))
    weights = [0.3, 1.0, 7.0, 20.0]
    got = prior_adjust_tf(p.astype(np.float32), weights, 0.7).numpy()
    # float32 products and one sum of 4 terms: a few units of 2**-24 relative
    np.testing.assert_allclose(got, prior_adjust(p, weights, 0.7), rtol=1e-6, atol=1e-7)


def test_run_class_weights_reads_class_stats_and_defaults_to_ones(tmp_path):
    assert run_class_weights(tmp_path, 3) == [1.0, 1.0, 1.0]
    (tmp_path / "class_stats.json").write_text(json.dumps({"class_weights": [0.5, None, 4.0]}))
    assert run_class_weights(tmp_path, 3) == [0.5, 1.0, 4.0]


def _point_file(run, model_bytes=b"model", temperature=0.8, **extra):
    from segtrain.calibration import model_digest

    (run / "best.keras").write_bytes(model_bytes)
    point = OperatingPoint(threshold=0.3, postprocess={"stripe": [5, 0]},
                           info={"split": "val", "model": "best.keras", "model_sha256": model_digest(run / "best.keras"),
                                 "temperature": temperature, **extra})
    (run / OPERATING_POINT_FILE).write_text(json.dumps(point.to_dict()))


def test_operating_point_applies_only_to_its_model_and_temperature(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", tmp_path))
    _point_file(tmp_path)
    messages = []
    point = load_operating_point(tmp_path / "best.keras", config, 0.8, log=messages.append)
    assert point.threshold == 0.3 and point.postprocess == {"stripe": [5, 0]} and not messages
    assert load_operating_point(tmp_path / "best.keras", config, 0.9, log=messages.append) is None
    assert "temperature" in messages[-1]
    (tmp_path / "best.keras").write_bytes(b"another model")
    assert load_operating_point(tmp_path / "best.keras", config, 0.8, log=messages.append) is None
    assert "another model file" in messages[-1]


def test_predict_tuned_false_ignores_the_file(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", tmp_path, predict={"tuned": False}))
    _point_file(tmp_path)
    assert load_operating_point(tmp_path / "best.keras", config, 0.8) is None


def test_config_checks_the_new_predict_keys(tmp_path):
    from segtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="predict.prior_correction"):
        load_config(write_config(tmp_path / "a.yaml", tmp_path, predict={"prior_correction": "sqrt"}))
    with pytest.raises(ConfigError, match="predict.min_size.tree"):
        load_config(write_config(tmp_path / "b.yaml", tmp_path, predict={"min_size": {"tree": 5}}))
    with pytest.raises(ConfigError, match="predict.max_hole.stripe"):
        load_config(write_config(tmp_path / "c.yaml", tmp_path, predict={"max_hole": {"stripe": 2.5}}))
    config = load_config(write_config(tmp_path / "d.yaml", tmp_path, predict={"min_size": {"stripe": 12}}))
    assert config.predict.min_size == {"stripe": 12} and TINY["data"]["classes"][1] == "stripe"
