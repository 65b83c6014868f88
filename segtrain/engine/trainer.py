"""The training loop: one tf.function step run through a tf.distribute strategy.

Keras's `model.fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585),
so segtrain runs its own step: forward pass, loss in float32, loss scaling under
mixed_float16, gradient clipping, optimizer update; a validation step that
accumulates one confusion matrix over the whole split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from segtrain.config import TrainConfig
from segtrain.metrics import ConfusionMatrix, labels_from_logits


def make_schedule(train: TrainConfig, total_steps: int, steps_per_epoch: int):
    """Cosine decay (optionally after a linear warm-up) or a constant learning rate."""
    if train.schedule == "constant":
        return train.learning_rate
    warmup = int(round(train.warmup_epochs * steps_per_epoch))
    decay_steps = max(1, total_steps - warmup)
    if warmup > 0:
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=train.learning_rate * 0.01,
            decay_steps=decay_steps,
            alpha=0.01,
            warmup_target=train.learning_rate,
            warmup_steps=warmup,
        )
    return keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps, alpha=0.01)


def make_optimizer(train: TrainConfig, schedule, policy: str) -> keras.optimizers.Optimizer:
    """Adam (AdamW with weight decay), clipped by global norm; wrapped for loss scaling under float16."""
    kwargs = {"learning_rate": schedule, "global_clipnorm": train.grad_clip_norm}
    if train.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(weight_decay=train.weight_decay, **kwargs)
    else:
        optimizer = keras.optimizers.Adam(**kwargs)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


@dataclass
class StepResult:
    loss: float
    finite: bool


class Trainer:
    """Owns the distributed train and validation steps for one model, loss and optimizer."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, loss_fn, optimizer,
                 num_classes: int):
        self.strategy = strategy
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.num_classes = num_classes
        with strategy.scope():
            self.confusion = ConfusionMatrix(num_classes)
            self.val_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                            synchronization=tf.VariableSynchronization.ON_READ,
                                            aggregation=tf.VariableAggregation.SUM)
            self.val_batches = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                           synchronization=tf.VariableSynchronization.ON_READ,
                                           aggregation=tf.VariableAggregation.SUM)
        self._train_step = tf.function(self._distributed_train_step)
        self._val_step = tf.function(self._distributed_val_step)

    # ------------------------------------------------------------------ training
    def _replica_train_step(self, images, masks):
        replicas = self.strategy.num_replicas_in_sync
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            loss = tf.cast(self.loss_fn(masks, logits), tf.float32)
            scaled = loss / replicas
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                scaled = self.optimizer.scale_loss(scaled)
        variables = self.model.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return loss / replicas

    def _distributed_train_step(self, iterator):
        images, masks = next(iterator)
        per_replica = self.strategy.run(self._replica_train_step, args=(images, masks))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def train_step(self, iterator) -> StepResult:
        """One optimizer step on the next global batch; reports whether the loss is finite."""
        loss = float(self._train_step(iterator))
        return StepResult(loss, math.isfinite(loss))

    # ------------------------------------------------------------------ validation
    def _replica_val_step(self, images, masks):
        logits = self.model(images, training=False)
        loss = tf.cast(self.loss_fn(masks, logits), tf.float64)
        self.val_loss_sum.assign_add(loss)
        self.val_batches.assign_add(1.0)
        self.confusion.update_state(masks, labels_from_logits(logits))

    def _distributed_val_step(self, images, masks):
        self.strategy.run(self._replica_val_step, args=(images, masks))

    def validate(self, dataset) -> tuple[float, np.ndarray]:
        """(mean validation loss over batches, K x K confusion matrix) over a whole split."""
        self.confusion.reset_state()
        self.val_loss_sum.assign(0.0)
        self.val_batches.assign(0.0)
        for images, masks in self.strategy.experimental_distribute_dataset(dataset):
            self._val_step(images, masks)
        batches = float(self.val_batches.read_value()) if hasattr(self.val_batches, "read_value") else float(self.val_batches)
        loss = float(self.val_loss_sum.read_value()) / max(batches, 1.0)
        return loss, np.asarray(self.confusion.result()).astype(np.int64)
