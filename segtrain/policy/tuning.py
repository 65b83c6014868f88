"""`segtrain tune RUN`: choose a run's operating point on a labelled split, and check it on images it was not
chosen on.

What is searched, in levels (each on top of the ones before; `segtrain.policy.policy` says how each applies):
1. two classes: the foreground threshold t on q (q_fg >= t) over the 1001 edges 0, 0.001, ..., 1 of a
   `segtrain.metrics.ProbabilityHistogram`, exact at every edge; or, with `predict.prior_correction: tuned`,
   the prior-correction exponent tau over `TAU_GRID` instead. Several classes with prior_correction tuned: tau.
2. several classes with prior_correction tuned: one log-bias per class over `BIAS_GRID` (-1 .. 1 by 0.25) by
   coordinate ascent on a seeded sample of at most `BIAS_PIXELS` labelled pixels, each candidate scored by the
   objective minus `BIAS_PENALTY` x mean |b| (shrinkage toward no bias);
3. per class (the foreground for two classes, every class otherwise), post-processing
   (`segtrain.policy.postprocess`): min_size, then max_hole, over `SIZE_GRID` (`COARSE_SIZE_GRID` on splits of
   fewer than `FINE_GRID_IMAGES` images), greedily class by class; tuned sizes replace the configured
   predict.min_size / max_hole for every class.
Ties go to the candidate closest to the untuned setting (threshold 0.5, tau 0, bias 0, size 0).

How far to go is decided on held-out images: the split's images are cut into `FOLDS` contiguous folds in file
order (one image per fold below that; neighbouring files are often neighbouring video frames, which shuffled
folds would leak); for each fold every level is searched on the other folds and applied, exactly as eval
will apply it, to the fold's images. The held-out confusion matrices, summed over the folds, give each level's
cross-validated objective beside the untuned rule's on the same images. The level with the best estimate is
then searched on the whole split and written; when no level beats the untuned rule on that estimate, nothing is
written. "before" and "after" are always the exact rule eval applies, scored on every tuning image of the split
("after" is optimistic: it is scored on the images it was chosen on).

With `--holdout SHARE`, a seeded share of the split's images (`holdout_stems`: by file stem, at least one image
on each side) is set aside first and takes no part in tuning (nor in its cross-validation); the tuned record
keeps `holdout` {share, seed, images: the held-out stems, sorted}, and `segtrain eval` on that split then scores
only those images by default (`segtrain.evaluation`).

Objectives, on a confusion matrix (higher is better; ignored pixels count nowhere):
- `f1`: the foreground's F1 (two classes), else the mean F1 (Dice) over the classes present;
- `iou`: the foreground's IoU (two classes), else the mean IoU over the classes present;
- `cost`: minus the mean cost per pixel, sum_ij cm[i][j] C[i][j] / sum(cm), with C the run's decision
  cost matrix (`segtrain.decision.decision_cost_matrix`), or 1 - I (the error rate) without one.
Default: `cost` when the run has costs, else `f1` for two classes and `iou` for several.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import click
import numpy as np

from segtrain.errors import ConfigError, DataError

OBJECTIVES = ("f1", "iou", "cost")
TAU_GRID = tuple(round(0.05 * i, 2) for i in range(21))
SIZE_GRID = (0, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
COARSE_SIZE_GRID = (0, 10, 50, 200, 1000)
FINE_GRID_IMAGES = 50
BIAS_GRID = tuple(round(-1.0 + 0.25 * i, 2) for i in range(9))
BIAS_ROUNDS = 2
BIAS_PIXELS = 300_000
BIAS_PENALTY = 0.01
"""Objective points given up per unit of mean |bias| (0.01: one IoU point for a mean bias of 1)."""
FOLDS = 5
SEED = 0
"""Seed of the class biases' pixel sample."""
LEVELS = ("threshold_or_tau", "class_biases", "postprocess")
HOLDOUT_SEED = 0
"""Default seed of `--holdout`'s choice of images."""


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


def tau_confusions(probabilities: np.ndarray, truth: np.ndarray, policy, grid=TAU_GRID) -> np.ndarray:
    """(len(grid), K, K) confusion matrices of one image under prior correction with each tau, then the policy's
    rule (no post-processing)."""
    k = policy.num_classes
    out = np.zeros((len(grid), k, k), np.int64)
    for i, tau in enumerate(grid):
        candidate = replace(policy, tau=float(tau), bias=None)
        out[i] = confusion(truth, candidate.decide(candidate.scores(probabilities)), k)
    return out


