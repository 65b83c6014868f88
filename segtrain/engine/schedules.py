"""Learning-rate schedules, the optimizer, and reduce-on-plateau bookkeeping."""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from segtrain.config import TrainConfig

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


def measuring_rate(train: TrainConfig) -> float:
    """The schedule's starting rate, at which a budgeted run trains while it measures the step time (the
    schedule's length is not known yet): 1% of train.learning_rate with a warm-up, the full rate without one."""
    return train.learning_rate * (WARMUP_START if train.warmup_epochs > 0 else 1.0)


@keras.saving.register_keras_serializable(package="segtrain")
class AfterMeasuring(keras.optimizers.schedules.LearningRateSchedule):
    """A budgeted run's schedule: the measured steps at a constant rate, then the planned schedule.

    Formula:
    ```
    lr(step) = measuring_rate                     for step < measured_steps
    lr(step) = schedule(step - measured_steps)    from then on
    ```

    `schedule` is `make_schedule(train, total_steps - measured_steps, steps_per_epoch)`, so warm-up and cosine span
    the steps left after measuring and the rate reaches the cosine's end at the planned last step.

    Args:
        measuring_rate: the rate of the measured steps (`measuring_rate(train)`).
        measured_steps: steps trained while measuring.
        schedule: the planned schedule (a LearningRateSchedule).
    """

    def __init__(self, measuring_rate: float, measured_steps: int, schedule):
        self.measuring_rate = float(measuring_rate)
        self.measured_steps = int(measured_steps)
        self.schedule = schedule

    def __call__(self, step):
        step = tf.cast(step, tf.int64)
        planned = self.schedule(tf.maximum(step - self.measured_steps, 0))
        measuring = tf.constant(self.measuring_rate, tf.float32)
        return tf.where(step < self.measured_steps, measuring, tf.cast(planned, tf.float32))

    def get_config(self):
        return {"measuring_rate": self.measuring_rate, "measured_steps": self.measured_steps,
                "schedule": keras.optimizers.schedules.serialize(self.schedule)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.optimizers.schedules.deserialize(config["schedule"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="segtrain")
class Stretched(keras.optimizers.schedules.LearningRateSchedule):
    """A budgeted run's schedule after re-plans: the first plan's course, stretched to the moved ends.

    Formula (`segtrain.engine.budget.virtual_step`, the same in NumPy):
    ```
    lr(step) = schedule(round(v(step)))
    v(step) = step                                                          before the first knot
    v(step) = v_k + (horizon - v_k) * (step - s_k) / (T_k - s_k)            from knot k (s_k, v_k, T_k) on
    ```
    v is continuous at each knot (v_k is where the previous course stood at s_k), so the rate does not jump, and
    reaches the course's end (`horizon`, the first plan's total) at the re-planned last step T_k.

    Args:
        schedule: the first plan's schedule (`AfterMeasuring`).
        knots: (at_step, virtual_step, total_steps) per re-plan, in order.
        horizon: the first plan's total steps.
    """

    def __init__(self, schedule, knots, horizon: int):
        self.schedule = schedule
        self.knots = [(int(s), float(v), int(t)) for s, v, t in knots]
        self.horizon = int(horizon)

    def __call__(self, step):
        x = tf.cast(step, tf.float64)
        v = x
        for at, virtual, total in self.knots:
            span = float(max(total - at, 0))
            stretched = (tf.constant(float(self.horizon), tf.float64) if span == 0 else
                         virtual + (self.horizon - virtual) * (x - at) / span)
            v = tf.where(x >= at, stretched, v)
        return self.schedule(tf.cast(tf.round(v), tf.int64))

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule), "knots": self.knots,
                "horizon": self.horizon}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.optimizers.schedules.deserialize(config["schedule"])
        return cls(**config)


def make_budget_schedule(train: TrainConfig, plan, lr_scale: Optional[tf.Variable] = None, epoch: Optional[int] = None):
    """The schedule of a budgeted run from its plan (`segtrain.engine.budget.BudgetPlan`) with the re-plans made
    until the end of epoch `epoch` (None: all recorded)."""
    planned = make_schedule(train, plan.total_steps - plan.measured_steps, plan.steps_per_epoch, lr_scale)
    course = AfterMeasuring(plan.measuring_learning_rate, plan.measured_steps, planned)
    knots = plan.knots(epoch)
    return Stretched(course, knots, plan.total_steps) if knots else course


def measuring_schedule(train: TrainConfig) -> ScaledWarmup:
    """The constant rate a budgeted run measures at, before its plan exists."""
    return ScaledWarmup(measuring_rate(train))


def set_schedule(optimizer, schedule) -> None:
    """Replace the optimizer's learning-rate schedule (the train step must then be traced again)."""
    getattr(optimizer, "inner_optimizer", optimizer).learning_rate = schedule


def _encoder_rate(base):
    """`base` (Adam or AdamW) with the encoder's variables updated at the learning rate times a scale.

    Adam's update (and AdamW's decay) is linear in the learning rate and its moments do not depend on it, so
    scaling the rate a variable's update step receives is exactly a per-variable learning rate; the optimizer's
    variables (what checkpoints hold) are those of `base`. (Scaling the gradients would not do: Adam's update
    does not change with the gradient's scale.)
    """

    class EncoderRate(base):
        encoder_keys: frozenset = frozenset()
        encoder_lr_scale: float = 1.0

        def scale_encoder(self, variables, scale: float) -> None:
            """Update `variables` at the learning rate x `scale`."""
            self.encoder_keys = frozenset(self._var_key(v) for v in variables)
            self.encoder_lr_scale = float(scale)

        def update_step(self, gradient, variable, learning_rate):
            if self._var_key(variable) in self.encoder_keys:
                learning_rate = learning_rate * self.encoder_lr_scale
            return super().update_step(gradient, variable, learning_rate)

        def _apply_weight_decay(self, variables):
            ours = [v for v in variables if self._var_key(v) in self.encoder_keys]
            if self.weight_decay is None or not ours:
                return super()._apply_weight_decay(variables)
            super()._apply_weight_decay([v for v in variables if self._var_key(v) not in self.encoder_keys])
            decay = self.weight_decay  # a Python number, read when the step is traced
            self.weight_decay = decay * self.encoder_lr_scale
            try:
                super()._apply_weight_decay(ours)
            finally:
                self.weight_decay = decay

    EncoderRate.__name__ = EncoderRate.__qualname__ = f"{base.__name__}EncoderRate"
    return EncoderRate


def make_optimizer(train: TrainConfig, schedule, policy: str, encoder_variables=None) -> keras.optimizers.Optimizer:
    """Adam (AdamW with weight decay); wrapped for dynamic loss scaling under float16.

    Gradient clipping is done by `Trainer` (on the all-reduced gradient), not by the
    optimizer: Keras clips each replica's share before the all-reduce. With `encoder_variables` (an encoder
    U-Net's encoder) those are updated at the learning rate x train.encoder_lr_scale (`_encoder_rate`).
    """
    scaled = encoder_variables is not None and train.encoder_lr_scale != 1.0
    if train.weight_decay > 0:
        kind = _encoder_rate(keras.optimizers.AdamW) if scaled else keras.optimizers.AdamW
        optimizer = kind(learning_rate=schedule, weight_decay=train.weight_decay)
    else:
        kind = _encoder_rate(keras.optimizers.Adam) if scaled else keras.optimizers.Adam
        optimizer = kind(learning_rate=schedule)
    if scaled:
        optimizer.scale_encoder(encoder_variables, train.encoder_lr_scale)
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
