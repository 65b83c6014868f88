"""Reports of a run: the metrics table, the per-class CSV and PNG plots (confusion matrix, PR curve,
reliability diagram, training history, the gallery of the worst images).

Every file is written atomically (through `segtrain.atomic`: a temporary file in the same
folder, then `os.replace`), so a killed run never leaves a half-written report. Matplotlib is
imported lazily inside the plot functions (importing segtrain stays fast) and used
through its object-oriented `Figure` API with the Agg canvas: no display needed, no
global pyplot state, and no backend switch for a user who has pyplot open.
"""

import csv
import io
import math
import os

import numpy as np

from segtrain.atomic import atomic_path, write_csv
from segtrain.history import lower_is_better

CSV_COLUMNS = ("class", "iou", "dice", "precision", "recall", "support")


def _save_figure(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


# --------------------------------------------------------------------------------------
# Text and CSV
# --------------------------------------------------------------------------------------


def _fmt(value):
    return "-" if value is None else f"{value:.4f}"


def format_metrics_table(metrics):
    """An aligned per-class table followed by the overall metrics.

    Absent classes (in neither truth nor prediction) show "absent" in the IoU column
    and "-" elsewhere; any other undefined value (e.g. precision of a class never
    predicted) shows "-". Ratios have four decimals.

    Args:
        metrics: the dict from `segtrain.metrics.metrics_from_confusion`.

    Returns:
        The table as a string (no trailing newline).
    """
    header = ("Class", "IoU", "Dice", "Precision", "Recall", "Support")
    rows = []
    for name, m in metrics["per_class"].items():
        if not m["present"]:
            rows.append((name, "absent", "-", "-", "-", str(m["support"])))
        else:
            rows.append((name, _fmt(m["iou"]), _fmt(m["dice"]), _fmt(m["precision"]),
                         _fmt(m["recall"]), str(m["support"])))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join([header[0].ljust(widths[0])] + [h.rjust(w) for h, w in zip(header[1:], widths[1:])])]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
    lines.append("")
    overall = [("Mean IoU", metrics.get("mean_iou")), ("Pixel accuracy", metrics.get("pixel_accuracy")),
               ("Frequency-weighted IoU", metrics.get("frequency_weighted_iou"))]
    if "expected_cost" in metrics:
        overall.append(("Expected cost per pixel", metrics["expected_cost"]))
    label_width = max(len(label) for label, _ in overall) + 1
    for label, value in overall:
        lines.append(f"{(label + ':').ljust(label_width)} {_fmt(value)}")
    if "num_pixels" in metrics:
        lines.append(f"{'Pixels:'.ljust(label_width)} {metrics['num_pixels']}")
    never = never_predicted(metrics)
    if never:
        lines.append(f"Never predicted (in the truth, no pixel predicted as them): {', '.join(never)}")
    return "\n".join(lines)


def never_predicted(metrics):
    """Classes present in the truth that no pixel was predicted as (precision undefined, support > 0)."""
    return [name for name, m in metrics["per_class"].items() if m["support"] > 0 and m["precision"] is None]