def bias_search(probs: np.ndarray, truth: np.ndarray, policy, tau: float, objective: str, cost_matrix=None,
                grid=BIAS_GRID, rounds: int = BIAS_ROUNDS, penalty: float = BIAS_PENALTY) -> tuple[list[float], float]:
    """(per-class log-biases, objective) by coordinate ascent over `grid` on sampled pixels probs (N, K), truth (N,),
    on top of prior correction with `tau` and the policy's rule. Each candidate is scored by the objective minus
    `penalty` x mean |b| (shrinkage toward no bias); ties go to 0."""
    from segtrain.policy.prior import prior_adjust

    k = probs.shape[-1]
    base = prior_adjust(probs, policy.class_weights, tau)
    rule = replace(policy, tau=0.0, bias=None, class_weights=None)

    def value(bias):
        labels = rule.decide(prior_adjust(base, None, 0.0, bias))
        return objective_values(confusion(truth, labels, k), objective, cost_matrix)[0]

    bias = np.zeros(k)
    for _ in range(rounds):
        for c in range(k):
            values = []
            for g in grid:
                trial = bias.copy()
                trial[c] = g
                values.append(value(trial) - penalty * np.mean(np.abs(trial)))
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
        from segtrain.policy.postprocess import component_sizes, hole_sizes

        chosen = {}
        for cls in classes:
            min_size, _ = self._step(cls, lambda lab: component_sizes(lab == cls),
                                     lambda lab, fb, ch: np.where(ch, fb, lab).astype(np.int16))
            max_hole, _ = self._step(cls, lambda lab: hole_sizes(lab == cls),
                                     lambda lab, fb, ch: np.where(ch, cls, lab).astype(np.int16))
            chosen[cls] = (min_size, max_hole)
        return chosen


# ---------------------------------------------------------------------------- one split, searched and checked


def tuned_policy(base, tuned: dict):
    """`base` with a tuned point on top, exactly as `segtrain.policy.store.resolve_policy` applies it."""
    from segtrain.policy.store import apply_tuned

    policy = replace(base, postprocess=dict(base.postprocess))
    apply_tuned(policy, tuned, [])
    return policy


class TuningData:
    """A split's per-image statistics under the untuned policy `base`, from one pass over its logits: the exact
    confusion matrix of each image, and what the searches need (per-image histograms of q_fg, per-tau confusion
    matrices, a pixel sample of the calibrated probabilities with each pixel's image)."""

    def __init__(self, split_logits, base, search_threshold: bool, search_tau: bool, search_bias: bool):
        from segtrain.metrics import ProbabilityHistogram
        from segtrain.policy.calibration import PixelSample

        self.split, self.base, k = split_logits, base, base.num_classes
        self.search_threshold, self.search_tau, self.search_bias = search_threshold, search_tau, search_bias
        self.before, self.histograms, self.taus = [], [], []
        self.sample = PixelSample(BIAS_PIXELS, SEED) if search_bias else None
        self.pixels = 0
        for _, _, truth, logits in split_logits:
            probabilities = base.probabilities(logits)
            scores = base.scores(probabilities)
            self.before.append(confusion(truth, base.labels(scores), k))
            self.pixels += int(self.before[-1].sum())
            if search_threshold:
                histogram = ProbabilityHistogram()
                histogram.update(scores[..., 1], truth)
                self.histograms.append(histogram)
            if search_tau:
                self.taus.append(tau_confusions(probabilities, truth, base))
            if self.sample is not None:
                self.sample.add(probabilities, truth)

    @property
    def images(self) -> int:
        return len(self.before)

    def logits(self, wanted):
        """(index, truth, logits) of the images in `wanted`, in split order."""
        wanted = set(int(i) for i in wanted)
        for i, (_, _, truth, logits) in enumerate(self.split):
            if i in wanted:
                yield i, truth, logits

    def search(self, indices, objective: str, costs, postprocess: bool, grid) -> list[dict]:
        """The tuned point after each level (`LEVELS`), searched on the images `indices`."""
        from segtrain.metrics import ProbabilityHistogram

        indices = np.asarray(sorted(indices))
        tuned: dict = {}
        levels = []
        if self.search_threshold:
            total = ProbabilityHistogram()
            for i in indices:
                total.positives += self.histograms[i].positives
                total.negatives += self.histograms[i].negatives
            tuned["threshold"] = threshold_search(total, objective, costs)[0]
        elif self.search_tau:
            values = objective_values(sum(self.taus[i] for i in indices), objective, costs)
            tuned["tau"] = float(TAU_GRID[best_index(values, TAU_GRID, 0.0)])
        levels.append(dict(tuned))
        if self.search_bias:
            keep = np.isin(self.sample.groups, indices)
            tuned["bias"], _ = bias_search(self.sample.logits[keep].astype(np.float64), self.sample.labels[keep],
                                           self.base, tuned.get("tau", 0.0), objective, costs)
        levels.append(dict(tuned))
        if postprocess:
            tuned["postprocess"] = self._postprocess(indices, tuned, objective, costs, grid)
        levels.append(dict(tuned))
        return levels

    def _postprocess(self, indices, tuned: dict, objective: str, costs, grid) -> dict:
        from segtrain.policy.postprocess import second_choice

        k, classes = self.base.num_classes, self.base.classes
        policy = tuned_policy(self.base, {**tuned, "postprocess": {}})
        search = PostprocessSearch(k, objective, costs, grid)
        for _, truth, logits in self.logits(indices):
            scores = policy.scores(policy.probabilities(logits))
            labels = policy.decide(scores)
            search.add(truth, labels, second_choice(scores, labels))
        settings = search.search([1] if k == 2 else list(range(k)))
        return {classes[c]: [int(n), int(m)] for c, (n, m) in settings.items()}

    def score(self, tuned: dict, indices=None) -> np.ndarray:
        """The exact confusion matrix of the images `indices` (default: all) under `base` + `tuned`."""
        policy = tuned_policy(self.base, tuned)
        k = self.base.num_classes
        total = np.zeros((k, k), np.int64)
        for _, truth, logits in self.logits(range(self.images) if indices is None else indices):
            total += confusion(truth, policy.apply(logits)[1], k)
        return total


