"""segtrain/config.py: loading, validation messages, --set overrides, and the `loss` section (normalisation,
validation messages, building the loss, cost matrix)."""

import dataclasses
import re

import numpy as np
import pytest
import yaml

from segtrain.config import Config, apply_override, config_from_dict, load_config, loss_config
from segtrain.decision import loss_cost_matrix
from segtrain.errors import ConfigError
from segtrain.losses import (
    CombinedLoss,
    CostSensitiveCrossEntropy,
    CrossEntropy,
    JaccardLoss,
    TverskyLoss,
    build_loss,
)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_fill_every_section(tmp_path):
    config = load_config(write(tmp_path, f"data: {{root: {tmp_path}}}\n"))
    assert isinstance(config, Config)
    assert config.model.depth == 4 and config.data.batch_size == 8 and config.train.precision == "auto"
    assert config.loss.terms[0].name == "cross_entropy"


def test_unknown_key_names_path_and_closest(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"data: {{root: {tmp_path}}}\ntrain: {{epohcs: 3}}\n"))
    assert "train.epohcs" in info.value.message and "epochs" in info.value.message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="modle.*model"):
        load_config(write(tmp_path, f"data: {{root: {tmp_path}}}\nmodle: {{depth: 3}}\n"))


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int"):
        load_config(write(tmp_path, f"data: {{root: {tmp_path}}}\ntrain: {{epochs: many}}\n"))


def test_literal_suggests(tmp_path):
    with pytest.raises(ConfigError, match="mixed_float16"):
        load_config(write(tmp_path, f"data: {{root: {tmp_path}}}\ntrain: {{precision: mixed_flaot16}}\n"))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "data:\n  root: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.message and "line" in info.value.message


def test_yaml_is_read_safely(tmp_path):
    path = write(tmp_path, "data: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(path)


def test_set_overrides_are_typed(tmp_path):
    path = write(tmp_path, f"data: {{root: {tmp_path}}}\n")
    config = load_config(path, ["train.epochs=2", "train.learning_rate=1e-4", "data.crop=null",
                                "loss.class_weights=balanced"])
    assert config.train.epochs == 2 and config.train.learning_rate == pytest.approx(1e-4)
    assert config.data.crop is None
    assert config.loss.class_weights == "balanced"


def test_set_on_short_form_loss(tmp_path):
    raw = {"loss": "jaccard"}
    apply_override(raw, "loss.class_weights=balanced")
    assert raw["loss"] == {"terms": [{"name": "jaccard"}], "class_weights": "balanced"}


def test_set_without_equals_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, f"data: {{root: {tmp_path}}}\n"), ["train.epochs"])


@pytest.mark.parametrize(
    "section, key",
    [
        ({"data": {"crop": 100}}, "data.crop"),
        ({"data": {"classes": ["only"]}}, "data.classes"),
        ({"data": {"mask": {"threshold": 127, "values": {0: 0}}}}, "data.mask"),
        ({"data": {"mask": {"values": {0: 5}}}}, "data.mask.values.0"),
        ({"data": {"mask": {"palette": {"bg": [0, 0, 0]}}}}, "data.mask.palette"),
        ({"model": {"depth": 0}}, "model.depth"),
        ({"train": {"learning_rate": -1}}, "train.learning_rate"),
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"predict": {"threshold": 1.5}}, "predict.threshold"),
        ({"predict": {"batch_size": 0}}, "predict.batch_size"),
        ({"predict": {"decision": "cost"}}, "predict.decision"),
        ({"predict": {"decision": "threshold"}}, "predict.threshold"),
        ({"data": {"classes": ["a", "b", "c"]}, "predict": {"decision": "threshold", "threshold": 0.5}},
         "predict.decision"),
        ({"predict": {"cost_matrix": [[0, 1], [2, 3]]}}, "predict.cost_matrix[1][1]"),
        ({"predict": {"fn_cost": {"nope": 2}}}, "predict.fn_cost.nope"),
        ({"data": {"mask": {"ignore": [-1]}}}, "data.mask.ignore[0]"),
        ({"data": {"mask": {"ignore": [70000]}}}, "data.mask.ignore[0]"),  # 16-bit masks hold 0..65535
        ({"data": {"mask": {"threshold": 65535}}}, "data.mask.threshold"),
        ({"data": {"mask": {"values": {0: 0, 70000: 1}}}}, "data.mask.values.70000"),
        ({"data": {"mask": {"values": {0: 0}}}}, "data.mask.values"),
        ({"data": {"mask": {"values": {0: 0, 255: 1}, "ignore": [255]}}}, "data.mask.values.255"),
        ({"data": {"mask": {"palette": {"background": [0, 0, 0], "foreground": [0, 0, 0]}}}}, "data.mask.palette"),
        ({"data": {"mask": {"palette": {"background": [0, 0, 0], "foreground": "red"}}}},
         "data.mask.palette.foreground"),
        ({"data": {"classes": ["bg", "a/b"]}}, "data.classes[1]"),
        ({"train": {"learning_rate": float("nan")}}, "train.learning_rate"),
    ],
)
def test_semantic_errors_name_the_key(section, key):
    raw = {"data": {"root": "x"}}
    for name, values in section.items():
        raw.setdefault(name, {}).update(values)
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert key in info.value.message


