"""`segtrain eval`: whole images through the same `Predictor` as `segtrain predict` (tiled inference and
the configured decision rule), scored by one confusion matrix accumulated over the split.

Per image, eval also keeps one K x K confusion matrix (`PerImage`); these matrices sum to the
split's matrix (ignored pixels count in neither) and give `per_image.csv`, one row per image
and class, and `worst_images.png`, the k worst images.

Per-image rule for a class absent from an image's truth (the same formulas as the split's,
`segtrain.metrics.metrics_from_confusion`, on the image's own counts; an empty cell is an
undefined value, not counted in any mean):

- absent from both truth and prediction: not counted, every ratio cell empty;
- predicted but absent from the truth: IoU 0, Dice 0, precision 0, recall empty;
- present in the truth but never predicted: IoU 0, Dice 0, recall 0, precision empty.

Ranking of the worst images: an image's score is the mean IoU over the foreground classes
(every class but class 0) that count in it (present in its truth or its prediction); the
lowest score is the worst; ties keep the split's order; images where no foreground class
counts (nothing to find and nothing found) have no score and rank after every scored image.

Calibration: eval also counts every valid pixel's top-class confidence in 15 equal-width bins
(`segtrain.policy.calibration.ReliabilityBins`) for the probabilities before (T = 1) and after the
run's temperature (policy.json), both from the same logits, and reports the expected calibration error
of both (metrics.json `calibration`, printed) and their reliability diagram (`reliability.png`).

Holdout: when the tuned point in force was tuned on the split evaluated with `segtrain tune --holdout`, eval
scores only the images tune held out (policy.json `tuned.holdout.images`, by file stem) and records
`images_scored: "holdout"` in metrics.json; those figures are not optimistic. `all_images` (`--all-images`)
scores every image (`images_scored: "all"`, with the optimistic warning).

Thresholds (two classes): the best-F1 and least-cost marks of pr_curve.png and metrics.json `thresholds`
are on q, the probability the rule reads (`segtrain.policy.policy`), so `--threshold` at a mark gives
that mark's figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click
import numpy as np

from segtrain.atomic import write_csv
from segtrain.config import Config
from segtrain.data.discovery import Pair
from segtrain.data.holdout import split_pairs
from segtrain.data.masks import MaskMapping
from segtrain.errors import ConfigError
from segtrain.policy.predictor import Predictor, SplitLogits
from segtrain.policy.store import Overrides
from segtrain.runs import resolve_checkpoint, run_config


DEFAULT_WORST = 6


def per_image_rows(name: str, cm: np.ndarray, class_names) -> list[dict]:
    """The per_image.csv rows of one image from its K x K confusion matrix (rows true, columns predicted).

    One row per class: iou, dice, precision, recall (None, an empty cell, when undefined: see the
    module docstring for the absent-class rule), support (true pixels), predicted (pixels
    predicted as the class) and true_positives.
    """
    from segtrain.metrics import class_metrics

    cm = np.asarray(cm, dtype=np.int64)
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    rows = []
    for c, class_name in enumerate(class_names):
        m = class_metrics(int(tp[c]), int(predicted[c] - tp[c]), int(support[c] - tp[c]))
        rows.append({"image": name, "class": str(class_name),
                     **{key: m[key] for key in ("iou", "dice", "precision", "recall")},
                     "support": int(support[c]), "predicted": int(predicted[c]), "true_positives": int(tp[c])})
    return rows


def foreground_score(cm: np.ndarray) -> Optional[float]:
    """Mean IoU over the foreground classes (1..K-1) that count in an image (tp + fp + fn > 0); None if none does."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    counted = [c for c in range(1, len(cm)) if union[c] > 0]
    if not counted:
        return None
    return float(np.mean([tp[c] / union[c] for c in counted]))


def _rank_key(score: Optional[float], index: int):
    """Worst first: scored images by ascending score, then unscored ones; ties in split order."""
    return (score is None, 0.0 if score is None else score, index)


