"""What an epoch end writes on the chief, apart from the checkpoint: history.csv and .png, last.keras, best.keras,
TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf


class EpochFiles:
    """The files an epoch end writes on the chief: history.csv and .png, last.keras, best.keras, TensorBoard."""

    def __init__(self, run_dir: Path, chief: bool, engine=None, data=None):
        """`engine` and `data` (the run's Engine and RunData) are given for a run's own epochs, None for the
        budget's timing of an epoch end in a scratch folder."""
        self.run_dir = run_dir
        self.chief = chief
        self.engine = engine
        self.data = data
        self.writer = tf.summary.create_file_writer(str(run_dir / "logs")) if chief else None

    def write(self, rows: list[dict], model, improved: bool) -> None:
        from segtrain.history import write_history, write_scalars
        from segtrain.reports import plot_history
        from segtrain.runs import save_model_atomic

        if not self.chief:
            return
        write_history(rows, self.run_dir / "history.csv")
        save_model_atomic(model, self.run_dir / "last.keras")
        if improved:
            save_model_atomic(model, self.run_dir / "best.keras")
        write_scalars(self.writer, rows[-1], int(rows[-1]["epoch"]))
        plot_history(rows, self.run_dir / "history.png")