def fold_assignment(images: int, folds: int = FOLDS) -> np.ndarray:
    """Each image's fold (0..folds-1, at most one fold per image): contiguous blocks in the split's file order,
    sizes differing by at most one. Neighbouring files are often neighbouring frames of one video or tiles of
    one scene; shuffled folds let them leak across folds, and on CamVid that made the estimate pick class biases
    that lost on the other half of val (docs/BENCHMARKS.md)."""
    folds = min(folds, images)
    sizes = np.full(folds, images // folds) + (np.arange(folds) < images % folds)
    return np.repeat(np.arange(folds), sizes)


def cross_validate(data: TuningData, objective: str, costs, postprocess: bool, grid) -> Optional[dict]:
    """Each level's objective on held-out folds, beside the untuned rule's on the same images; None below 2 images."""
    if data.images < 2:
        return None
    fold_of = fold_assignment(data.images)
    k = data.base.num_classes
    held_out = np.zeros((len(LEVELS), k, k), np.int64)
    for fold in range(fold_of.max() + 1):
        levels = data.search(np.flatnonzero(fold_of != fold), objective, costs, postprocess, grid)
        policies = [tuned_policy(data.base, t) for t in levels]
        for _, truth, logits in data.logits(np.flatnonzero(fold_of == fold)):
            for level, policy in enumerate(policies):
                scores = policy.scores(policy.probabilities(logits))
                held_out[level] += confusion(truth, policy.labels(scores), k)
    before = objective_values(sum(data.before), objective, costs)[0]
    return {"folds": int(fold_of.max() + 1), "images": data.images, "before": float(before),
            "levels": {name: float(objective_values(cm, objective, costs)[0]) for name, cm in zip(LEVELS, held_out)}}


def searched_levels(data: TuningData, postprocess: bool) -> list[str]:
    """The levels that search something for this run (others repeat the level before)."""
    out = []
    if data.search_threshold or data.search_tau:
        out.append(LEVELS[0])
    if data.search_bias:
        out.append(LEVELS[1])
    if postprocess:
        out.append(LEVELS[2])
    return out


def choose_level(estimate: Optional[dict], candidates: list[str]) -> Optional[str]:
    """The level with the best held-out estimate when it beats the untuned rule's; else None (write nothing)."""
    if estimate is None or not candidates:
        return None
    values = np.array([estimate["levels"][name] for name in candidates], np.float64)
    values = np.nan_to_num(values, nan=-np.inf)
    best = int(np.argmax(values))  # ties: the fewest parameters (earliest level)
    return candidates[best] if values[best] > estimate["before"] else None


# ---------------------------------------------------------------------------- the command


def holdout_stems(stems: Sequence[str], share: float, seed: int = HOLDOUT_SEED, split: str = "the split") -> list[str]:
    """The stems `--holdout share` sets aside, sorted: round(share x n) images (halves up) drawn with `seed` from the
    sorted stems, so the same files, share and seed give the same images. A ConfigError (exit 2) unless
    0 < share < 1 and at least one image stays on each side."""
    if not 0.0 < float(share) < 1.0:
        raise ConfigError(f"--holdout: expected a share of the images strictly between 0 and 1, got {share!r}.")
    stems = sorted(set(str(s) for s in stems))
    n = len(stems)
    held = int(np.floor(float(share) * n + 0.5))
    if held < 1 or held > n - 1:
        raise ConfigError(f"--holdout {share:g}: {split} has {n} image{'s' if n != 1 else ''}, so it would hold out "
                          f"{held} and tune on {n - held}; at least one image is needed on each side. Choose another "
                          "share or a larger split.")
    chosen = np.random.default_rng(int(seed)).choice(n, size=held, replace=False)
    return sorted(stems[i] for i in chosen)


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
             data_root: Optional[str] = None, log=click.echo, overrides: Sequence[str] = (),
             holdout: Optional[float] = None, holdout_seed: int = HOLDOUT_SEED) -> dict:
    """`segtrain tune RUN` (`overrides`: predict.* KEY=VALUE applied to the run's config in memory): search the
    operating point on `split` (default: the run's data.val_split), check it on held-out folds, and store it in
    RUN/policy.json when it beats the untuned rule there (module docstring). `holdout`: the share of the split's
    images set aside (seeded by `holdout_seed`) for eval to report on; they take no part in tuning.
    Returns the record (with `written` False when nothing was stored)."""
    from segtrain.data.holdout import split_pairs
    from segtrain.data.masks import MaskMapping
    from segtrain.policy.predictor import Predictor, SplitLogits
    from segtrain.decision import decision_cost_matrix
    from segtrain.policy.store import StoredPolicy, read_stored, tuning_conditions, write_stored
    from segtrain.runs import resolve_checkpoint, run_config

    model_path, run_dir = resolve_checkpoint(checkpoint)
    config = run_config(run_dir, overrides)
    split = split or config.data.val_split
    data_root_given = data_root
    if data_root is not None:
        config.data.root = data_root
    classes = list(config.data.classes)
    k = len(classes)
    costs = decision_cost_matrix(config)
    objective = objective or default_objective(k, costs)
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    pairs = split_pairs(config, split, run_dir, data_root_given)
    held_out = None
    if holdout is not None:  # checked before anything loads or is written
        held_out = holdout_stems([p.stem for p in pairs], holdout, holdout_seed, repr(split))
        total, out = len(pairs), set(held_out)
        pairs = [p for p in pairs if p.stem not in out]
    predictor = Predictor.load(model_path, config, log=log, use_tuned=False)
    base = predictor.policy
    if split == config.data.val_split and held_out is None:
        log(f"warning: tuning on {split!r}, the split `segtrain eval` reports by default: eval's figures on it after "
            "tuning are optimistic (the held-out estimate below is not). Tune on another labelled split, or pass "
            "--holdout 0.5 to keep half of this one for eval, to report honestly.")
    search_tau = config.predict.prior_correction == "tuned"
    data = TuningData(SplitLogits(predictor, pairs, MaskMapping(config.data.mask, classes), "tuning"), base,
                      search_threshold=k == 2 and not search_tau, search_tau=search_tau,
                      search_bias=search_tau and k > 2)
    if data.pixels == 0:
        raise DataError(f"split {split!r}: no labelled (non-ignored) pixels to tune on.")
    grid = SIZE_GRID if data.images >= FINE_GRID_IMAGES else COARSE_SIZE_GRID
    candidates = searched_levels(data, postprocess)
    estimate = cross_validate(data, objective, costs, postprocess, grid) if candidates else None
    level = choose_level(estimate, candidates)
    before = sum(data.before)
    record = {"split": split, "objective": objective, "images": data.images, "pixels": data.pixels,
              "level": level, "estimate": estimate, "cost_matrix": None if costs is None else np.asarray(costs).tolist(),
              "searched": {"levels": candidates, "tau": list(TAU_GRID) if search_tau else None,
                           "bias": ({"grid": list(BIAS_GRID), "rounds": BIAS_ROUNDS, "penalty": BIAS_PENALTY,
                                     "pixels": int(len(data.sample.labels))} if data.search_bias else None),
                           "sizes": list(grid) if postprocess else None}}
    if held_out is not None:
        record["holdout"] = {"share": float(holdout), "seed": int(holdout_seed), "images": held_out}
    tuned, after = {}, before
    if level is not None:
        tuned = data.search(range(data.images), objective, costs, postprocess, grid)[LEVELS.index(level)]
        after = data.score(tuned)
        if objective_values(after, objective, costs)[0] < objective_values(before, objective, costs)[0]:
            level, tuned, after = None, {}, before  # never write a point worse than the untuned rule
            record["level"] = None
    record.update({key: tuned.get(key) for key in ("threshold", "tau", "bias", "postprocess")})
    record["before"], record["after"] = figures(before, classes, objective, costs), figures(after, classes, objective,
                                                                                            costs)
    if k == 2 and level is not None:
        record["foreground_cut"] = tuned_policy(base, tuned).foreground_cut()
    record["under"] = tuning_conditions(config, base.temperature, base.class_weights, base.tta)
    stored = read_stored(run_dir)
    from segtrain.policy.store import model_digest

    if stored is None or stored.model_sha256 != model_digest(model_path):
        stored = StoredPolicy.new(model_path, base.class_weights)
    stored.tuned = record if level is not None else None
    path = write_stored(stored, run_dir)
    record["written"] = level is not None
    log(format_tuning(record, classes))
    if held_out is not None:
        log(f"Held out {len(held_out)} of the {total} images of {split} (share {holdout:g}, seed {holdout_seed}); "
            + (f"`segtrain eval {run_dir} --split {split}` will report on them." if level is not None else
               "nothing was written, so eval scores every image under the untuned rule."))
    if level is not None:
        log(f"Wrote the operating point to {path}: eval, predict and export apply it (predict.tuned: false turns it "
            "off).")
    else:
        log(f"Nothing written: no tuned setting beat the untuned rule on held-out images; {path} keeps no tuned "
            "point, and eval and predict apply the untuned rule.")
    return record