class PerImage:
    """Per-image confusion matrices, in the split's order, plus the `worst` lowest-ranked images' arrays
    (image, truth, prediction) for the gallery; the arrays of the others are not kept."""

    def __init__(self, class_names, worst: int = DEFAULT_WORST):
        self.class_names = [str(n) for n in class_names]
        self.worst = int(worst)
        self.names: list[str] = []
        self.matrices: list[np.ndarray] = []
        self.scores: list[Optional[float]] = []
        self._kept: list[dict] = []

    def add(self, name: str, truth: np.ndarray, labels: np.ndarray, image: Optional[np.ndarray] = None) -> np.ndarray:
        """Count one image (ignored pixels count nowhere); returns its K x K matrix."""
        from segtrain.metrics import confusion_matrix_np

        cm = confusion_matrix_np(truth, labels, len(self.class_names))
        index = len(self.names)
        score = foreground_score(cm)
        self.names.append(str(name))
        self.matrices.append(cm)
        self.scores.append(score)
        if self.worst > 0 and image is not None:
            self._kept.append({"index": index, "image_name": str(name), "score": score, "image": image,
                               "truth": np.asarray(truth), "labels": np.asarray(labels)})
            self._kept.sort(key=lambda e: _rank_key(e["score"], e["index"]))
            del self._kept[self.worst:]
        return cm

    def total(self) -> np.ndarray:
        """The sum of the per-image matrices: the split's confusion matrix."""
        k = len(self.class_names)
        return np.sum(self.matrices, axis=0, dtype=np.int64) if self.matrices else np.zeros((k, k), np.int64)

    def rows(self) -> list[dict]:
        """Every per_image.csv row: images in the split's order, classes in index order."""
        return [row for name, cm in zip(self.names, self.matrices) for row in per_image_rows(name, cm, self.class_names)]

    def ranking(self) -> list[dict]:
        """Every image worst first: [{"image", "mean_foreground_iou"}]."""
        order = sorted(range(len(self.names)), key=lambda i: _rank_key(self.scores[i], i))
        return [{"image": self.names[i], "mean_foreground_iou": self.scores[i]} for i in order]

    def worst_images(self) -> list[dict]:
        """The kept worst images, worst first: {"image_name", "score", "image", "truth", "labels"}."""
        return list(self._kept)


def evaluate_pairs(split: SplitLogits, relaxed=None, per_image: Optional[PerImage] = None, reliability=None):
    """(K x K confusion matrix, histogram of the foreground's q or None) over a split, under its predictor's policy.

    `relaxed`, a RelaxedPrecisionRecall accumulator (two classes), is fed every mask too;
    `per_image`, a `PerImage`, gets every image's matrix (and the arrays of the worst ones);
    `reliability`, a pair of `segtrain.policy.calibration.ReliabilityBins` (before, after), counts the
    uncalibrated and the calibrated probabilities of the same logits.
    """
    from segtrain.metrics import ProbabilityHistogram, confusion_matrix_np
    from segtrain.policy.temperature import apply_temperature

    policy = split.predictor.policy
    num_classes = policy.num_classes
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    histogram = ProbabilityHistogram() if num_classes == 2 else None
    for pair, image, truth, logits in split:
        probabilities = policy.probabilities(logits)
        scores = policy.scores(probabilities)
        labels = policy.labels(scores)
        if per_image is not None:
            cm += per_image.add(pair.stem, truth, labels, image)
        else:
            cm += confusion_matrix_np(truth, labels, num_classes)
        if histogram is not None:
            histogram.update(scores[..., 1], truth)
        if relaxed is not None:
            relaxed.update_labels(truth, labels)
        if reliability is not None:
            before, after = reliability
            after.update(probabilities, truth)
            before.update(apply_temperature(logits, 1.0), truth)
    return cm, histogram


def write_reports(metrics: dict, histogram, out_dir: Path, cost_matrix, per_image: Optional[PerImage] = None,
                  reliability=None, temperature=1.0) -> None:
    """per_class.csv, confusion_matrix.png, for two classes pr_curve.png, and with `per_image`
    per_image.csv and (when it kept images) worst_images.png, whose ranking goes into metrics["worst_images"];
    with `reliability` (ReliabilityBins before, after the temperature) metrics["calibration"] and reliability.png."""
    from segtrain.metrics import best_f1_threshold, least_cost_threshold, pr_curve
    from segtrain.reports import (never_predicted, plot_class_iou, plot_confusion_matrix, plot_pr_curve,
                                  plot_worst_images, write_per_class_csv)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_per_class_csv(metrics, out_dir / "per_class.csv")
    if per_image is not None:
        write_csv(per_image.rows(), out_dir / "per_image.csv")
        worst = per_image.worst_images()
        if worst:
            plot_worst_images(worst, metrics["classes"], out_dir / "worst_images.png")
            metrics["worst_images"] = [{"image": e["image_name"], "mean_foreground_iou": e["score"]} for e in worst]
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), metrics["classes"], out_dir / "confusion_matrix.png")
    metrics["never_predicted"] = never_predicted(metrics)
    if any(m["iou"] is not None for m in metrics["per_class"].values()):
        plot_class_iou(metrics, out_dir / "class_iou.png")
    if histogram is not None:
        curve = pr_curve(histogram)
        marks = {"best F1": best_f1_threshold(histogram)[0]}
        if cost_matrix is not None:
            marks["least cost"] = least_cost_threshold(histogram, float(cost_matrix[0, 1]), float(cost_matrix[1, 0]))[0]
        metrics["thresholds"] = {name: float(t) for name, t in marks.items()}
        plot_pr_curve(curve, out_dir / "pr_curve.png", marks)
    if reliability is not None:
        from segtrain.reports import plot_reliability

        before, after = reliability
        metrics["calibration"] = calibration_metrics(before, after, temperature)
        if before.count.sum() > 0:
            plot_reliability({"before (T = 1)": before.curve(), f"after (T = {temperature_text(temperature)})":
                              after.curve()},
                             out_dir / "reliability.png")


