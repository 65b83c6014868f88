"""A run's decision policy on disk (`policy.json`) and the one loader that turns it into a `DecisionPolicy`.

`policy.json` (written by fit, `segtrain calibrate` and `segtrain tune`) holds, for ONE model file (its
sha256):
- `class_weights`: the weights training applied (null when no loss term used them), which prior
  correction divides by;
- `calibration`: the temperature (one, or one per class) and how it was fitted, or null;
- `tuned`: what `segtrain tune` chose (threshold, tau, class biases, per-class post-processing), the split
  and objective, the figures, and `under`: the decision settings it was tuned under (rule, threshold,
  costs, prior_correction, tta, the configured post-processing, the temperature, the class weights).

`resolve_policy` builds the policy from the run's config.yaml `predict` section, then:
1. the calibration, unless `predict.calibrate: false`, and only for the model file it was fitted on;
2. the tuned point, unless `predict.tuned: false`, only for that model file and only when every setting in
   `under` still holds: a changed rule, prior correction, TTA, costs, configured post-processing or
   temperature makes it stale, and it is then left out with one warning naming what changed;
3. command-line overrides (`--decision`, `--threshold`, `--tta`), each reported.
The tuned post-processing (when tune searched it) replaces the configured `predict.min_size` /
`predict.max_hole` for every class: tune scored exactly that.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click
import numpy as np

from segtrain.policy.policy import DecisionPolicy
from segtrain.decision import decision_cost_matrix

POLICY_FILE = "policy.json"
LEGACY_CALIBRATION_FILE = "calibration.json"
LEGACY_OPERATING_POINT_FILE = "operating_point.json"


def model_digest(model_path: Path) -> str:
    """sha256 of a model file: a policy applies to that file only."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class StoredPolicy:
    """policy.json's content (module docstring)."""

    model: str
    model_sha256: str
    class_weights: Optional[list] = None
    calibration: Optional[dict] = None
    tuned: Optional[dict] = None
    legacy: bool = False
    """Made from an older run's calibration.json (its class weights come from class_stats.json)."""

    def to_dict(self) -> dict:
        return {"model": self.model, "model_sha256": self.model_sha256, "class_weights": self.class_weights,
                "calibration": self.calibration, "tuned": self.tuned}

    @classmethod
    def from_dict(cls, data: dict) -> "StoredPolicy":
        return cls(data.get("model"), data.get("model_sha256"), data.get("class_weights"), data.get("calibration"),
                   data.get("tuned"))

    @classmethod
    def new(cls, model_path: Path, class_weights) -> "StoredPolicy":
        return cls(Path(model_path).name, model_digest(Path(model_path)), class_weights)


def read_stored(run_dir: Path) -> Optional[StoredPolicy]:
    """RUN/policy.json, or one made from an older run's calibration.json; None when neither exists."""
    path = Path(run_dir) / POLICY_FILE
    if path.is_file():
        return StoredPolicy.from_dict(json.loads(path.read_text()))
    legacy = Path(run_dir) / LEGACY_CALIBRATION_FILE
    if legacy.is_file():
        info = json.loads(legacy.read_text())
        calibration = {"method": "scalar", **{k: v for k, v in info.items() if k not in ("model", "model_sha256")}}
        return StoredPolicy(info.get("model"), info.get("model_sha256"), None, calibration, None, legacy=True)
    return None


def write_stored(stored: StoredPolicy, run_dir: Path) -> Path:
    from segtrain.atomic import write_json

    path = Path(run_dir) / POLICY_FILE
    write_json(stored.to_dict(), path)
    return path


def trained_class_weights(config, run_dir: Path) -> Optional[list]:
    """The class weights training applied: class_stats.json's, when at least one loss term uses them; else None."""
    if not any(term.use_class_weights for term in config.loss.terms):
        return None
    path = Path(run_dir) / "class_stats.json"
    weights = json.loads(path.read_text()).get("class_weights") if path.is_file() else None
    if weights is None:
        return None
    return [1.0 if w is None else float(w) for w in weights]


