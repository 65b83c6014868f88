"""Per-epoch history of a run: history.csv, TensorBoard scalars, the curves PNG, and the best-epoch rule."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

from segtrain.atomic import write_text_atomic


def read_history(path: Path, upto_epoch: int) -> list[dict]:
    """Rows of history.csv up to an epoch (for a resumed run)."""
    if not path.is_file():
        return []
    with path.open() as handle:
        return [row for row in csv.DictReader(handle) if int(row["epoch"]) <= upto_epoch]


def write_history(rows: list[dict], path: Path) -> None:
    """history.csv from all rows, atomically; columns in order of first appearance."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = [",".join(keys)]
    for row in rows:
        lines.append(",".join(_csv_value(row.get(k)) for k in keys))
    write_text_atomic("\n".join(lines) + "\n", path)


def _csv_value(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def is_better(monitor: str, value: Optional[float], best: Optional[float]) -> bool:
    """Whether `value` of the monitored column beats `best` (lower is better for losses and costs)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    lower_is_better = "loss" in monitor or "cost" in monitor
    return value < best if lower_is_better else value > best


def write_scalars(writer, row: dict, epoch: int) -> None:
    """TensorBoard scalars through TF's own summary writer (the `tensorboard` package is only needed to view them)."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    with writer.as_default():
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                tf.summary.write(key, tf.constant(float(value)), step=epoch, metadata=metadata.SerializeToString())
    writer.flush()


def plot_history_png(rows: list[dict], path: Path) -> None:
    try:
        from segtrain.reports import plot_history
    except ImportError:
        return
    plot_history(rows, path)