def write_per_class_csv(metrics, path):
    """Writes `class,iou,dice,precision,recall,support`, one row per class, atomically.

    Undefined values (None) are empty cells; floats are written with full precision.
    """
    rows = [{"class": name, **{k: None if m[k] is None else float(m[k]) for k in CSV_COLUMNS[1:5]},
             "support": int(m["support"])} for name, m in metrics["per_class"].items()]
    write_csv(rows, path)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def plot_confusion_matrix(cm, class_names, path):
    """Row-normalised confusion-matrix heat map (rows true, columns predicted) as a PNG.

    Each cell shows the fraction of the true class's pixels (and the count when there
    are at most 10 classes); rows of classes absent from the truth stay empty.
    """
    cm = np.asarray(cm, dtype=np.float64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected ({k}, {k})")
    rows = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows > 0, cm / rows, np.nan)
    size = max(4.0, 0.8 * k + 2.5)
    fig = _new_figure((size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(norm), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true pixels")
    ax.set_xticks(range(k), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (row-normalised)")
    fontsize = 9 if k <= 10 else 7
    for i in range(k):
        for j in range(k):
            if np.isnan(norm[i, j]):
                continue
            text = f"{norm[i, j]:.2f}" + (f"\n({int(cm[i, j])})" if k <= 10 else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if norm[i, j] > 0.5 else "black")
    _save_figure(fig, path)


def _display_rgb(image):
    """An H x W x C image of 0..255 values as H x W x 3 uint8 for display (grey repeated, extra channels dropped)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    rgb = image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def plot_worst_images(entries, class_names, path):
    """A gallery PNG, one row per image (worst first): image | truth overlay | prediction overlay.

    Args:
        entries: dicts with "image_name", "score" (mean foreground IoU or None), "image"
            (H x W x C, 0..255), "truth" (H x W class indices, ignored pixels -1, shown grey) and
            "labels" (H x W predicted classes), as `segtrain.evaluation.PerImage.worst_images` gives.
        class_names: the K class names (class 0 untinted; the others in the colours of
            `segtrain predict --overlay`).
        path: output PNG. Its height grows with the number of rows (3 inches, 300 pixels, a row).
    """
    from segtrain.labels import IGNORE_INDEX

    if not entries:
        raise ValueError("no images to draw")
    k = len(class_names)
    fig = _new_figure((9.0, 3.0 * len(entries)))
    for row, entry in enumerate(entries):
        rgb = _display_rgb(entry["image"])
        truth = np.asarray(entry["truth"])
        ignored = truth == IGNORE_INDEX
        truth_panel = overlay(rgb, np.where(ignored, 0, truth), k)
        truth_panel[ignored] = (truth_panel[ignored] * 0.5 + 64).astype(np.uint8)
        score = entry["score"]
        shown = "no foreground" if score is None else f"fg IoU {score:.3f}"
        panels = ((rgb, f"{row + 1}. {entry['image_name']}"), (truth_panel, "truth"),
                  (overlay(rgb, np.asarray(entry["labels"]), k), f"prediction ({shown})"))
        for col, (picture, title) in enumerate(panels):
            ax = fig.add_subplot(len(entries), 3, 3 * row + col + 1)
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    fig.suptitle("Worst images (mean foreground IoU, lowest first)", fontsize=11)
    _save_figure(fig, path)


def plot_pr_curve(curve, path, marks=None):
    """Precision-recall curve as a PNG, with chosen thresholds marked.

    Args:
        curve: dict from `segtrain.metrics.pr_curve` ("thresholds", "precision", "recall").
        path: output PNG.
        marks: optional {label: threshold}; each is drawn at the curve's nearest threshold.
    """
    thresholds = np.asarray(curve["thresholds"], dtype=np.float64)
    precision = np.asarray(curve["precision"], dtype=np.float64)
    recall = np.asarray(curve["recall"], dtype=np.float64)
    fig = _new_figure((6.0, 5.0))
    ax = fig.add_subplot()
    ok = ~(np.isnan(precision) | np.isnan(recall))
    ax.plot(recall[ok], precision[ok], color="tab:blue", lw=2, label="PR curve")
    markers = "osD^v<>p*h"
    for n, (label, t) in enumerate((marks or {}).items()):
        i = int(np.argmin(np.abs(thresholds - float(t))))
        if ok[i]:
            ax.plot(recall[i], precision[i], markers[n % len(markers)], ms=9,
                    label=f"{label} (t={thresholds[i]:.3f})")
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall (foreground)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    _save_figure(fig, path)


def plot_class_iou(metrics, path):
    """Per-class IoU as horizontal bars (classes in index order, value printed on each), the mean IoU as a
    line; classes never predicted (IoU 0) are labelled so in red, absent classes are left out and named."""
    names = list(metrics["per_class"])
    iou = [metrics["per_class"][n]["iou"] for n in names]
    never = set(never_predicted(metrics))
    shown = [(n, v) for n, v in zip(names, iou) if v is not None]
    if not shown:
        raise ValueError("no class with an IoU to draw")
    fig = _new_figure((6.5, 0.4 * len(shown) + 1.5))
    ax = fig.add_subplot()
    y = np.arange(len(shown))
    colours = ["tab:red" if n in never else "tab:blue" for n, _ in shown]
    ax.barh(y, [v for _, v in shown], color=colours)
    for i, (n, v) in enumerate(shown):
        ax.text(min(v, 0.85) + 0.01, i, f"{v:.3f}" + (" never predicted" if n in never else ""), va="center",
                fontsize=8, color="tab:red" if n in never else "black", fontweight="bold" if n in never else None)
    ax.set_yticks(y, labels=[n for n, _ in shown])
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("IoU")
    if metrics.get("mean_iou") is not None:
        ax.axvline(metrics["mean_iou"], color="grey", ls="--", lw=1, label=f"mean IoU {metrics['mean_iou']:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    absent = [n for n, v in zip(names, iou) if v is None]
    ax.set_title("Per-class IoU" + (f" (absent: {', '.join(absent)})" if absent else ""))
    ax.grid(axis="x", alpha=0.3)
    _save_figure(fig, path)


def plot_reliability(curves, path):
    """Reliability diagram as a PNG: per confidence bin, mean top-class confidence vs accuracy, one curve per
    entry (e.g. before and after calibration), the diagonal (perfect calibration) and the pixels per bin.

    Args:
        curves: {label: curve}, each curve as `segtrain.policy.calibration.ReliabilityBins.curve` gives it ("edges",
            "confidence", "accuracy", "count"; None in empty bins, which are not drawn).
        path: output PNG.
    """
    if not curves:
        raise ValueError("no reliability curves to draw")
    fig = _new_figure((6.0, 6.5))
    ax = fig.add_subplot(4, 1, (1, 3))
    counts_ax = fig.add_subplot(4, 1, 4, sharex=ax)
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfectly calibrated")
    markers = "osD^v"
    first = next(iter(curves.values()))
    edges = np.asarray(first["edges"], dtype=np.float64)
    width = (edges[1] - edges[0]) / (len(curves) + 1)
    for n, (label, curve) in enumerate(curves.items()):
        conf = np.array([np.nan if v is None else v for v in curve["confidence"]], dtype=np.float64)
        acc = np.array([np.nan if v is None else v for v in curve["accuracy"]], dtype=np.float64)
        ok = ~np.isnan(conf)
        ax.plot(conf[ok], acc[ok], marker=markers[n % len(markers)], ms=5, lw=1.5, label=label)
        counts_ax.bar(edges[:-1] + (n + 0.5) * width, np.asarray(curve["count"]), width=width, align="edge",
                      label=label)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("accuracy (top class)")
    ax.set_title(f"Reliability ({len(edges) - 1} equal-width confidence bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    counts_ax.set_yscale("log")
    counts_ax.set_xlabel("confidence (top-class probability)")
    counts_ax.set_ylabel("pixels")
    counts_ax.grid(alpha=0.3)
    _save_figure(fig, path)


_NOT_PLOTTED = {"epoch", "step", "steps", "lr", "learning_rate", "time", "seconds", "epoch_time", "wall_time",
                "images_per_second"}


def _read_history(history):
    if isinstance(history, (str, os.PathLike)):
        with open(history, newline="", encoding="utf-8") as f:
            history = list(csv.DictReader(f))
    keys = dict.fromkeys(key for row in history for key in row)
    return len(history), {key: np.asarray([_number(row.get(key)) for row in history]) for key in keys}


def _number(value):
    try:
        return float(value) if value not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def plot_history(history, path):
    """Per-epoch training curves as a PNG: losses on the left, other metrics on the right.

    Args:
        history: list of per-epoch dicts, or the path of a `history.csv` with a header.
            The losses (`loss`, `val_loss`: the lower-is-better columns of
            `segtrain.history`) go to the loss panel; every other numeric column
            (val_mean_iou, val_iou_<class>, ... whatever the class is named) to the metrics
            panel, except epoch/step/lr/time bookkeeping. The x axis is the "epoch" column
            if present.
        path: output PNG.
    """
    n, columns = _read_history(history)
    if n == 0:
        raise ValueError("history is empty: nothing to plot")
    x = columns["epoch"] if "epoch" in columns and not np.all(np.isnan(columns["epoch"])) else np.arange(1, n + 1)
    plotted = {k: v for k, v in columns.items() if k not in _NOT_PLOTTED and not np.all(np.isnan(v))}
    panels = [(title, group) for title, group in _history_panels(plotted).items() if group]
    if not panels:
        raise ValueError("history has no numeric columns to plot")
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure((6.0 * len(panels), 4.5))
    for i, (title, group) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key, values in group.items():
            ax.plot(x, values, marker="o" if n <= 30 else None, ms=3, label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    _save_figure(fig, path)


def _history_panels(columns):
    """{"loss": {...}, "metrics": {...}}: columns split by their kind, never by a substring of their name."""
    panels = {"loss": {}, "metrics": {}}
    for key, values in columns.items():
        panels["loss" if _is_loss(key) else "metrics"][key] = values
    return panels


def _is_loss(column):
    try:
        return lower_is_better(column)
    except ValueError:  # not a column segtrain writes: plotted with the metrics
        return False


_COLOURS = np.array([[0, 0, 0], [255, 40, 40], [40, 200, 255], [255, 220, 0], [160, 80, 255],
                     [0, 220, 120], [255, 120, 200], [255, 150, 40]], dtype=np.float32)


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The image (its first three bands, or its first band in gray) with non-background classes tinted in distinct
    colours."""
    rgb = image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, axis=-1)  # multispectral: bands 1-3
    colours = _COLOURS[np.arange(num_classes) % len(_COLOURS)]
    tint = colours[labels]
    alpha = np.where(labels[..., None] > 0, 0.5, 0.0)
    return np.clip(rgb * (1 - alpha) + tint * alpha, 0, 255).astype(np.uint8)
