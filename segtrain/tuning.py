"""`segtrain tune RUN`: choose a run's operating point on a labelled split, for an objective.

What is chosen (`segtrain.operating_point` says how each is applied):
- two classes: the foreground threshold t (p_fg >= t), over the 1001 edges 0, 0.001, ..., 1 of a
  `segtrain.metrics.ProbabilityHistogram`, exact at every edge; or, with
  `predict.prior_correction: tuned`, the prior-correction exponent tau instead (a threshold shift
  restricted to what the class weights allow, `equivalent_threshold`);
- several classes with `predict.prior_correction: tuned`: tau over `TAU_GRID` (0, 0.05, ..., 1), every
  candidate's confusion matrix accumulated in the same pass over the split; then one log-bias per class
  over `BIAS_GRID` (-1.5 .. 1.5 by 0.25), by coordinate ascent (`BIAS_ROUNDS` rounds over the classes in
  index order) on a seeded sample of at most `BIAS_PIXELS` of the split's labelled pixels;
- per class (the foreground for two classes, every class otherwise), post-processing
  (`segtrain.postprocess`): min_size over `SIZE_GRID`, then max_hole over `SIZE_GRID` given it,
  class by class in index order, each on the result of the ones before (a greedy coordinate search).
Ties go to the candidate closest to the untuned setting (threshold 0.5, tau 0, size 0).

Objectives, on the split's confusion matrix (higher is better; ignored pixels count nowhere):
- `f1`: the foreground's F1 (two classes), else the mean F1 (Dice) over the classes present;
- `iou`: the foreground's IoU (two classes), else the mean IoU over the classes present;
- `cost`: minus the mean cost per pixel, sum_ij cm[i][j] C[i][j] / sum(cm), with C the run's decision
  cost matrix (`segtrain.decision.decision_cost_matrix`), or 1 - I (the error rate) without one.
Default: `cost` when the run has costs, else `f1` for two classes and `iou` for several.

The probabilities are the run's calibrated ones (calibration.json), read through the same `Predictor`
as eval and predict, so what is tuned is exactly what they apply. Memory: histograms and confusion
matrices, plus, for the post-processing search, three small integer maps per image (truth, labels,
fallback class).
"""

from __future__ import annotations

from typing import Iterator, Optional

import click
import numpy as np

from segtrain.errors import ConfigError, DataError

