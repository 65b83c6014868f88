"""The training loop: one tf.function step run through a tf.distribute strategy.

Keras's `model.fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585),
so segtrain runs its own step: forward pass, loss in float32, loss scaling under
mixed_float16, gradient clipping by the norm of the *global* gradient, optimizer
update; a validation step that accumulates one confusion matrix over the whole split.

Distribution convention (Keras's): inside a tf.distribute replica a loss returns that
replica's *share* of the global-batch loss, so summing the replicas' losses (and their
gradients, which the optimizer all-reduces) gives the loss of the global batch. segtrain's
losses make this exact (`segtrain.losses.classes`): per-pixel terms divide by the valid
pixels of the global batch and overlap terms (Jaccard, Dice, Tversky) sum their soft counts
over the replicas before the ratio, so N replicas train exactly as one device on the same
global batch, up to float32 summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from segtrain.config import TrainConfig
from segtrain.losses.functional import replica_sum
from segtrain.metrics import ConfusionMatrix, labels_from_logits

WARMUP_START = 0.01
"""Warm-up starts at this fraction of train.learning_rate and rises linearly to it."""


@keras.saving.register_keras_serializable(package="segtrain")
class ScaledWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """A constant learning rate times a scale variable, after an optional linear warm-up.

    Formula:
    ```
    lr(step) = learning_rate * scale * ramp(step)
    ramp(step) = WARMUP_START + (1 - WARMUP_START) * min(step, warmup_steps) / warmup_steps   (1 without warm-up)
    ```

    `scale` is a variable that reduce-on-plateau lowers between epochs; it lives in the
    checkpoint, so a resumed run continues with the reduced rate.

    Args:
        learning_rate: the base rate (train.learning_rate).
        warmup_steps: steps of linear warm-up (0: none).
        scale: a scalar float32 variable (or None for 1).
    """

    def __init__(self, learning_rate: float, warmup_steps: int = 0, scale: Optional[tf.Variable] = None):
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.scale = scale

    def __call__(self, step):
        lr = tf.constant(self.learning_rate, tf.float32)
        if self.scale is not None:
            lr = lr * tf.cast(tf.convert_to_tensor(self.scale), tf.float32)
        if self.warmup_steps > 0:
            progress = tf.minimum(tf.cast(step, tf.float32), float(self.warmup_steps)) / float(self.warmup_steps)
            lr = lr * (WARMUP_START + (1.0 - WARMUP_START) * progress)
        return lr

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}


def make_schedule(train: TrainConfig, total_steps: int, steps_per_epoch: int, lr_scale: Optional[tf.Variable] = None):
    """The learning rate as a function of the optimizer step.

    cosine: linear warm-up from 1% of train.learning_rate over train.warmup_epochs, then
    cosine decay to 1% at the last step. constant: the rate (after the same warm-up).
    plateau: like constant, times `lr_scale`, which `PlateauState` lowers by
    train.plateau_factor when the monitored metric stalls for train.plateau_patience
    validated epochs.
    """
    warmup = int(round(train.warmup_epochs * steps_per_epoch))
    if train.schedule == "cosine":
        decay_steps = max(1, total_steps - warmup)
        if warmup > 0:
            return keras.optimizers.schedules.CosineDecay(
                initial_learning_rate=train.learning_rate * WARMUP_START,
                decay_steps=decay_steps,
                alpha=0.01,
                warmup_target=train.learning_rate,
                warmup_steps=warmup,
            )
        return keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps, alpha=0.01)
    return ScaledWarmup(train.learning_rate, warmup, lr_scale if train.schedule == "plateau" else None)


def make_optimizer(train: TrainConfig, schedule, policy: str) -> keras.optimizers.Optimizer:
    """Adam (AdamW with weight decay); wrapped for dynamic loss scaling under float16.

    Gradient clipping is done by `Trainer` (on the all-reduced gradient), not by the
    optimizer: Keras clips each replica's share before the all-reduce.
    """
    if train.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=train.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=schedule)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer) -> float:
    """The learning rate the next step will use."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


class PlateauState:
    """Reduce-on-plateau bookkeeping over checkpointed variables (scale, epochs without improvement)."""

    def __init__(self, train: TrainConfig, lr_scale: tf.Variable, wait: tf.Variable):
        self.factor = train.plateau_factor
        self.patience = train.plateau_patience
        self.min_scale = train.plateau_min_learning_rate / train.learning_rate
        self.lr_scale = lr_scale
        self.wait = wait

    def update(self, improved: bool) -> Optional[float]:
        """Call after each validated epoch; returns the new scale when the rate was lowered."""
        if improved:
            self.wait.assign(0)
            return None
        self.wait.assign_add(1)
        if int(self.wait.numpy()) < self.patience:
            return None
        self.wait.assign(0)
        old = float(self.lr_scale.numpy())
        new = max(old * self.factor, self.min_scale)
        if new >= old * (1 - 1e-6):  # already at the minimum (the scale is stored in float32)
            return None
        self.lr_scale.assign(new)
        return new


@dataclass
class StepResult:
    loss: float
    finite: bool


