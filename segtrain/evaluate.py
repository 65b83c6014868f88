"""`segtrain eval`: whole images through the same `Predictor` as `segtrain predict` (tiled inference and
the configured decision rule), scored by one confusion matrix accumulated over the split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
import numpy as np

from segtrain.config import Config
from segtrain.data.discovery import Pair, find_pairs
from segtrain.data.images import read_image
from segtrain.data.masks import MaskMapping
from segtrain.data.scan import load_mask
from segtrain.errors import ConfigError
from segtrain.predict import Predictor
from segtrain.runs import resolve_checkpoint, run_config


def evaluate_pairs(predictor: Predictor, pairs: list[Pair], mapping: MaskMapping, max_pixels: int,
                   relaxed=None):
    """(K x K confusion matrix, foreground probability histogram or None) over all pairs.

    `relaxed`, a RelaxedPrecisionRecall accumulator (two classes), is fed every mask too.
    """
    from tqdm import tqdm

    from segtrain.metrics import ProbabilityHistogram, confusion_matrix_np

    num_classes = len(predictor.config.data.classes)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    histogram = ProbabilityHistogram() if num_classes == 2 else None
    for pair in tqdm(pairs, desc="evaluating", unit="image", leave=False, disable=None):
        image = read_image(pair.image, predictor.channels, max_pixels)
        truth = load_mask(pair, mapping, max_pixels)
        probabilities = predictor.probabilities(image)
        labels = predictor.labels(probabilities)
        cm += confusion_matrix_np(truth, labels, num_classes)
        if histogram is not None:
            histogram.update(probabilities[..., 1], truth)
        if relaxed is not None:
            relaxed.update_labels(truth, labels)
    return cm, histogram


def write_reports(metrics: dict, histogram, out_dir: Path, cost_matrix) -> None:
    """per_class.csv, confusion_matrix.png and, for two classes, pr_curve.png."""
    from segtrain.metrics import best_f1_threshold, least_cost_threshold, pr_curve
    from segtrain.reports import plot_confusion_matrix, plot_pr_curve, write_per_class_csv

    out_dir.mkdir(parents=True, exist_ok=True)
    write_per_class_csv(metrics, out_dir / "per_class.csv")
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), metrics["classes"], out_dir / "confusion_matrix.png")
    if histogram is not None:
        curve = pr_curve(histogram)
        marks = {"best F1": best_f1_threshold(histogram)[0]}
        if cost_matrix is not None:
            marks["least cost"] = least_cost_threshold(histogram, float(cost_matrix[0, 1]), float(cost_matrix[1, 0]))[0]
        metrics["thresholds"] = {name: float(t) for name, t in marks.items()}
        plot_pr_curve(curve, out_dir / "pr_curve.png", marks)


def evaluate_run(model_path: Path, config: Config, pairs: list[Pair], mapping: MaskMapping, out_dir: Path,
                 decision: Optional[str] = None, threshold: Optional[float] = None,
                 relaxed_rho: Optional[float] = None, log=click.echo) -> dict:
    """Evaluate a saved model on pairs, print the table, write reports into out_dir; return the metrics."""
    from segtrain.metrics import RelaxedPrecisionRecall, metrics_from_confusion
    from segtrain.reports import format_metrics_table

    predictor = Predictor.load(model_path, config, decision, threshold, log=log)
    if relaxed_rho is not None and len(config.data.classes) != 2:
        raise ConfigError("--relaxed: relaxed precision and recall are defined for two classes only.")
    relaxed = RelaxedPrecisionRecall(relaxed_rho) if relaxed_rho is not None else None
    cm, histogram = evaluate_pairs(predictor, pairs, mapping, config.data.max_image_pixels, relaxed)
    metrics = metrics_from_confusion(cm, config.data.classes, predictor.cost_matrix)
    if relaxed is not None:
        metrics["relaxed"] = relaxed.result()
    metrics["decision"] = {"rule": predictor.decision, "threshold": predictor.threshold}
    metrics["model"] = str(model_path)
    write_reports(metrics, histogram, out_dir, predictor.cost_matrix)
    log(format_metrics_table(metrics))
    if relaxed is not None:
        r = metrics["relaxed"]
        log(f"Relaxed (rho={relaxed_rho:g} px): precision {_fmt(r['precision'])}, recall {_fmt(r['recall'])}, "
            f"F1 {_fmt(r['f1'])}")
    return metrics


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluate_checkpoint(checkpoint: Optional[str], data_root: Optional[str], split: Optional[str],
                        out_dir: Optional[Path], decision: Optional[str], threshold: Optional[float],
                        relaxed_rho: Optional[float] = None, log=click.echo) -> dict:
    """`segtrain eval`: metrics of a run's model on a labelled split (default: the run's data.val_split)."""
    from segtrain.atomic import write_json

    model_path, run_dir = resolve_checkpoint(checkpoint)
    config = run_config(run_dir)
    if split is None:
        split = config.data.val_split
    if data_root is not None:
        config.data.root = data_root
    pairs = find_pairs(config.data.root, split)
    mapping = MaskMapping(config.data.mask, config.data.classes)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / f"eval_{split}"
    metrics = evaluate_run(model_path, config, pairs, mapping, out_dir, decision, threshold, relaxed_rho, log=log)
    metrics["split"] = split
    metrics["data_root"] = str(config.data.root)
    write_json(metrics, out_dir / "metrics.json")
    log(f"Wrote {out_dir / 'metrics.json'}, per_class.csv and plots.")
    return metrics