OBJECTIVES = ("f1", "iou", "cost")
TAU_GRID = tuple(round(0.05 * i, 2) for i in range(21))
SIZE_GRID = (0, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
BIAS_GRID = tuple(round(-1.5 + 0.25 * i, 2) for i in range(13))
BIAS_ROUNDS = 2
BIAS_PIXELS = 1_000_000


# ---------------------------------------------------------------------------- the objectives


def default_objective(num_classes: int, cost_matrix) -> str:
    if cost_matrix is not None:
        return "cost"
    return "f1" if num_classes == 2 else "iou"


def objective_values(cms: np.ndarray, objective: str, cost_matrix=None) -> np.ndarray:
    """The objective (higher is better) of each confusion matrix in cms (n, K, K); NaN where undefined."""
    cms = np.asarray(cms, np.float64)
    if cms.ndim == 2:
        cms = cms[None]
    k = cms.shape[-1]
    if objective == "cost":
        matrix = 1.0 - np.eye(k) if cost_matrix is None else np.asarray(cost_matrix, np.float64)
        total = cms.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            return -(cms * matrix).sum(axis=(1, 2)) / total
    if objective not in ("f1", "iou"):
        raise ConfigError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    tp = np.diagonal(cms, axis1=1, axis2=2)
    fp, fn = cms.sum(axis=1) - tp, cms.sum(axis=2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = 2 * tp / (2 * tp + fp + fn) if objective == "f1" else tp / (tp + fp + fn)
    if k == 2:
        return per_class[:, 1]
    counted = (tp + fp + fn) > 0
    with np.errstate(invalid="ignore"):
        return np.where(counted.any(axis=1), np.nansum(np.where(counted, per_class, 0.0), axis=1)
                        / np.maximum(counted.sum(axis=1), 1), np.nan)


def best_index(values: np.ndarray, candidates, prefer: float) -> int:
    """Index of the highest value; ties (and an all-NaN row) go to the candidate closest to `prefer`."""
    values = np.nan_to_num(np.asarray(values, np.float64), nan=-np.inf)
    ties = np.flatnonzero(values == values.max())
    candidates = np.asarray(candidates, np.float64)
    return int(ties[np.argmin(np.abs(candidates[ties] - prefer))])


def confusion(truth: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """K x K counts (rows true, columns predicted) of the pixels whose truth is not ignored."""
    from segtrain.metrics import confusion_matrix_np

    return confusion_matrix_np(truth, labels, k)


# ---------------------------------------------------------------------------- the searches


def threshold_search(histogram, objective: str, cost_matrix=None) -> tuple[float, float, np.ndarray]:
    """(threshold, objective value, its 2 x 2 confusion matrix) at the best edge of a ProbabilityHistogram."""
    from segtrain.metrics import pr_curve

    curve = pr_curve(histogram)
    cms = np.stack([np.stack([curve["tn"], curve["fp"]], -1), np.stack([curve["fn"], curve["tp"]], -1)], axis=1)
    values = objective_values(cms, objective, cost_matrix)
    i = best_index(values, curve["thresholds"], 0.5)
    return float(curve["thresholds"][i]), float(values[i]), cms[i].astype(np.int64)


class TauSearch:
    """Streaming confusion matrices of every tau in `grid` (prior correction, then the predictor's rule)."""

    def __init__(self, predictor, grid=TAU_GRID):
        self.predictor = predictor
        self.grid = tuple(grid)
        k = len(predictor.config.data.classes)
        self.cms = np.zeros((len(self.grid), k, k), np.int64)

    def update(self, probabilities: np.ndarray, truth: np.ndarray) -> None:
        from segtrain.decision import decide
        from segtrain.operating_point import prior_adjust

        p, k = self.predictor, self.cms.shape[-1]
        for i, tau in enumerate(self.grid):
            q = prior_adjust(probabilities, p.class_weights, tau)
            self.cms[i] += confusion(truth, decide(q, p.decision, p.threshold, p.cost_matrix), k)

    def best(self, objective: str, cost_matrix=None) -> tuple[float, float, np.ndarray]:
        values = objective_values(self.cms, objective, cost_matrix)
        i = best_index(values, self.grid, 0.0)
        return float(self.grid[i]), float(values[i]), self.cms[i]


def bias_search(probs: np.ndarray, truth: np.ndarray, predictor, tau: float, objective: str, cost_matrix=None,
                grid=BIAS_GRID, rounds: int = BIAS_ROUNDS) -> tuple[list[float], float]:
    """(per-class log-biases, objective) by coordinate ascent over `grid` on sampled pixels probs (N, K), truth (N,),
    on top of the prior correction with `tau` and the predictor's rule; ties go to 0 (no bias)."""
    from segtrain.decision import decide
    from segtrain.operating_point import prior_adjust

    k = probs.shape[-1]
    base = prior_adjust(probs, predictor.class_weights, tau)

    def value(bias):
        q = prior_adjust(base, None, 0.0, bias)
        labels = decide(q, predictor.decision, predictor.threshold, predictor.cost_matrix)
        return objective_values(confusion(truth, labels, k), objective, cost_matrix)[0]

    bias = np.zeros(k)
    for _ in range(rounds):
        for c in range(k):
            values = []
            for g in grid:
                trial = bias.copy()
                trial[c] = g
                values.append(value(trial))
            bias[c] = grid[best_index(np.array(values), grid, 0.0)]
    return [float(b) for b in bias], float(value(bias))


class PostprocessSearch:
    """Greedy per-class search of (min_size, max_hole) over `SIZE_GRID` on stored label maps (module docstring).

    Each change is scored by the confusion counts of the pixels it changes only (the rest stay put)."""

    def __init__(self, num_classes: int, objective: str, cost_matrix=None, grid=SIZE_GRID):
        self.k, self.objective, self.cost_matrix, self.grid = num_classes, objective, cost_matrix, tuple(grid)
        self.images: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # truth, labels, fallback

    def add(self, truth: np.ndarray, labels: np.ndarray, fallback: np.ndarray) -> None:
        self.images.append((np.asarray(truth, np.int32), np.asarray(labels, np.int16), np.asarray(fallback, np.int16)))

    def total(self) -> np.ndarray:
        return sum((confusion(t, lab, self.k) for t, lab, _ in self.images), np.zeros((self.k, self.k), np.int64))

    def _step(self, cls: int, sizes_of, replace) -> tuple[int, np.ndarray]:
        """Best grid size for one step: sizes_of(labels) -> per-pixel sizes; replace(labels, fallback, changed) -> new."""
        base = self.total()
        deltas = np.zeros((len(self.grid), self.k, self.k), np.int64)
        sizes = [sizes_of(lab) for _, lab, _ in self.images]
        for g, limit in enumerate(self.grid):
            if limit == 0:
                continue
            for (truth, labels, fallback), size in zip(self.images, sizes):
                changed = (size > 0) & (size < limit)
                if changed.any():
                    new = replace(labels, fallback, changed)
                    deltas[g] += confusion(truth[changed], new[changed], self.k) - \
                        confusion(truth[changed], labels[changed], self.k)
        values = objective_values(base[None] + deltas, self.objective, self.cost_matrix)
        g = best_index(values, self.grid, 0.0)
        limit = self.grid[g]
        if limit > 0:
            for i, ((truth, labels, fallback), size) in enumerate(zip(self.images, sizes)):
                changed = (size > 0) & (size < limit)
                self.images[i] = (truth, replace(labels, fallback, changed), fallback)
        return int(limit), values

    def search(self, classes: list[int]) -> dict[int, tuple[int, int]]:
        """{class: (min_size, max_hole)} for `classes`, applied to the stored maps as it goes."""
        from segtrain.postprocess import component_sizes, hole_sizes

        chosen = {}
        for cls in classes:
            min_size, _ = self._step(cls, lambda lab: component_sizes(lab == cls),
                                     lambda lab, fb, ch: np.where(ch, fb, lab).astype(np.int16))
            max_hole, _ = self._step(cls, lambda lab: hole_sizes(lab == cls),
                                     lambda lab, fb, ch: np.where(ch, cls, lab).astype(np.int16))
            chosen[cls] = (min_size, max_hole)
        return chosen


# ---------------------------------------------------------------------------- the command


def _split_images(predictor, pairs, mapping, max_pixels: int, desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(calibrated probabilities, truth) of every image of the split, through the predictor."""
    from segtrain.data.scan import labelled_images

    for _, image, truth in labelled_images(pairs, mapping, predictor.channels, max_pixels, desc):
        yield predictor.probabilities(image), truth


def figures(cm: np.ndarray, class_names, objective: str, cost_matrix) -> dict:
    """The before/after summary: the objective, mean IoU, pixel accuracy, mean cost and the foreground's
    precision, recall, F1, IoU (two classes)."""
    from segtrain.metrics import metrics_from_confusion

    m = metrics_from_confusion(cm, class_names)
    out = {"objective": float(objective_values(cm, objective, cost_matrix)[0]),
           "mean_iou": m["mean_iou"], "pixel_accuracy": m["pixel_accuracy"],
           "mean_cost": -float(objective_values(cm, "cost", cost_matrix)[0]),
           "classes_never_predicted": [n for n, c in zip(class_names, np.asarray(cm).sum(axis=0)) if c == 0]}
    if len(class_names) == 2:
        fg = m["per_class"][class_names[1]]
        out.update({k: fg[k] for k in ("precision", "recall", "iou")}, f1=fg["dice"])
    return out


def tune_run(checkpoint, split: Optional[str] = None, objective: Optional[str] = None, postprocess: bool = True,
             log=click.echo) -> dict:
    """`segtrain tune RUN`: search the operating point on `split` (default: the run's data.val_split), write
    RUN/operating_point.json and return it (module docstring for what is searched)."""
    from segtrain.atomic import write_json
    from segtrain.calibration import PixelSample, model_digest
    from segtrain.data.discovery import find_pairs
    from segtrain.data.masks import MaskMapping
    from segtrain.metrics import ProbabilityHistogram
    from segtrain.operating_point import OPERATING_POINT_FILE, OperatingPoint, equivalent_threshold
    from segtrain.postprocess import second_choice
    from segtrain.predict import Predictor
    from segtrain.runs import resolve_checkpoint, run_config

    model_path, run_dir = resolve_checkpoint(checkpoint)
    config = run_config(run_dir)
    split = split or config.data.val_split
    classes = list(config.data.classes)
    k = len(classes)
    objective = objective or default_objective(k, _costs(config))
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    pairs = find_pairs(config.data.root, split)
    mapping, max_pixels = MaskMapping(config.data.mask, classes), config.data.max_image_pixels
    tune_tau = config.predict.prior_correction == "tuned"
    quiet = lambda *a, **kw: None  # noqa: E731
    base = Predictor.load(model_path, config, log=quiet, tuned=False, temperature=None)
    if tune_tau:  # search from the uncorrected probabilities, with the config's rule
        base.tau = 0.0
    costs = base.cost_matrix if base.decision == "cost" else _costs(config)
    if split == config.data.val_split:
        log(f"warning: tuning on {split!r}, the split `segtrain eval` reports by default (and fit's final "
            "evaluation used): figures on it after tuning are optimistic. Tune on another labelled split, or on "
            "half of this one, and evaluate on the rest.")

    # pass 1: the untuned figures and the threshold / tau candidates
    before = np.zeros((k, k), np.int64)
    histogram = ProbabilityHistogram() if k == 2 and not tune_tau else None
    taus = TauSearch(base) if tune_tau else None
    sample = PixelSample(BIAS_PIXELS) if tune_tau and k > 2 else None
    for probs, truth in _split_images(base, pairs, mapping, max_pixels, "tuning"):
        before += confusion(truth, base.labels(probs), k)
        if histogram is not None:
            histogram.update(base.adjusted(probs)[..., 1], truth)
        if taus is not None:
            taus.update(probs, truth)
        if sample is not None:
            sample.add(probs, truth)
    if before.sum() == 0:
        raise DataError(f"split {split!r}: no labelled (non-ignored) pixels to tune on.")
    point = OperatingPoint()
    if histogram is not None:
        point.threshold, _, after = threshold_search(histogram, objective, costs)
    elif taus is not None:
        point.tau, _, after = taus.best(objective, costs)
        if sample is not None:
            point.bias, _ = bias_search(sample.logits.astype(np.float64), sample.labels, base, point.tau, objective,
                                        costs)
    else:
        after = before

    # pass 2: the label maps at the chosen point, for the post-processing search (and the figures with biases)
    if postprocess or point.bias is not None:
        chosen = Predictor(base.model, config, log=quiet, temperature=base.temperature, operating_point=point,
                           class_weights=base.class_weights)
        chosen.postprocess = {}
        search = PostprocessSearch(k, objective, costs)
        for probs, truth in _split_images(chosen, pairs, mapping, max_pixels, "post-processing"):
            q = chosen.adjusted(probs)
            labels = chosen.labels(probs)
            search.add(truth, labels, second_choice(q, labels))
        if postprocess:
            settings = search.search([1] if k == 2 else list(range(k)))
            point.postprocess = {classes[c]: [n, m] for c, (n, m) in settings.items()}
        after = search.total()

    point.info = {
        "split": split, "objective": objective, "images": len(pairs), "model": model_path.name,
        "model_sha256": model_digest(model_path), "temperature": base.temperature,
        "prior_correction": config.predict.prior_correction,
        "equivalent_threshold": (equivalent_threshold(base.class_weights, point.tau)
                                 if k == 2 and point.tau is not None else None),
        "cost_matrix": None if costs is None else np.asarray(costs).tolist(),
        "before": figures(before, classes, objective, costs), "after": figures(after, classes, objective, costs),
        "searched": {"threshold": "edges 0, 0.001, ..., 1" if histogram is not None else None,
                     "tau": list(TAU_GRID) if taus is not None else None,
                     "bias": ({"grid": list(BIAS_GRID), "rounds": BIAS_ROUNDS, "pixels": int(len(sample.labels))}
                              if sample is not None else None),
                     "sizes": list(SIZE_GRID) if postprocess else None},
    }
    write_json(point.to_dict(), run_dir / OPERATING_POINT_FILE)
    log(format_tuning(point, classes))
    log(f"Wrote {run_dir / OPERATING_POINT_FILE}: eval and predict apply it (predict.tuned: false turns it off).")
    return point.to_dict()


def _costs(config):
    from segtrain.decision import decision_cost_matrix

    return decision_cost_matrix(config)


def format_tuning(point, classes) -> str:
    """Before/after lines on the tuning split."""
    info = point.info
    chosen = []
    if point.threshold is not None:
        chosen.append(f"threshold {point.threshold:.3f}")
    if point.tau is not None:
        extra = "" if info.get("equivalent_threshold") is None else f" (threshold {info['equivalent_threshold']:.3f})"
        chosen.append(f"prior correction tau {point.tau:.2f}{extra}")
    if point.bias is not None and any(point.bias):
        chosen.append("class biases " + ", ".join(f"{n} {b:+.2f}" for n, b in zip(classes, point.bias) if b))
    for name, (n, m) in point.postprocess.items():
        if n or m:
            chosen.append(f"{name}: remove components < {n} px, fill holes < {m} px")
    lines = [f"Tuned on {info['split']} ({info['images']} images) for {info['objective']}: "
             + ("; ".join(chosen) if chosen else "nothing better than the untuned rule")]
    keys = ["objective", "mean_iou", "pixel_accuracy", "mean_cost"] + (
        ["precision", "recall", "f1", "iou"] if len(classes) == 2 else [])
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines.append(f"{'':>16} {'before':>8} {'after':>8}")
    lines += [f"{key:>16} {fmt(info['before'][key]):>8} {fmt(info['after'][key]):>8}" for key in keys]
    never = info["after"]["classes_never_predicted"]
    if never:
        lines.append(f"never predicted after tuning: {', '.join(never)}")
    return "\n".join(lines)
