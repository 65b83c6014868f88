"""`segtrain eval` and `segtrain predict`: whole images through tiled inference, the configured decision rule,
and per-class results from one confusion matrix accumulated over the split.

Eval and predict share `predict_labels`, so the masks predict writes are exactly the
ones eval scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
import numpy as np

from segtrain.config import Config, load_config
from segtrain.data.discovery import IMAGE_SUFFIXES, Pair, find_pairs
from segtrain.data.images import read_image, write_png_atomic
from segtrain.data.masks import MaskMapping
from segtrain.data.scan import load_mask
from segtrain.errors import CheckpointError, ConfigError, DataError  # noqa: F401
from segtrain.runs import load_model, resolve_checkpoint


def run_config(run_dir: Path) -> Config:
    """The resolved config a run saved."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: no config.yaml beside the model; eval and predict need the run's config "
            "(class names, mask encoding). Point --checkpoint at a run folder made by `segtrain fit`."
        )
    return load_config(path)


def tile_size(config: Config) -> int:
    """predict.tile_size, or twice the training crop, or 512; a multiple of 2**depth."""
    divisor = 2**config.model.depth
    size = config.predict.tile_size or (2 * config.data.crop if config.data.crop else 512)
    return max(divisor, size // divisor * divisor)


class Predictor:
    """A loaded model plus the decision rule: image array in, class-index mask out."""

    def __init__(self, model, config: Config, decision: Optional[str] = None, threshold: Optional[float] = None,
                 tta: Optional[bool] = None, log=click.echo):
        import dataclasses

        from segtrain.config import _check_predict, decision_cost_matrix

        self.model = model
        self.channels = int(model.input_shape[-1])
        predict = dataclasses.replace(
            config.predict,
            decision=decision or config.predict.decision,
            threshold=threshold if threshold is not None else config.predict.threshold,
            tta=config.predict.tta if tta is None else tta,
        )
        self.config = dataclasses.replace(config, predict=predict)
        _check_predict(self.config)  # command-line overrides get the config's checks
        self.decision, self.threshold, self.tta = predict.decision, predict.threshold, predict.tta
        self.cost_matrix = decision_cost_matrix(self.config)
        own_costs = any(v is not None for v in (predict.fp_cost, predict.fn_cost, predict.cost_matrix))
        if self.decision == "cost" and not own_costs:
            log("warning: decision=cost uses the cost_sensitive loss term's costs, which the model has already "
                "learnt, so they count twice; prefer argmax for a cost-trained model, or train with plain "
                "cross-entropy and set predict.fp_cost / predict.fn_cost for the decision.")

    def probabilities(self, image: np.ndarray, progress: bool = False) -> np.ndarray:
        """Class probabilities H x W x K at the image's own size (resized like training when data.resize is set)."""
        from segtrain.inference import predict_probabilities

        resize = self.config.data.resize
        height, width = image.shape[:2]
        if resize is not None:
            import tensorflow as tf

            image = tf.image.resize(image, resize, method="bilinear").numpy()
        probabilities = predict_probabilities(
            self.model, image, tile_size(self.config), overlap=self.config.predict.overlap,
            batch_size=self.config.predict.batch_size, tta=self.tta, divisor=2**self.config.model.depth,
            progress=progress,
        )
        if resize is not None:
            import tensorflow as tf

            probabilities = tf.image.resize(probabilities, (height, width), method="bilinear").numpy()
        return probabilities

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        from segtrain.decision import decide

        return decide(probabilities, self.decision, threshold=self.threshold, cost_matrix=self.cost_matrix)


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

    model = load_model(model_path)
    _check_model_matches(model, config, model_path)
    predictor = Predictor(model, config, decision, threshold)
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
    return "-" if value is None or value != value else f"{value:.4f}"


def _check_model_matches(model, config: Config, model_path: Path) -> None:
    from segtrain.model import output_channels

    expected = output_channels(len(config.data.classes))
    actual = int(model.output_shape[-1])
    if actual != expected:
        raise CheckpointError(
            f"{model_path}: the model has {actual} output channel(s) but the config names "
            f"{len(config.data.classes)} classes (needs {expected}). Use the run's own config."
        )


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files from the arguments (files or folders, folders not recursed), sorted, no duplicates."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not a supported image ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder.")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise DataError(f"no images found in {', '.join(inputs)}.")
    return unique


def predict_images(images: list[Path], checkpoint: Optional[str], out_dir: Optional[Path],
                   decision: Optional[str], threshold: Optional[float], tta: Optional[bool],
                   probabilities: bool, overlay: bool, log=click.echo) -> Path:
    """Write one mask per image (same stem, same size, training encoding) into out_dir."""
    from tqdm import tqdm

    model_path, run_dir = resolve_checkpoint(checkpoint)
    config = run_config(run_dir)
    model = load_model(model_path)
    _check_model_matches(model, config, model_path)
    predictor = Predictor(model, config, decision, threshold, tta)
    mapping = MaskMapping(config.data.mask, config.data.classes)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "predictions"
    stems = [p.stem for p in images]
    duplicated = {s for s in stems if stems.count(s) > 1}
    if duplicated:
        raise DataError(f"several input images share the stem {sorted(duplicated)[0]!r}; their masks would collide.")
    input_folders = {p.resolve().parent for p in images}
    if out_dir.resolve() in input_folders:
        raise DataError(f"{out_dir}: this folder holds input images; write the masks elsewhere with --out.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in tqdm(images, desc="predicting", unit="image", disable=None):
        target = out_dir / f"{path.stem}.png"
        image = read_image(path, predictor.channels, config.data.max_image_pixels)
        probs = predictor.probabilities(image)
        labels = predictor.labels(probs)
        write_png_atomic(mapping.encode(labels), target)
        if probabilities:
            for cls, name in enumerate(config.data.classes):
                if len(config.data.classes) == 2 and cls == 0:
                    continue
                write_png_atomic(np.round(probs[..., cls] * 255).astype(np.uint8), out_dir / f"{path.stem}_prob_{name}.png")
        if overlay:
            write_png_atomic(_overlay(image, labels, len(config.data.classes)), out_dir / f"{path.stem}_overlay.png")
    log(f"Wrote {len(images)} mask(s) to {out_dir} (model {model_path}, decision {predictor.decision}).")
    return out_dir


_COLOURS = np.array([[0, 0, 0], [255, 40, 40], [40, 200, 255], [255, 220, 0], [160, 80, 255],
                     [0, 220, 120], [255, 120, 200], [255, 150, 40]], dtype=np.float32)


def _overlay(image: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The image with non-background classes tinted in distinct colours."""
    rgb = image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
    colours = _COLOURS[np.arange(num_classes) % len(_COLOURS)]
    tint = colours[labels]
    alpha = np.where(labels[..., None] > 0, 0.5, 0.0)
    return np.clip(rgb * (1 - alpha) + tint * alpha, 0, 255).astype(np.uint8)


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
