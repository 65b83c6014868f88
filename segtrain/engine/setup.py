"""Building what the training loop drives: model, loss, optimizer, steps, checkpoint, and the data pipelines."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import tensorflow as tf

from segtrain.config import Config
from segtrain.engine.checkpoints import TrainingState
from segtrain.engine.devices import resolve_jit_compile, resolve_steps_per_execution
from segtrain.engine.schedules import (PlateauState, make_budget_schedule, make_optimizer, make_schedule,
                                       measuring_schedule, set_schedule)
from segtrain.engine.state import LoopState
from segtrain.engine.trainer import Trainer, logits_labeler
from segtrain.errors import CheckpointError, ConfigError


@dataclass
class Engine:
    """The model and everything that trains it, for one run."""

    config: Config
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    trainer: Trainer
    checkpoint: TrainingState
    plateau: Optional[PlateauState]
    loop: LoopState
    policy: str
    chief: bool
    restored: Optional[str]
    steps_per_execution: int
    jit_compile: bool
    plan: Optional[object] = None
    """A budgeted run's `segtrain.engine.budget.BudgetPlan` (None before it is measured, and without a budget)."""

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def epochs(self) -> int:
        """Epochs of the run: the plan's with train.budget, else train.epochs."""
        return self.plan.epochs if self.plan is not None else self.config.train.epochs

    def apply_plan(self, plan) -> None:
        """Train the rest of a budgeted run by its plan: the planned schedule (the train step is traced again),
        and the loop's epochs of plan.steps_per_epoch steps ending at plan.total_steps."""
        set_schedule(self.optimizer, make_budget_schedule(self.config.train, plan, self.checkpoint.lr_scale))
        self.trainer.retrace()
        self.loop.steps_per_epoch, self.loop.total_steps = plan.steps_per_epoch, plan.total_steps
        self.plan = plan


def check_batch_split(batch_size: int, replicas: int) -> None:
    """The global batch must split evenly over the replicas."""
    if batch_size < replicas or batch_size % replicas:
        raise ConfigError(
            f"data.batch_size: the global batch of {batch_size} cannot be split evenly over {replicas} replicas; "
            f"use a multiple of {replicas} (e.g. --set data.batch_size={replicas * max(1, batch_size // replicas)})."
        )


def build_engine(config: Config, prepared, strategy, policy: str, run_dir: Path, chief: bool,
                 resume: bool, history_rows=lambda epoch: []) -> Engine:
    """Model, loss, optimizer and checkpoint under the strategy; restored from the latest checkpoint on resume.

    `prepared` is `segtrain.train.PreparedData`; `history_rows(epoch)` gives the history rows of a resumed run.
    """
    from segtrain.decision import decision_cost_matrix
    from segtrain.data.pipeline import steps_per_epoch
    from segtrain.losses import build_loss
    from segtrain.model import build_unet, output_channels

    train, classes = config.train, config.data.classes
    check_batch_split(config.data.batch_size, strategy.num_replicas_in_sync)
    steps = steps_per_epoch(len(prepared.train_pairs), config.data.batch_size, train.steps_per_epoch)
    plan, total = None, None
    if train.budget is not None:
        from segtrain.engine.budget import read_plan

        plan = read_plan(run_dir, train.budget_seconds) if resume else None
        # before the plan: measuring steps in epoch 1 (at most train.steps_per_epoch of them)
        steps, total = (plan.steps_per_epoch, plan.total_steps) if plan else (train.steps_per_epoch or 2**62, None)
    with strategy.scope():
        model = build_unet(prepared.channels, output_channels(len(classes)), config.model.depth,
                           config.model.base_filters, config.model.batch_norm, config.model.dropout,
                           normalization=prepared.class_stats.get("normalization"))
        if strategy.num_replicas_in_sync > 1:
            _synchronize_batch_norm(model)
        loss_fn = build_loss(config.loss, classes, prepared.class_weights)
        lr_scale = tf.Variable(1.0, dtype=tf.float32, trainable=False, name="lr_scale")
        if train.budget is None:
            schedule = make_schedule(train, steps * train.epochs, steps, lr_scale)
        else:
            schedule = make_budget_schedule(train, plan, lr_scale) if plan else measuring_schedule(train)
        optimizer = make_optimizer(train, schedule, policy)
        optimizer.build(model.trainable_variables)
        checkpoint = TrainingState(model, optimizer, run_dir / "checkpoints", train.keep_checkpoints,
                                   writer=chief, lr_scale=lr_scale)
        restored = checkpoint.restore_latest() if resume else None
    if resume and restored is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'}: no checkpoint to resume from; run without --resume.")
    if restored:
        loop = checkpoint.loop_state(train.monitor, steps, history_rows(int(checkpoint.epoch.numpy())), total)
    else:
        loop = LoopState(train.monitor, steps, total_steps=total)
    # validation decides like eval, so best.keras is chosen by the rule that eval reports
    labeler = logits_labeler(config.predict.decision, config.predict.threshold, decision_cost_matrix(config))
    jit = resolve_jit_compile(train, strategy.num_replicas_in_sync)
    trainer = Trainer(strategy, model, loss_fn, optimizer, len(classes), grad_clip_norm=train.grad_clip_norm,
                      labeler=labeler, jit_compile=jit)
    plateau = PlateauState(train, checkpoint.lr_scale, checkpoint.plateau_wait) if train.schedule == "plateau" else None
    return Engine(config, strategy, model, optimizer, trainer, checkpoint, plateau, loop, policy, chief, restored,
                  resolve_steps_per_execution(train), jit, plan)


def _synchronize_batch_norm(model) -> None:
    """BatchNorm statistics over the global batch (all replicas), as on one device; saved in the .keras config."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


class RunData:
    """The distributed training iterator (positioned at the loop's global step) and the validation dataset.

    A non-chief worker keeps its disk cache in a temporary folder, removed by `close`.
    """

    def __init__(self, config: Config, prepared, engine: Engine, run_dir: Path):
        from segtrain.data.pipeline import DataSpec, evaluation_dataset, training_dataset

        data = config.data
        self.train_images = len(prepared.train_pairs)
        self.scratch = None if engine.chief else Path(tempfile.mkdtemp(prefix="segtrain-worker-"))
        cache_dir = (self.scratch or run_dir) / "cache"
        if data.cache == "disk":
            shutil.rmtree(cache_dir, ignore_errors=True)  # a killed run leaves a partial cache and its lock file
        self.spec = spec = DataSpec(data, prepared.mapping, prepared.channels, config.model.divisor,
                                    config.train.seed, prepared.locations)
        train_ds = training_dataset(prepared.train_pairs, spec, cache_dir,
                                    start_element=engine.loop.global_step * data.batch_size)
        val_ds = evaluation_dataset(prepared.val_pairs, spec, max(1, min(data.batch_size, 4)))
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        self.train_iterator = iter(engine.strategy.experimental_distribute_dataset(train_ds.with_options(options)))
        self.val = val_ds.with_options(options)

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