def temperature_text(temperature) -> str:
    """'0.612', or 'per class 0.5, 1.2, ...' for per-class temperatures."""
    if np.ndim(temperature) == 0:
        return f"{float(temperature):.3g}"
    return "per class " + ", ".join(f"{t:.3g}" for t in np.ravel(temperature))


def calibration_metrics(before, after, temperature) -> dict:
    """metrics.json's `calibration`: the temperature(s), ECE before and after (15 equal-width bins over the
    top-class confidence, `segtrain.policy.calibration`) and both reliability curves."""
    return {"temperature": np.asarray(temperature, float).tolist(), "ece_before": before.ece(), "ece_after": after.ece(),
            "ece_bins": before.bins, "reliability_before": before.curve(), "reliability_after": after.curve()}


def holdout_selection(tuned: Optional[dict], split: str, pairs: list[Pair], all_images: bool = False,
                      log=click.echo) -> tuple[list[Pair], Optional[dict]]:
    """(the pairs to score, metrics.json's `images_scored` fields or None). With a tuned point in force that was
    tuned on `split` with a holdout: only the held-out images, unless `all_images`; otherwise every pair."""
    from segtrain.errors import DataError

    holdout = (tuned or {}).get("holdout") if (tuned or {}).get("split") == split else None
    if not holdout:
        return pairs, None
    stems = set(holdout.get("images") or [])
    if all_images:
        return pairs, {"images_scored": "all", "holdout_images": len(stems)}
    kept = [p for p in pairs if p.stem in stems]
    if not kept:
        raise DataError(f"none of the {len(stems)} images tune held out of {split} (policy.json) are in this split "
                        "any more; --all-images scores every image, or run `segtrain tune` again.")
    log(f"Scoring the {len(kept)} images tune held out of {split} (policy.json); --all-images scores all "
        f"{len(pairs)}")
    return kept, {"images_scored": "holdout", "holdout_images": len(kept)}


def evaluate_run(model_path: Path, config: Config, pairs: list[Pair], mapping: MaskMapping, out_dir: Path,
                 split: str, overrides: Optional[Overrides] = None, relaxed_rho: Optional[float] = None,
                 log=click.echo, worst: int = DEFAULT_WORST, all_images: bool = False) -> dict:
    """Evaluate a saved model on the labelled `pairs` of `split` under its resolved policy (`overrides`: from the
    command line), print the table, write reports into out_dir; return the metrics. When the tuned point in force
    was tuned on `split` with a holdout, only the held-out images are scored unless `all_images` (module docstring)."""
    if relaxed_rho is not None and len(config.data.classes) != 2:
        raise ConfigError("--relaxed: relaxed precision and recall are defined for two classes only.")
    predictor = Predictor.load(model_path, config, overrides, log=log)
    resolved = predictor.resolved
    pairs, scored = holdout_selection(resolved.tuned if resolved is not None else None, split, pairs, all_images, log)
    log(f"Evaluating {model_path} on {split} ({len(pairs)} images)")
    return evaluate_split(SplitLogits(predictor, pairs, mapping, "evaluating"), split, out_dir, relaxed_rho, log,
                          worst, model_path, scored)