def config_policy(config, class_weights, temperature=1.0, tta: Optional[bool] = None) -> DecisionPolicy:
    """The untuned policy of a config's predict section (tau 1 for prior_correction: weights, else 0)."""
    predict, classes = config.predict, list(config.data.classes)
    postprocess = {}
    for c, name in enumerate(classes):
        n, m = (predict.min_size or {}).get(name, 0), (predict.max_hole or {}).get(name, 0)
        if n > 0 or m > 0:
            postprocess[c] = (int(n), int(m))
    return DecisionPolicy(
        classes=classes, temperature=temperature, class_weights=class_weights,
        tau=1.0 if predict.prior_correction == "weights" else 0.0, rule=predict.decision,
        threshold=predict.threshold if predict.decision == "threshold" else None,
        cost_matrix=decision_cost_matrix(config), postprocess=postprocess,
        tta=predict.tta if tta is None else bool(tta))


def tuning_conditions(config, temperature, class_weights, tta: bool) -> dict:
    """The settings a tuned point depends on (`tuned.under`): the config's decision settings, TTA, the
    temperature and the class weights. JSON-ready, so a stored copy compares equal."""
    predict = config.predict
    matrix = decision_cost_matrix(config)
    return json.loads(json.dumps({
        "rule": predict.decision, "threshold": predict.threshold if predict.decision == "threshold" else None,
        "cost_matrix": None if matrix is None else np.asarray(matrix, float).tolist(),
        "prior_correction": predict.prior_correction, "tta": bool(tta),
        "min_size": predict.min_size or {}, "max_hole": predict.max_hole or {},
        "temperature": np.asarray(temperature, float).tolist(),
        "class_weights": class_weights,
    }))


def _changed(stored: dict, now: dict) -> list[str]:
    def same(a, b):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return bool(np.isclose(a, b, rtol=1e-9, atol=0.0))
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    return [f"{key} {stored.get(key)!r} -> {now.get(key)!r}" for key in now if not same(stored.get(key), now.get(key))]


@dataclass
class Overrides:
    """Command-line overrides of the decision (None: keep the run's)."""

    decision: Optional[str] = None
    threshold: Optional[float] = None
    tta: Optional[bool] = None

    def any(self) -> bool:
        return any(v is not None for v in (self.decision, self.threshold, self.tta))


@dataclass
class ResolvedPolicy:
    """A policy and where its parts came from."""

    policy: DecisionPolicy
    stored: Optional[StoredPolicy]
    tuned: Optional[dict] = None
    """The stored tuned point in force (None: not applied)."""
    sources: list = field(default_factory=list)
    """One line per part that did not come from the config: 'temperature 0.61 (policy.json, calibrated on val)'."""

    def summary(self) -> dict:
        """metrics.json `decision`: the settings, their sources and, when a tuned point is in force, its split."""
        out = self.policy.to_dict()
        out["sources"] = list(self.sources)
        if self.tuned is not None:
            out["tuned"] = {k: self.tuned.get(k) for k in ("split", "objective", "images", "pixels")}
        return out


