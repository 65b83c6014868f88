"""Training state on disk: tf.train.CheckpointManager over model, optimizer, epoch and step."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import keras
import tensorflow as tf

from segtrain.errors import CheckpointError


class TrainingState:
    """Model, optimizer and position (epoch, global step) saved together.

    The data position follows from the global step (the pipeline is seeded and
    skips `step * batch_size` elements on resume), and the random state of the
    augmentations is stateless, keyed by element index, so nothing else is needed
    to continue exactly.
    """

    def __init__(self, model: keras.Model, optimizer, directory: Path, keep: int = 3):
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch, step=self.step)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(directory), max_to_keep=keep)
        self.model = model
        self.optimizer = optimizer

    def save(self, epoch: int, step: int) -> str:
        """Write a checkpoint; TF writes the index file last, so a kill mid-write keeps the previous one."""
        self.epoch.assign(epoch)
        self.step.assign(step)
        return self.manager.save(checkpoint_number=step)

    def restore_latest(self) -> Optional[str]:
        """Restore the newest checkpoint (None if there is none); optimizer slots are built first."""
        latest = self.manager.latest_checkpoint
        if latest is None:
            return None
        self.optimizer.build(self.model.trainable_variables)
        try:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            first = str(exc).splitlines()[0][:300]
            raise CheckpointError(
                f"{latest}: checkpoint does not match this config's model ({first}). "
                "Was model.depth, model.base_filters or data.classes changed? Resume with the run's own "
                "config.yaml, or start a new run with --out."
            ) from None
        return latest