def logits_labeler(rule: str, threshold: Optional[float] = None, cost_matrix=None):
    """Logits -> int32 labels by the decision rule of eval/predict (argmax, cost or threshold)."""
    if rule == "argmax":
        return labels_from_logits
    from segtrain.decision import decide_tf

    def labeler(logits):
        logits = tf.cast(logits, tf.float32)
        probs = tf.sigmoid(logits) if logits.shape[-1] == 1 else tf.nn.softmax(logits, axis=-1)
        return tf.cast(decide_tf(probs, rule, threshold, cost_matrix), tf.int32)

    return labeler


class Trainer:
    """Owns the distributed train and validation steps for one model, loss and optimizer."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, loss_fn, optimizer,
                 num_classes: int, grad_clip_norm: Optional[float] = None, labeler=None):
        """`labeler` turns logits into class labels for validation (default: argmax / sigmoid >= 0.5);
        `logits_labeler` builds one from the config's decision rule."""
        self.labeler = labeler or labels_from_logits
        self.strategy = strategy
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.num_classes = num_classes
        self.grad_clip_norm = grad_clip_norm
        with strategy.scope():
            if not optimizer.built:  # before tracing: LossScaleOptimizer reads its scale variable only once built
                optimizer.build(model.trainable_variables)
            self.confusion = ConfusionMatrix(num_classes)
            self.val_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                            synchronization=tf.VariableSynchronization.ON_READ,
                                            aggregation=tf.VariableAggregation.SUM)
            self.val_images = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                          synchronization=tf.VariableSynchronization.ON_READ,
                                          aggregation=tf.VariableAggregation.SUM)
        self._train_step = tf.function(self._distributed_train_step)
        self._val_step = tf.function(self._distributed_val_step)
        self._weights_finite = tf.function(self._all_weights_finite)
        self._multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self._count_stops = tf.function(self._distributed_count_stops)

    # ------------------------------------------------------------------ training
    def _clip(self, grads):
        """Clip by the global norm of the gradient of the whole global batch (all replicas summed)."""
        replicas = self.strategy.num_replicas_in_sync
        if replicas > 1:
            # The optimizer all-reduces (sums) again: hand it each replica's equal share.
            grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        clip = self.grad_clip_norm
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            clip = clip * tf.cast(tf.convert_to_tensor(self.optimizer.dynamic_scale), tf.float32)
        grads, _ = tf.clip_by_global_norm(grads, clip)
        if replicas > 1:
            grads = [g / replicas for g in grads]
        return grads

    def _replica_train_step(self, images, masks):
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            loss = tf.cast(self.loss_fn(masks, tf.cast(logits, tf.float32)), tf.float32)
            scaled = loss
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                scaled = self.optimizer.scale_loss(loss)
        variables = self.model.trainable_variables
        grads = tape.gradient(scaled, variables)
        if self.grad_clip_norm:
            grads = self._clip(grads)
        self.optimizer.apply_gradients(zip(grads, variables))
        return loss

    def _distributed_train_step(self, iterator):
        images, masks = next(iterator)
        per_replica = self.strategy.run(self._replica_train_step, args=(images, masks))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def train_step(self, iterator) -> StepResult:
        """One optimizer step on the next global batch; reports the loss (before the update) and whether it is finite."""
        loss = float(self._train_step(iterator))
        return StepResult(loss, math.isfinite(loss))

    def _all_weights_finite(self):
        values = [tf.convert_to_tensor(v) for v in self.model.weights]
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(x)) for x in values if x.dtype.is_floating])

    def weights_finite(self) -> bool:
        """True when every model weight is finite (checked before a checkpoint is written)."""
        return bool(self._weights_finite())

    def _distributed_count_stops(self, flag):
        per_replica = self.strategy.run(tf.identity, args=(flag,))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def stop_agreed(self, local: bool) -> bool:
        """Whether any worker asked to stop (SIGINT/SIGTERM), so that all stop and checkpoint at the same step.

        Off multi-worker this is just `local`; on it, one scalar all-reduce per step.
        """
        if not self._multi_worker:
            return local
        return float(self._count_stops(tf.constant(1.0 if local else 0.0))) > 0

    # ------------------------------------------------------------------ validation
    def _replica_val_step(self, images, masks):
        logits = self.model(images, training=False)
        # This replica's share of the batch's loss (see the module docstring); the shares sum to it.
        share = tf.cast(self.loss_fn(masks, tf.cast(logits, tf.float32)), tf.float64)
        count = tf.cast(tf.shape(images)[0], tf.float64)
        batch_images = replica_sum(count)
        self.val_loss_sum.assign_add(share * batch_images)  # summed over replicas: batch loss x batch images
        self.val_images.assign_add(count)
        self.confusion.update_state(masks, self.labeler(logits))

    def _distributed_val_step(self, images, masks):
        self.strategy.run(self._replica_val_step, args=(images, masks))

    def validate(self, dataset) -> tuple[float, np.ndarray]:
        """(validation loss averaged over images, K x K confusion matrix) over a whole split."""
        self.confusion.reset_state()
        self.val_loss_sum.assign(0.0)
        self.val_images.assign(0.0)
        for images, masks in self.strategy.experimental_distribute_dataset(dataset):
            self._val_step(images, masks)
        images = float(self.val_images.read_value())
        loss = float(self.val_loss_sum.read_value()) / max(images, 1.0)
        return loss, np.asarray(self.confusion.result()).astype(np.int64)
