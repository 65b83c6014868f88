"""The compiled training and validation steps, run through a tf.distribute strategy.

Keras's `model.fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585),
so segtrain runs its own step: forward pass, loss in float32, loss scaling under
mixed_float16, gradient clipping by the norm of the *global* gradient, optimizer
update; a validation step that accumulates one confusion matrix over the whole split.
One call of `train_steps` runs several optimizer steps inside one `tf.function` and hands
their losses back together, so the host syncs once per call, not once per step.

Distribution convention (Keras's): inside a tf.distribute replica a loss returns that
replica's *share* of the global-batch loss, so summing the replicas' losses (and their
gradients, which the optimizer all-reduces) gives the loss of the global batch. segtrain's
losses make this exact (`segtrain.losses.classes`): per-pixel terms divide by the valid
pixels of the global batch and overlap terms (Jaccard, Dice, Tversky) sum their soft counts
over the replicas before the ratio, so N replicas train exactly as one device on the same
global batch, up to float32 summation order.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from segtrain.decision import decide_tf, probabilities_tf
from segtrain.losses.functional import replica_sum
from segtrain.metrics import ConfusionMatrix, labels_from_logits


def logits_labeler(rule: str, threshold=None, cost_matrix=None):
    """Logits -> int32 labels by the decision rule of eval/predict (argmax, cost or threshold)."""
    if rule == "argmax":
        return labels_from_logits

    def labeler(logits):
        return tf.cast(decide_tf(probabilities_tf(logits), rule, threshold, cost_matrix), tf.int32)

    return labeler


def _summed_variable():
    """A float64 scalar each replica adds to; reading it sums the replicas."""
    return tf.Variable(0.0, dtype=tf.float64, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.SUM)


class Trainer:
    """Owns the distributed train and validation steps for one model, loss and optimizer.

    Args:
        labeler: logits -> class labels for validation (default: argmax, see `logits_labeler`).
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, loss_fn, optimizer,
                 num_classes: int, grad_clip_norm=None, labeler=None, jit_compile: bool = False, encoder=None):
        self.labeler = labeler or labels_from_logits
        self.encoder = encoder
        """The nested encoder of an encoder U-Net (None: a plain U-Net), which `set_encoder_frozen` freezes."""
        self.encoder_variables = list(encoder.trainable_variables) if encoder is not None else []
        self.encoder_frozen = False
        self.full_cost = False
        self.strategy = strategy
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.grad_clip_norm = grad_clip_norm
        with strategy.scope():
            if not optimizer.built:  # before tracing: LossScaleOptimizer reads its scale variable only once built
                optimizer.build(model.trainable_variables)
            self.confusion = ConfusionMatrix(num_classes)
            self.val_loss_sum = _summed_variable()
            self.val_images = _summed_variable()
        self.jit_compile = jit_compile
        self.retrace()
        self._replica_forward = tf.function(self._replica_val_logits, jit_compile=True) if jit_compile \
            else self._replica_val_logits
        self._val_step = tf.function(self._distributed_val_step)
        self._weights_finite = tf.function(self._all_weights_finite)
        self._multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self._count_stops = tf.function(self._distributed_count_stops)
        self._mean = tf.function(self._distributed_mean)

    def retrace(self) -> None:
        """(Re)create the compiled train step; it is traced on its next call. A budgeted run calls this after
        replacing the optimizer's learning-rate schedule, which a traced step holds as constants."""
        self._compiled = {}
        self._use_compiled()

    def _use_compiled(self) -> None:
        """The compiled step of the encoder's state (frozen or not), created on first use and then kept: the
        encoder's state is read when the step is traced, so each state has its own."""
        key = (self.encoder_frozen, self.full_cost)
        if key not in self._compiled:
            # XLA compiles the per-replica step (forward, loss, backward, update); the loop over steps around it
            # reads the input iterator, which XLA cannot, so it stays an ordinary tf.function (as in Keras).
            replica = tf.function(self._replica_train_step, jit_compile=True) if self.jit_compile \
                else self._replica_train_step
            self._compiled[key] = (replica, tf.function(self._distributed_train_steps))
        self._replica_step, self._train_steps = self._compiled[key]

    def set_encoder_frozen(self, frozen: bool, full_cost: bool = False) -> bool:
        """Freeze (or unfreeze) the encoder: frozen, its layers are not trainable, so the step updates the decoder
        alone and the encoder's BatchNorm layers run in inference mode (their statistics stay as they are).

        `full_cost`: while frozen, the step still computes the encoder's weight gradients (and discards them),
        so that it costs what an unfrozen step costs; a budgeted run measures its step time so. The update is the
        frozen step's. Returns True when the state changed (a state's step is traced on its first call)."""
        full_cost = bool(full_cost and frozen)
        if self.encoder is None or (frozen, full_cost) == (self.encoder_frozen, self.full_cost):
            return False
        self.encoder.trainable = not frozen
        self.encoder_frozen, self.full_cost = frozen, full_cost
        self._use_compiled()
        return True

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
            costed = [v.value for v in self.encoder_variables] if self.full_cost else []
            tape.watch(costed)  # not trainable while frozen, so not watched by default
            logits = self.model(images, training=True)
            loss = tf.cast(self.loss_fn(masks, tf.cast(logits, tf.float32)), tf.float32)
            scaled = loss
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                scaled = self.optimizer.scale_loss(loss)
        variables = self.model.trainable_variables
        grads = tape.gradient(scaled, variables + costed)
        if costed:  # computed (not pruned from the graph) but not applied
            with tf.control_dependencies([g for g in grads[len(variables):] if g is not None]):
                loss = tf.identity(loss)
            grads = grads[: len(variables)]
        if self.grad_clip_norm:
            grads = self._clip(grads)
        self.optimizer.apply_gradients(zip(grads, variables))
        return loss

    def _distributed_train_steps(self, iterator, count):
        losses = tf.TensorArray(tf.float32, size=count)
        for i in tf.range(count):
            images, masks = next(iterator)
            per_replica = self.strategy.run(self._replica_step, args=(images, masks))
            losses = losses.write(i, self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
        return losses.stack()

    def train_steps(self, iterator, count: int = 1) -> np.ndarray:
        """`count` optimizer steps on the next global batches, in one compiled call.

        Returns the loss of each step (computed before its update), as float32 NumPy values.
        """
        return self._train_steps(iterator, tf.constant(count, tf.int32)).numpy()

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

        Off multi-worker this is just `local`; on it, one scalar all-reduce per call.
        """
        if not self._multi_worker:
            return local
        return float(self._count_stops(tf.constant(1.0 if local else 0.0))) > 0

    def _distributed_mean(self, values):
        per_replica = self.strategy.run(tf.identity, args=(values,))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    def agreed_mean(self, values: list) -> list:
        """Each value's mean over the workers (one all-reduce on multi-worker, so that every worker gets the same
        numbers, e.g. to plan a budget alike); off multi-worker, the values themselves."""
        if not self._multi_worker:
            return [float(v) for v in values]
        return [float(v) for v in self._mean(tf.constant(values, tf.float64)).numpy()]

    # ------------------------------------------------------------------ validation
    def _replica_val_logits(self, images, masks):
        def forward():
            return tf.cast(self.model(images, training=False), tf.float32)

        if self.strategy.num_replicas_in_sync == 1:
            logits = forward()
        else:
            channels = self.model.outputs[0].shape[-1]  # K logits, or 1 for a two-class model
            # A last batch (or a split) with fewer images than replicas leaves some replica none: Keras's BatchNorm
            # fails on an empty batch, so that replica's logits are an empty tensor; the loss still runs on every
            # replica (its cross-replica sums need all of them) and an empty share adds nothing.
            logits = tf.cond(tf.shape(images)[0] > 0, forward,
                             lambda: tf.zeros(tf.concat([tf.shape(images)[:3], [channels]], 0), tf.float32))
            logits = tf.ensure_shape(logits, [None, None, None, channels])
        return logits, tf.cast(self.loss_fn(masks, logits), tf.float64)

    def _replica_val_step(self, images, masks):
        # This replica's share of the batch's loss (see the module docstring); the shares sum to it.
        logits, share = self._replica_forward(images, masks)
        count = tf.cast(tf.shape(images)[0], tf.float64)
        self.val_loss_sum.assign_add(share * replica_sum(count))  # summed over replicas: loss x batch images
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
