"""The `loss` config section: validate and normalise it, build the Keras loss, cost matrix.

Accepted forms (YAML):
```
loss: jaccard                                   # one term, defaults
loss: {name: tversky, alpha: 0.7, beta: 0.3}    # one term with settings
loss:
  terms:
    - {name: cross_entropy, weight: 1.0}
    - {name: cost_sensitive, fn_cost: {road: 10}}
    - jaccard                                    # a bare name is a term with defaults
  class_weights: median_frequency   # none | a strategy | [w0, w1, ...] | {class: w}
  max_weight: 10                    # cap on data-set class weights (>= 1)
  ignore_false_negatives: [road]    # misses of these classes are free, in every term
```
Section-level `class_weights` apply to every term with `use_class_weights: true` (the
default); section-level `ignore_false_negatives` are added to each term's own list.
"""

import difflib
import math

import numpy as np

from segtrain.class_weights import STRATEGIES
from segtrain.config import parse_number
from segtrain.errors import ConfigError

SECTION_KEYS = ("terms", "class_weights", "max_weight", "ignore_false_negatives")
_COMMON = {"weight": 1.0, "use_class_weights": True, "ignore_false_negatives": []}
_OVERLAP = {"smooth": 1.0, "per_image": False, "include_background": False}
TERM_DEFAULTS = {
    "cross_entropy": {"label_smoothing": 0.0},
    "cost_sensitive": {"cost_matrix": None, "fp_cost": None, "fn_cost": None},
    "focal": {"gamma": 2.0},
    "jaccard": dict(_OVERLAP),
    "dice": dict(_OVERLAP),
    "tversky": {"alpha": 0.5, "beta": 0.5, "gamma": 1.0, **_OVERLAP},
}
"""Settings of each term (besides weight, use_class_weights, ignore_false_negatives)."""

TERM_CLASS_NAMES = {
    "cross_entropy": "CrossEntropy",
    "cost_sensitive": "CostSensitiveCrossEntropy",
    "focal": "FocalLoss",
    "jaccard": "JaccardLoss",
    "dice": "DiceLoss",
    "tversky": "TverskyLoss",
}
"""Loss class (in `segtrain.losses.classes`) of each term; imported only by `build_loss`, so that
validating a config does not import TensorFlow."""


def _suggest(word, choices):
    word = str(word)
    close = difflib.get_close_matches(word, list(choices), n=1)
    close = close or [c for c in choices if word and (c.startswith(word) or word.startswith(c))]
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid: " + ", ".join(choices)


def _number(value, path, minimum=0.0, strict=False, below=None):
    number = parse_number(value)
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{path}: expected a number, got {value!r}.")
    value = number
    if value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(f"{path}: must be {bound}, got {value!r}.")
    if below is not None and value >= below:
        raise ConfigError(f"{path}: must be < {below}, got {value!r}.")
    return float(value)


def _bool(value, path):
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}.")
    return value


def _class_name(name, path, class_names):
    if name not in class_names:
        raise ConfigError(
            f"{path}: unknown class {name!r}; valid classes: {', '.join(class_names)}."
        )
    return name


def _class_list(value, path, class_names):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a list of class names, got {value!r}.")
    out = []
    for i, name in enumerate(value):
        name = _class_name(name, f"{path}[{i}]", class_names)
        if name not in out:
            out.append(name)
    return out