def test_relative_root_resolves_beside_config(tmp_path):
    (tmp_path / "sets" / "a").mkdir(parents=True)
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "c.yaml"
    path.write_text("data: {root: ../sets/a}\n")
    assert load_config(path).data.root == str((tmp_path / "sets" / "a").resolve())


def test_resolved_config_round_trips(tmp_path):
    from segtrain.config import save_config

    config = load_config(write(tmp_path, f"data: {{root: {tmp_path}}}\nloss: jaccard\n"))
    save_config(config, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == config.to_dict()
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["loss"]["terms"][0]["name"] == "jaccard"


def test_shipped_configs_load():
    from tests.helpers import REPO

    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.data.classes, path


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = write(tmp_path, f"data: {{root: {tmp_path}}}\ntrain: {{epochs: 2}}\ntrain: {{seed: 1}}\n")
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(path)


def test_decision_costs_from_predict_section_or_loss_term(tmp_path):
    from segtrain.decision import decision_cost_matrix

    own = config_from_dict({"data": {"root": "x", "classes": ["bg", "road"]},
                            "predict": {"decision": "cost", "fp_cost": {"road": 1}, "fn_cost": {"road": 4}}})
    assert decision_cost_matrix(own).tolist() == [[0, 1], [4, 0]]
    from_loss = config_from_dict({"data": {"root": "x", "classes": ["bg", "road"]},
                                  "loss": {"name": "cost_sensitive", "fp_cost": {"road": 3}},
                                  "predict": {"decision": "cost"}})
    assert decision_cost_matrix(from_loss).tolist() == [[0, 3], [1, 0]]


def test_loading_a_config_does_not_import_tensorflow(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, f"data: {{root: {tmp_path}}}\nloss: {{terms: [cross_entropy, jaccard]}}\n")
    code = ("import sys; from segtrain.config import load_config; "
            f"load_config(r'{path}'); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-500:]


def test_set_reaches_list_items():
    raw = {"loss": {"terms": ["cross_entropy", {"name": "jaccard", "weight": 0.5}]}}
    apply_override(raw, "loss.terms[1].weight=0.2")
    apply_override(raw, "loss.terms[0].label_smoothing=0.1")
    assert raw["loss"]["terms"] == [{"name": "cross_entropy", "label_smoothing": 0.1}, {"name": "jaccard", "weight": 0.2}]
    config = config_from_dict({"data": {"root": "x"}, **raw})
    assert config.loss.terms[1].weight == 0.2 and config.loss.terms[0].label_smoothing == 0.1


@pytest.mark.parametrize("item, message", [
    ("loss.terms[5].weight=1", "loss.terms[5] does not exist"),
    ("train.epochs[0]=1", "train.epochs is a value"),
    ("train..epochs=1", "bad key"),
])
def test_set_list_errors(item, message):
    raw = {"loss": {"terms": ["cross_entropy"]}, "train": {"epochs": 3}}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        apply_override(raw, item)


def test_exponent_numbers_read_the_same_in_every_section(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-5 and 1e1 as strings; every section takes them as the numbers they are.
    assert yaml.safe_load("a: 1e-5")["a"] == "1e-5"
    path = write(tmp_path, """
data: {root: ., classes: [background, road]}
loss:
  terms: [{name: cross_entropy, weight: 2e0}, {name: jaccard, smooth: 1e-5}]
  class_weights: balanced
  max_weight: 1e1
train: {learning_rate: 3E-4}
predict: {threshold: 5e-1, decision: threshold}
""")
    config = load_config(path)
    assert config.loss.max_weight == 10.0 and config.loss.terms[0].weight == 2.0
    assert config.loss.terms[1].smooth == 1e-5
    assert config.train.learning_rate == 3e-4 and config.predict.threshold == 0.5


@pytest.mark.parametrize("text, key", [
    ("train: {learning_rate: 'fast'}", "train.learning_rate"),
    ("train: {learning_rate: '0.1'}", "train.learning_rate"),  # a quoted number is a string in every section
    ("loss: {terms: [{name: dice, weight: '1'}]}", "loss.terms[0].weight"),
    ("loss: {max_weight: 1e}", "loss.max_weight"),
])
def test_strings_that_are_not_numbers_are_refused_in_every_section(tmp_path, text, key):
    path = write(tmp_path, "data: {root: ., classes: [background, road]}\n" + text + "\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: expected"):
        load_config(path)


@pytest.mark.parametrize("train, message", [
    ({"steps_per_execution": 0}, "train.steps_per_execution: must be at least 1"),
    ({"jit_compile": True, "deterministic": True}, "train.jit_compile: XLA has no deterministic"),
    ({"jit_compile": True, "distribute": "mirrored"}, "train.jit_compile: XLA steps under several replicas"),
])
def test_steps_per_execution_and_jit_compile_are_checked(train, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"data": {"root": "."}, "train": train})


def test_steps_per_execution_and_jit_compile_default_to_auto_and_take_values():
    config = config_from_dict({"data": {"root": "."}, "train": {"steps_per_execution": 16, "jit_compile": False}})
    assert config.train.steps_per_execution == 16 and config.train.jit_compile is False
    defaults = config_from_dict({"data": {"root": "."}}).train
    assert defaults.steps_per_execution == "auto" and defaults.jit_compile == "auto"


# ---------------------------------------------------------------------------- the loss section


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


@pytest.mark.parametrize("sets", [
    ["tracking=mlflow", "tracking.uri=sqlite:///m.db", "tracking.experiment=x"],
    ["tracking.uri=sqlite:///m.db", "tracking.experiment=x", "tracking=mlflow"],  # the shorthand last keeps both
])
def test_tracking_shorthand_combines_with_its_keys_in_any_order(tmp_path, sets):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": str(tmp_path)}}))
    config = load_config(path, [f"{item}" for item in sets])
    assert (config.tracking.backend, config.tracking.uri, config.tracking.experiment) == ("mlflow", "sqlite:///m.db", "x")
    path.write_text(yaml.safe_dump({"data": {"root": str(tmp_path)}, "tracking": "mlflow"}))
    assert load_config(path, ["tracking.uri=u"]).tracking.uri == "u"  # the shorthand in the file, a key by --set


def test_a_relative_encoder_weights_path_is_read_from_the_configs_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "w.weights.h5").write_bytes(b"x")
    path = tmp_path / "configs" / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": str(tmp_path), "crop": 64},
                                    "model": {"encoder": "mobilenetv3small", "encoder_weights": "w.weights.h5"}}))
    monkeypatch.chdir(tmp_path)  # not where the file is
    assert load_config(path).model.encoder_weights == str(tmp_path / "configs" / "w.weights.h5")
    for kept in ("imagenet", "none", "elsewhere.h5"):  # names, and a path not beside the config, stay as given
        path.write_text(yaml.safe_dump({"data": {"root": str(tmp_path), "crop": 64},
                                        "model": {"encoder": "mobilenetv3small", "encoder_weights": kept}}))
        assert load_config(path).model.encoder_weights == kept