def evaluate_split(split_logits: SplitLogits, split: str, out_dir: Path, relaxed_rho: Optional[float] = None,
                   log=click.echo, worst: int = DEFAULT_WORST, model_path: Optional[Path] = None,
                   scored: Optional[dict] = None) -> dict:
    """The metrics of a split's logits under their predictor's policy, printed and written into out_dir
    (metrics.json, per_class.csv, per_image.csv, plots). `scored`: `holdout_selection`'s fields, recorded in
    metrics.json; with images_scored "holdout" the tuned-on-this-split warning does not apply."""
    from segtrain.atomic import write_json
    from segtrain.metrics import RelaxedPrecisionRecall, metrics_from_confusion
    from segtrain.policy.calibration import ReliabilityBins
    from segtrain.reports import format_metrics_table

    predictor = split_logits.predictor
    policy, classes = predictor.policy, list(predictor.config.data.classes)
    relaxed = RelaxedPrecisionRecall(relaxed_rho) if relaxed_rho is not None else None
    per_image = PerImage(classes, worst)
    reliability = (ReliabilityBins(), ReliabilityBins())
    cm, histogram = evaluate_pairs(split_logits, relaxed, per_image, reliability)
    metrics = metrics_from_confusion(cm, classes, policy.cost_matrix)
    if relaxed is not None:
        metrics["relaxed"] = relaxed.result()
    resolved = predictor.resolved
    metrics["decision"] = resolved.summary() if resolved is not None else policy.to_dict()
    tuned = resolved.tuned if resolved is not None else None
    if tuned is not None:
        metrics["operating_point"] = {k: tuned.get(k) for k in ("split", "objective", "images", "pixels")}
        if tuned.get("split") == split and (scored or {}).get("images_scored") != "holdout":
            metrics["operating_point"]["warning"] = (
                f"the operating point was tuned on {split!r}, the split scored here: these figures are optimistic; "
                "tune on another labelled split to report honestly.")
    metrics["model"] = str(model_path) if model_path is not None else None
    metrics["split"] = split
    if scored:
        metrics.update(scored)
    write_reports(metrics, histogram, out_dir, policy.cost_matrix, per_image, reliability, policy.temperature)
    log(format_metrics_table(metrics))
    log(f"Decision: {policy.describe()}")
    for source in metrics["decision"].get("sources", []):
        log(f"  from {source}")
    if "operating_point" in metrics and "warning" in metrics["operating_point"]:
        log(f"warning: {metrics['operating_point']['warning']}")
    calibration = metrics["calibration"]
    log(f"Calibration on every {split} pixel (T = {temperature_text(policy.temperature)}): ECE "
        f"{_fmt(calibration['ece_before'])} before, {_fmt(calibration['ece_after'])} after "
        f"({calibration['ece_bins']} bins)")
    if relaxed is not None:
        r = metrics["relaxed"]
        log(f"Relaxed (rho={relaxed_rho:g} px): precision {_fmt(r['precision'])}, recall {_fmt(r['recall'])}, "
            f"F1 {_fmt(r['f1'])}")
    write_json(metrics, out_dir / "metrics.json")
    return metrics


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluate_checkpoint(checkpoint: Optional[str], data_root: Optional[str], split: Optional[str],
                        out_dir: Optional[Path], decision: Optional[str] = None, threshold: Optional[float] = None,
                        relaxed_rho: Optional[float] = None, log=click.echo, worst: int = DEFAULT_WORST,
                        tta: Optional[bool] = None, overrides: Sequence[str] = (), all_images: bool = False) -> dict:
    """`segtrain eval`: metrics of a run's model on a labelled split (default: the run's data.val_split).

    Writes metrics.json, per_class.csv, per_image.csv (see the module docstring for the absent-class
    rule) and the plots, worst_images.png with the `worst` lowest-ranked images, into out_dir. `overrides`:
    `predict.*` KEY=VALUE settings applied to the run's config in memory (`segtrain.runs.run_config`).
    `all_images`: score every image even when tune held some out of this split (module docstring)."""
    model_path, run_dir = resolve_checkpoint(checkpoint)
    config = run_config(run_dir, overrides)
    if split is None:
        split = config.data.val_split
    pairs = split_pairs(config, split, run_dir, data_root)
    if data_root is not None:
        config.data.root = data_root
    mapping = MaskMapping(config.data.mask, config.data.classes)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / f"eval_{split}"
    metrics = evaluate_run(model_path, config, pairs, mapping, out_dir, split, Overrides(decision, threshold, tta),
                           relaxed_rho, log=log, worst=worst, all_images=all_images)
    metrics["data_root"] = str(config.data.root)
    from segtrain.atomic import write_json

    write_json(metrics, out_dir / "metrics.json")
    log(f"Wrote {out_dir / 'metrics.json'}, per_class.csv, per_image.csv and plots.")
    if out_dir.resolve().parent == run_dir.resolve():  # an eval folder inside the run: on the run's page
        from segtrain.html_report import write_report

        log(f"Report: {write_report(run_dir)}")
    return metrics