def format_tuning(record: dict, classes) -> str:
    """What was chosen, the held-out estimate, and before/after lines on the tuning split."""
    chosen = []
    if record.get("threshold") is not None:
        chosen.append(f"threshold {record['threshold']:.3f} on q")
    if record.get("tau") is not None:
        cut = record.get("foreground_cut")
        chosen.append(f"prior correction tau {record['tau']:.2f}" + (f" (foreground where calibrated p >= {cut:.3f})"
                                                                     if cut is not None else ""))
    if record.get("bias") is not None and any(record["bias"]):
        chosen.append("class biases " + ", ".join(f"{n} {b:+.2f}" for n, b in zip(classes, record["bias"]) if b))
    for name, (n, m) in (record.get("postprocess") or {}).items():
        steps = ([f"remove components < {n} px"] if n else []) + ([f"fill holes < {m} px"] if m else [])
        if steps:
            chosen.append(f"{name}: {', '.join(steps)}")
    held = record.get("holdout")
    held = f", {len(held['images'])} more held out" if held else ""
    lines = [f"Tuned on {record['split']} ({record['images']} images{held}, {record['pixels']} labelled pixels) for "
             f"{record['objective']}: " + ("; ".join(chosen) if chosen else "nothing better than the untuned rule")]
    estimate = record.get("estimate")
    if estimate is not None:
        levels = ", ".join(f"{name} {value:.4f}" for name, value in estimate["levels"].items()
                           if name in record["searched"]["levels"])
        lines.append(f"Held-out estimate ({estimate['folds']}-fold over images, {record['objective']}): untuned "
                     f"{estimate['before']:.4f}; {levels}")
    elif record["searched"]["levels"]:
        lines.append("No held-out estimate: the split has fewer than 2 images; nothing is written.")
    keys = ["objective", "mean_iou", "pixel_accuracy", "mean_cost"] + (
        ["precision", "recall", "f1", "iou"] if len(classes) == 2 else [])
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines.append(f"{'on ' + record['split']:>16} {'before':>8} {'after':>8}   (after: on the images it was chosen on)")
    lines += [f"{key:>16} {fmt(record['before'][key]):>8} {fmt(record['after'][key]):>8}" for key in keys]
    never = record["after"]["classes_never_predicted"]
    if never:
        lines.append(f"never predicted: {', '.join(never)}")
    return "\n".join(lines)