def resolve_policy(model_path: Path, config, overrides: Optional[Overrides] = None, log=click.echo,
                   use_calibration: bool = True, use_tuned: bool = True) -> ResolvedPolicy:
    """The policy eval, predict, tune, export and the API apply for `model_path` (module docstring).

    `use_calibration` / `use_tuned` False leave that part out whatever the config says (calibrate fits from
    T = 1; tune searches from the untuned rule)."""
    model_path = Path(model_path)
    run_dir = model_path.parent
    overrides = overrides or Overrides()
    stored = read_stored(run_dir)
    if (run_dir / LEGACY_OPERATING_POINT_FILE).is_file() and not (stored and stored.tuned):
        log(f"warning: {run_dir / LEGACY_OPERATING_POINT_FILE} comes from an older segtrain and is not read; run "
            f"`segtrain tune {run_dir}` to choose the operating point again (policy.json).")
    if stored is not None and stored.model_sha256 != model_digest(model_path):
        log(f"warning: {run_dir / POLICY_FILE} belongs to another model file ({stored.model}); "
            f"{model_path.name} is used without it (T = 1, untuned). Run `segtrain calibrate {run_dir}` "
            f"(and `segtrain tune`) again.")
        stored = None
    weights = (stored.class_weights if stored is not None and not stored.legacy
               else trained_class_weights(config, run_dir))
    tta = config.predict.tta if overrides.tta is None else overrides.tta
    sources = []

    temperature = 1.0
    calibration = stored.calibration if stored is not None else None
    if use_calibration and config.predict.calibrate and calibration and np.any(np.asarray(calibration["temperature"]) != 1):
        temperature = calibration["temperature"]
        shown = (f"{temperature:.4g}" if np.ndim(temperature) == 0
                 else "per class " + ", ".join(f"{t:.3g}" for t in temperature))
        where = LEGACY_CALIBRATION_FILE if stored.legacy else POLICY_FILE
        sources.append(f"temperature {shown} ({where}, fitted on {calibration.get('split')})")
    policy = config_policy(config, weights, temperature, tta)

    tuned = stored.tuned if stored is not None else None
    in_force = None
    if use_tuned and config.predict.tuned and tuned:
        changed = _changed(tuned.get("under") or {}, tuning_conditions(config, temperature, weights, tta))
        if changed:
            log(f"warning: the tuned operating point in {run_dir / POLICY_FILE} was chosen under other settings "
                f"({'; '.join(changed)}); it is not applied. Run `segtrain tune {run_dir}` again for the new "
                "settings.")
        else:
            in_force = tuned
            apply_tuned(policy, tuned, sources)
    if use_tuned and config.predict.prior_correction == "tuned" and (in_force is None or in_force.get("tau") is None):
        log("warning: predict.prior_correction is 'tuned' but no tuned tau is in force; no correction is applied. "
            f"Run `segtrain tune {run_dir}` on a labelled split first.")
    _apply_overrides(policy, overrides, sources, config)
    own_costs = any(v is not None for v in (config.predict.fp_cost, config.predict.fn_cost, config.predict.cost_matrix))
    if policy.rule == "cost" and not own_costs:
        log("warning: decision=cost uses the cost_sensitive loss term's costs, which the model has already learnt, "
            "so they count twice; prefer argmax for a cost-trained model, or train with plain cross-entropy and "
            "set predict.fp_cost / predict.fn_cost for the decision.")
    return ResolvedPolicy(policy, stored, in_force, sources)


def apply_tuned(policy: DecisionPolicy, tuned: dict, sources: list) -> None:
    where = f"policy.json, tuned on {tuned.get('split')}"
    if tuned.get("threshold") is not None:
        policy.rule, policy.threshold = "threshold", float(tuned["threshold"])
        sources.append(f"threshold {policy.threshold:.4g} ({where})")
    if tuned.get("tau") is not None:
        policy.tau = float(tuned["tau"])
        sources.append(f"prior correction tau {policy.tau:.3g} ({where})")
    if tuned.get("bias") is not None:
        policy.bias = [float(b) for b in tuned["bias"]]
        sources.append(f"class biases ({where})")
    if tuned.get("postprocess") is not None:
        names = list(policy.classes)
        policy.postprocess = {names.index(n): (int(v[0]), int(v[1])) for n, v in tuned["postprocess"].items()
                              if n in names and (int(v[0]) > 0 or int(v[1]) > 0)}
        sources.append(f"post-processing ({where}; replaces predict.min_size / max_hole)")


def _apply_overrides(policy: DecisionPolicy, overrides: Overrides, sources: list, config) -> None:
    from segtrain.config import check_predict
    import dataclasses

    if overrides.tta is not None:
        sources.append(f"tta {'on' if overrides.tta else 'off'} (command line)")
    if overrides.decision is None and overrides.threshold is None:
        return
    before = policy.describe()
    rule = overrides.decision or ("threshold" if overrides.threshold is not None else policy.rule)
    threshold = overrides.threshold if overrides.threshold is not None else (
        policy.threshold if rule == "threshold" else None)
    check_predict(dataclasses.replace(config, predict=dataclasses.replace(config.predict, decision=rule,
                                                                          threshold=threshold)))
    policy.rule, policy.threshold = rule, threshold
    sources.append(f"rule {rule}" + (f" {threshold:.4g}" if rule == "threshold" else "")
                   + f" (command line; the run's own: {before.split(',')[0]})")
