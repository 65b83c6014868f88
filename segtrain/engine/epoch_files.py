"""What an epoch end writes on the chief, apart from the checkpoint: history.csv and .png, last.keras, best.keras,
TensorBoard scalars and validation pictures, and the MLflow metrics with `tracking: mlflow`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf


class EpochFiles:
    """The files an epoch end writes on the chief: history.csv and .png, last.keras, best.keras, TensorBoard, MLflow."""

    def __init__(self, run_dir: Path, chief: bool, engine=None, data=None):
        """`engine` and `data` (the run's Engine and RunData) are given for a run's own epochs, None for the
        budget's timing of an epoch end in a scratch folder (then no pictures and no tracking)."""
        import segtrain.tracking as tracking

        self.run_dir = run_dir
        self.chief = chief
        self.engine = engine
        self.data = data
        self.writer = tf.summary.create_file_writer(str(run_dir / "logs")) if chief else None
        self.pictures = ValidationPictures(engine, data) if chief and engine is not None and data is not None else None
        self.tracker = tracking.start(run_dir, engine.config) if chief and engine is not None else None

    def write(self, rows: list[dict], model, improved: bool) -> None:
        from segtrain.history import write_history, write_images, write_scalars
        from segtrain.reports import plot_history
        from segtrain.runs import save_model_atomic

        if not self.chief:
            return
        epoch = int(rows[-1]["epoch"])
        write_history(rows, self.run_dir / "history.csv")
        save_model_atomic(model, self.run_dir / "last.keras")
        if improved:
            save_model_atomic(model, self.run_dir / "best.keras")
        write_scalars(self.writer, rows[-1], epoch)
        if self.pictures is not None and "val_loss" in rows[-1]:  # a validated epoch
            write_images(self.writer, self.pictures.panels(), epoch)
        plot_history(rows, self.run_dir / "history.png")
        if self.tracker is not None:
            self.tracker.log_epochs(rows)


class ValidationPictures:
    """The first PICTURES images of the validation split (a fixed choice), each as image | truth | the model's
    prediction, decided by the validation's own rule (engine.trainer.labeler: argmax, threshold or cost)."""

    PICTURES = 3
    GAP = 2
    """White pixels between the panels."""
    LONGEST_SIDE = 512
    """A larger image is shown every n-th pixel (n the smallest that brings its longer side to at most this)."""

    def __init__(self, engine, data):
        self.engine, self.data = engine, data
        self.samples = None  # [(image, truth)], read at the first validation, when the split's cache is complete

    def panels(self) -> dict[str, np.ndarray]:
        """{"val_predictions/<i>": H x (3 W + 2 GAP) x 3 uint8} for the model as it is now."""
        if self.samples is None:
            first = self.data.val.unbatch().take(self.PICTURES)
            self.samples = [(image.numpy(), mask.numpy()) for image, mask in first]
        classes = len(self.engine.config.data.classes)
        out = {}
        for index, (image, truth) in enumerate(self.samples):
            # the padded image, as validation saw it; the padding is cut off the picture
            logits = tf.cast(self.engine.model(image[None], training=False), tf.float32)
            labels = np.asarray(self.engine.trainer.labeler(logits))[0]
            rows, cols = content_size(truth)
            every = -(-max(rows, cols) // self.LONGEST_SIDE)
            shown = np.s_[:rows:every, :cols:every]
            out[f"val_predictions/{index}"] = side_by_side(image[shown], truth[shown], labels[shown], classes, self.GAP)
        return out


def content_size(truth: np.ndarray) -> tuple[int, int]:
    """The image's size without the bottom/right padding the validation batches add (ignored mask pixels): the
    rows and columns up to the last one holding a pixel that is not ignored."""
    from segtrain.labels import IGNORE_INDEX

    valid = truth != IGNORE_INDEX
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    return (int(rows[-1]) + 1 if rows.size else truth.shape[0]), (int(cols[-1]) + 1 if cols.size else truth.shape[1])


def side_by_side(image: np.ndarray, truth: np.ndarray, labels: np.ndarray, classes: int, gap: int) -> np.ndarray:
    """image | truth (ignored pixels greyed) | prediction, with `segtrain.reports.overlay`'s colours."""
    from segtrain.labels import IGNORE_INDEX
    from segtrain.reports import overlay

    ignored = truth == IGNORE_INDEX
    plain = overlay(image, np.zeros(labels.shape, np.int64), classes)
    truth_panel = overlay(image, np.where(ignored, 0, truth), classes)
    truth_panel[ignored] = (truth_panel[ignored] * 0.5 + 64).astype(np.uint8)
    space = np.full((image.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([plain, space, truth_panel, space, overlay(image, labels, classes)], axis=1)