def _per_class(value, path, class_names, default=1.0):
    """A list of K non-negative numbers, or a {class name: number} mapping -> list of K."""
    k = len(class_names)
    if isinstance(value, dict):
        out = [default] * k
        for name, v in value.items():
            _class_name(name, f"{path}.{name}", class_names)
            out[class_names.index(name)] = _number(v, f"{path}.{name}")
        return out
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ConfigError(
                f"{path}: expected {k} values, one per class ({', '.join(class_names)}), "
                f"got {len(value)}."
            )
        return [_number(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(
        f"{path}: expected a list of {k} numbers or a mapping class name -> number, "
        f"got {value!r}."
    )


def _cost_matrix(value, path, class_names):
    k = len(class_names)
    rows_ok = isinstance(value, (list, tuple)) and len(value) == k
    if not rows_ok or not all(isinstance(r, (list, tuple)) and len(r) == k for r in value):
        raise ConfigError(
            f"{path}: expected a {k} x {k} list of rows C[true][pred] "
            f"(classes {', '.join(class_names)})."
        )
    matrix = [
        [_number(v, f"{path}[{i}][{j}]") for j, v in enumerate(row)]
        for i, row in enumerate(value)
    ]
    for i in range(k):
        if matrix[i][i] != 0:
            raise ConfigError(
                f"{path}[{i}][{i}]: the diagonal must be 0 (a correct prediction costs nothing), "
                f"got {matrix[i][i]!r}."
            )
    return matrix


def _term(raw, path, class_names):
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a loss name or a mapping with 'name', got {raw!r}.")
    name = raw.get("name")
    if name is None:
        raise ConfigError(f"{path}.name: missing; choose from {', '.join(TERM_DEFAULTS)}.")
    if name not in TERM_DEFAULTS:
        where = path if path == "loss" and set(raw) == {"name"} else f"{path}.name"
        raise ConfigError(f"{where}: unknown loss {name!r}; {_suggest(name, TERM_DEFAULTS)}")
    defaults = {**_COMMON, **TERM_DEFAULTS[name]}
    term = {"name": name, **defaults}
    for key, value in raw.items():
        if key == "name":
            continue
        key_path = f"{path}.{key}"
        if key not in defaults:
            raise ConfigError(f"{key_path}: unknown key for {name}; {_suggest(key, defaults)}")
        if key == "weight":
            value = _number(value, key_path)
        elif key in ("use_class_weights", "per_image", "include_background"):
            value = _bool(value, key_path)
        elif key == "ignore_false_negatives":
            value = _class_list(value, key_path, class_names)
        elif key == "label_smoothing":
            value = _number(value, key_path, below=1.0)
        elif key == "gamma":
            value = _number(value, key_path, strict=(name == "tversky"))
        elif key in ("alpha", "beta", "smooth"):
            value = _number(value, key_path)
        elif key == "cost_matrix":
            value = None if value is None else _cost_matrix(value, key_path, class_names)
        elif key in ("fp_cost", "fn_cost"):
            value = None if value is None else _per_class(value, key_path, class_names)
        term[key] = value
    if name == "cost_sensitive" and term["cost_matrix"] is not None:
        if term["fp_cost"] is not None or term["fn_cost"] is not None:
            raise ConfigError(
                f"{path}.cost_matrix: give either cost_matrix or fp_cost/fn_cost, not both."
            )
    if name == "tversky" and term["alpha"] + term["beta"] == 0 and term["smooth"] == 0:
        raise ConfigError(f"{path}.alpha: alpha, beta and smooth cannot all be 0.")
    return term


def normalize_loss_config(section, class_names):
    """Validate the `loss` section and return it with every default filled in.

    Args:
        section: None (default: cross_entropy), a loss name, or a mapping (see module doc).
        class_names: the K class names (K = 2 for a binary one-channel model).

    Returns:
        `{"terms": [{"name", "weight", "use_class_weights", "ignore_false_negatives",
        **settings}], "class_weights": "none" | strategy | [K numbers], "max_weight":
        float | None, "ignore_false_negatives": [names]}`. Mappings by class name become
        lists of K values. Normalising a normalised section returns it unchanged.

    Raises:
        ConfigError naming the dotted key (e.g. `loss.terms[1].alpha`) and the fix.
    """
    class_names = list(class_names)
    if section is None:
        section = {}
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict):
        raise ConfigError(
            f"loss: expected a loss name (e.g. jaccard) or a mapping with 'terms', got {section!r}."
        )
    if "name" in section and "terms" not in section:  # one term written at section level
        term = {k: v for k, v in section.items() if k not in SECTION_KEYS}
        raw_terms, paths = [term], ["loss"]
    else:
        for key in section:
            if key not in SECTION_KEYS:
                raise ConfigError(f"loss.{key}: unknown key; {_suggest(key, SECTION_KEYS)}")
        raw_terms = section.get("terms", [{"name": "cross_entropy"}])
        if not isinstance(raw_terms, (list, tuple)) or not raw_terms:
            raise ConfigError(
                "loss.terms: expected a non-empty list, e.g. [{name: cross_entropy, weight: 1.0}]."
            )
        paths = [f"loss.terms[{i}]" for i in range(len(raw_terms))]
    terms = [_term(raw, path, class_names) for raw, path in zip(raw_terms, paths)]
    if sum(t["weight"] for t in terms) <= 0:
        raise ConfigError(f"{paths[0]}.weight: at least one loss term needs a weight > 0.")
    cost_terms = [p for t, p in zip(terms, paths) if t["name"] == "cost_sensitive"]
    if len(cost_terms) > 1:
        raise ConfigError(f"{cost_terms[1]}: only one cost_sensitive term is allowed.")

    class_weights = section.get("class_weights", "none")
    if class_weights is None or class_weights == "none":
        class_weights = "none"
    elif isinstance(class_weights, str):
        if class_weights not in STRATEGIES:
            raise ConfigError(
                f"loss.class_weights: unknown strategy {class_weights!r}; "
                f"{_suggest(class_weights, STRATEGIES)} (or a list / mapping of weights)"
            )
    else:
        class_weights = _per_class(class_weights, "loss.class_weights", class_names)
    max_weight = section.get("max_weight")
    if max_weight is not None:
        max_weight = _number(max_weight, "loss.max_weight", minimum=1.0)
    ignore_fn = _class_list(
        section.get("ignore_false_negatives", []), "loss.ignore_false_negatives", class_names
    )
    return {
        "terms": terms,
        "class_weights": class_weights,
        "max_weight": max_weight,
        "ignore_false_negatives": ignore_fn,
    }


def shorthand_cost_matrix(fp_cost=None, fn_cost=None, num_classes=None):
    """The cost matrix of the `fp_cost` / `fn_cost` shorthand.

    Formula:
    ```
    C[t][p] = fn_cost[t] * fp_cost[p]   for p != t,     C[t][t] = 0
    ```
    fn_cost[c] is the price of missing c (a pixel of c predicted as anything else),
    fp_cost[c] the price of predicting c where it is not; unspecified costs are 1, so no
    costs at all give `1 - I`. For two classes set the foreground's costs:
    `C = [[0, fp_cost[fg]], [fn_cost[fg], 0]]`, i.e. fn_cost[fg] weighs positives and
    fp_cost[fg] negatives (background costs, if also given, multiply in).
    """
    k = num_classes or len(fp_cost if fp_cost is not None else fn_cost)
    fp = np.ones(k) if fp_cost is None else np.asarray(fp_cost, float)
    fn = np.ones(k) if fn_cost is None else np.asarray(fn_cost, float)
    return np.outer(fn, fp) * (1.0 - np.eye(k))


def _term_cost_matrix(term, k):
    if term["cost_matrix"] is not None:
        return np.asarray(term["cost_matrix"], float)
    return shorthand_cost_matrix(term["fp_cost"], term["fn_cost"], k)


def _ignored(loss_config, term, class_names):
    names = list(loss_config["ignore_false_negatives"]) + list(term["ignore_false_negatives"])
    return sorted({class_names.index(n) for n in names})


def cost_matrix_from_config(loss_config, class_names):
    """K x K cost matrix `C[true][pred]` of the cost_sensitive term, or None without one.

    Rows of classes in `ignore_false_negatives` (section and term) are zero: for decisions
    (`segtrain.decision`) and the expected-cost metric, as in training.
    """
    class_names = list(class_names)
    loss_config = normalize_loss_config(loss_config, class_names)
    for term in loss_config["terms"]:
        if term["name"] == "cost_sensitive":
            matrix = _term_cost_matrix(term, len(class_names))
            matrix[_ignored(loss_config, term, class_names), :] = 0.0
            return matrix
    return None


def build_loss(loss_config, class_names, class_weights=None):
    """Build the Keras loss of a (normalised) `loss` section.

    Args:
        loss_config: output of `normalize_loss_config` (normalised again here).
        class_names: the K class names.
        class_weights: resolved K weights (see `segtrain.class_weights`) or None; given to
            every term with `use_class_weights: true`.

    Returns:
        The term's loss when there is one term of weight 1, else a `CombinedLoss`.
    """
    from segtrain.losses import classes

    class_names = list(class_names)
    loss_config = normalize_loss_config(loss_config, class_names)
    k = len(class_names)
    if class_weights is not None:
        class_weights = np.asarray(class_weights, float).ravel()
        if class_weights.shape != (k,):
            raise ConfigError(
                f"loss.class_weights: expected {k} weights ({', '.join(class_names)}), "
                f"got {class_weights.size}."
            )
    terms = []
    for term in loss_config["terms"]:
        name = term["name"]
        kwargs = {k_: v for k_, v in term.items() if k_ in TERM_DEFAULTS[name]}
        if name == "cost_sensitive":
            kwargs = {"cost_matrix": _term_cost_matrix(term, k)}
        loss = getattr(classes, TERM_CLASS_NAMES[name])(
            class_weights=class_weights if term["use_class_weights"] else None,
            ignore_false_negatives=_ignored(loss_config, term, class_names),
            **kwargs,
        )
        terms.append((term["weight"], loss))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return classes.CombinedLoss(terms)
