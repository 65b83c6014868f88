"""Training state on disk: tf.train.CheckpointManager over everything a run needs to continue exactly."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import keras
import tensorflow as tf

from segtrain.engine.state import LoopState
from segtrain.errors import CheckpointError


def seed_generator_states(model: keras.Model) -> list:
    """The state variables of the model's random-seed generators (dropout).

    tf.train.Checkpoint does not reach them through the model, so they are saved explicitly.
    """
    return [v for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]


class TrainingState:
    """Model, optimizer, position and bookkeeping saved together in one checkpoint.

    Saved: model weights (BatchNorm statistics included), the dropout seed-generator
    states, the optimizer (iterations, moments, learning rate, loss scale), the epochs
    completed and the global step, the running loss of a partly done epoch, the best
    value of the monitored metric and its epoch, and the reduce-on-plateau state
    (learning-rate scale, epochs without improvement). The data position follows from
    the global step (the pipeline is seeded and skips `step * batch_size` elements on
    resume) and the augmentations are stateless, keyed by element index.

    Checkpoints are read from `directory`; they are written there too, except on a
    non-chief worker of a multi-worker run, which takes part in the (collective) save
    into a temporary folder that is deleted right after (TensorFlow's pattern).
    """

    def __init__(self, model: keras.Model, optimizer, directory: Path, keep: int = 3, writer: bool = True,
                 lr_scale: Optional[tf.Variable] = None):
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.epoch_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_loss_sum")
        self.epoch_loss_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_loss_steps")
        self.best = tf.Variable(float("nan"), dtype=tf.float64, trainable=False, name="best")
        self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="best_epoch")
        self.lr_scale = lr_scale if lr_scale is not None else tf.Variable(1.0, dtype=tf.float32, trainable=False,
                                                                         name="lr_scale")
        self.plateau_wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="plateau_wait")
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, seed_states=seed_generator_states(model),
            epoch=self.epoch, step=self.step, epoch_loss_sum=self.epoch_loss_sum,
            epoch_loss_steps=self.epoch_loss_steps, best=self.best, best_epoch=self.best_epoch,
            lr_scale=self.lr_scale, plateau_wait=self.plateau_wait,
        )
        self.directory = Path(directory)
        self.writer = writer
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(directory), max_to_keep=keep) if writer else None
        self.model = model
        self.optimizer = optimizer

    def save(self, epoch: int, step: int) -> str:
        """Write a checkpoint of the current state at (epochs completed, global step); returns its path.

        TF writes the data files, then the index, then updates the `checkpoint` state file
        atomically, so a kill mid-write leaves the previous checkpoint as the latest one.
        """
        self.epoch.assign(epoch)
        self.step.assign(step)
        if self.writer:
            return self.manager.save(checkpoint_number=step)
        scratch = tempfile.mkdtemp(prefix="segtrain-worker-ckpt-")
        try:
            manager = tf.train.CheckpointManager(self.checkpoint, scratch, max_to_keep=1)
            return manager.save(checkpoint_number=step)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def save_loop(self, loop: LoopState) -> str:
        """Write a checkpoint of the model, the optimizer and where the loop is."""
        self.epoch_loss_sum.assign(loop.loss_sum)
        self.epoch_loss_steps.assign(loop.loss_steps)
        self.best.assign(float("nan") if loop.best is None else loop.best)
        self.best_epoch.assign(loop.best_epoch)
        return self.save(loop.epoch, loop.global_step)

    def loop_state(self, monitor: str, steps_per_epoch: int, rows: list,
                   total_steps: Optional[int] = None) -> LoopState:
        """The LoopState of the restored checkpoint (call after `restore_latest`), with the history `rows`."""
        loop = LoopState(monitor, steps_per_epoch, epoch=int(self.epoch.numpy()), global_step=int(self.step.numpy()),
                         best=self.best_value, best_epoch=int(self.best_epoch.numpy()), rows=rows,
                         total_steps=total_steps)
        if loop.step_in_epoch > 0:  # killed mid-epoch: the running loss of the steps already done
            loop.loss_sum = float(self.epoch_loss_sum.numpy())
            loop.loss_steps = int(self.epoch_loss_steps.numpy())
        return loop

    def latest(self) -> Optional[str]:
        """Path of the newest complete checkpoint in `directory` (per its state file), or None."""
        return tf.train.latest_checkpoint(str(self.directory))

    def restore_latest(self) -> Optional[str]:
        """Restore the newest checkpoint (None if there is none); optimizer slots are built first."""
        latest = self.latest()
        if latest is None:
            return None
        if not self.optimizer.built:
            self.optimizer.build(self.model.trainable_variables)
        status = None
        try:
            status = self.checkpoint.restore(latest)
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            if status is not None:
                status.expect_partial()  # no "unrestored values" warning at exit: the error says it all
            first = str(exc).splitlines()[0][:300]
            raise CheckpointError(
                f"{latest}: checkpoint does not match this config's model ({first}). "
                "Was model.depth, model.base_filters, model.encoder or data.classes changed? Resume with the run's "
                "own config.yaml, or start a new run with --out."
            ) from None
        return latest

    @property
    def best_value(self) -> Optional[float]:
        value = float(self.best.numpy())
        return None if math.isnan(value) else value
