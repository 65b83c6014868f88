"""Per-epoch history of a run: history.csv, TensorBoard scalars and images, and the best-epoch rule."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

from segtrain.atomic import write_csv


def read_history(path: Path, upto_epoch: int) -> list[dict]:
    """Rows of history.csv up to an epoch (for a resumed run)."""
    if not path.is_file():
        return []
    with path.open() as handle:
        return [row for row in csv.DictReader(handle) if int(row["epoch"]) <= upto_epoch]


def write_history(rows: list[dict], path: Path) -> None:
    """history.csv from all rows, atomically; columns in order of first appearance, floats to 6 significant digits."""
    write_csv([{key: _rounded(value) for key, value in row.items()} for row in rows], path)


def _rounded(value):
    return f"{value:.6g}" if isinstance(value, float) else value


# The direction of each history column (train.py writes them; config.monitor_columns lists them), decided
# by the whole name or a fixed prefix, never by a substring: a class may be named `gloss` or `cost`.
# Lower is better only for the losses (history has no cost column; add one here if it ever gets one).
LOWER_IS_BETTER = frozenset({"loss", "val_loss"})
HIGHER_IS_BETTER = frozenset({"val_mean_iou", "val_pixel_accuracy"})
HIGHER_IS_BETTER_PREFIXES = ("val_iou_", "val_dice_")  # followed by a class name, whatever it is


def lower_is_better(monitor: str) -> bool:
    """Whether a smaller value of a history column is better, from the column's kind."""
    if monitor in LOWER_IS_BETTER:
        return True
    if monitor in HIGHER_IS_BETTER or monitor.startswith(HIGHER_IS_BETTER_PREFIXES):
        return False
    raise ValueError(f"{monitor!r} is not a history column that can be monitored")


def is_better(monitor: str, value: Optional[float], best: Optional[float]) -> bool:
    """Whether `value` of the monitored column beats `best` (lower is better for losses and costs)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if lower_is_better(monitor) else value > best


PER_CLASS_PREFIXES = ("val_iou_", "val_dice_")
"""History columns of one value per class: TensorBoard shows them as `val_iou/<class>`, one chart group per metric."""


def scalar_tag(column: str) -> str:
    """The TensorBoard tag of a history column: `val_iou_road` -> `val_iou/road`, other columns unchanged."""
    for prefix in PER_CLASS_PREFIXES:
        if column.startswith(prefix):
            return f"{prefix[:-1]}/{column[len(prefix):]}"
    return column


def write_scalars(writer, row: dict, epoch: int) -> None:
    """TensorBoard scalars through TF's own summary writer (the `tensorboard` package is only needed to view them)."""
    import tensorflow as tf

    metadata = _plugin_metadata("scalars", "DATA_CLASS_SCALAR")
    with writer.as_default():
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                tf.summary.write(scalar_tag(key), tf.constant(float(value)), step=epoch, metadata=metadata)
    writer.flush()


def write_images(writer, pictures: dict, epoch: int) -> None:
    """TensorBoard image summaries, one H x W x 3 uint8 picture per tag, as TensorBoard's image plugin stores them
    (a string tensor [width, height, PNG bytes]) without needing the `tensorboard` package to write them."""
    import tensorflow as tf

    metadata = _plugin_metadata("images", "DATA_CLASS_BLOB_SEQUENCE")
    with writer.as_default():
        for tag, picture in pictures.items():
            height, width = picture.shape[:2]
            blob = tf.stack([tf.constant(str(width)), tf.constant(str(height)), tf.io.encode_png(picture)])
            tf.summary.write(tag, blob, step=epoch, metadata=metadata)
    writer.flush()


def _plugin_metadata(plugin: str, data_class: str) -> bytes:
    """The SummaryMetadata TensorBoard's `plugin` reads (serialized)."""
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin
    metadata.data_class = getattr(summary_pb2, data_class)
    return metadata.SerializeToString()
