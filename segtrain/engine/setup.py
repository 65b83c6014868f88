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
    plan_epoch: Optional[int] = None
    """The epoch end up to which the plan's re-plans are applied (None: all recorded)."""
    freeze_until: int = 0
    """With an encoder: the global step from which the encoder trains (0: from the start; `freeze_steps`)."""

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def epochs(self) -> int:
        """Epochs of the run: the plan's with train.budget, else train.epochs."""
        return self.plan.epochs_at(self.plan_epoch) if self.plan is not None else self.config.train.epochs

    def apply_plan(self, plan, epoch: Optional[int] = None) -> None:
        """Train the rest of a budgeted run by its plan with its re-plans until the end of epoch `epoch` (None: all):
        the planned schedule (the train step is traced again), and the loop's epochs of plan.steps_per_epoch steps
        ending at the planned end."""
        set_schedule(self.optimizer, make_budget_schedule(self.config.train, plan, self.checkpoint.lr_scale, epoch))
        self.trainer.retrace()
        self.loop.steps_per_epoch, self.loop.total_steps = plan.steps_per_epoch, plan.end_step(epoch)
        self.plan, self.plan_epoch = plan, epoch
        self.freeze_until = freeze_steps(self.config.train, plan.steps_per_epoch) if self.trainer.encoder else 0

    def sync_encoder(self, global_step: int, measuring: bool = False) -> bool:
        """Freeze the encoder before `freeze_until`, unfreeze it from there (the phase follows from the step, so a
        resumed run continues in the right one). While a budgeted run measures its step time, an encoder to be
        frozen is frozen, at an unfrozen step's cost. Returns True when this call unfroze it."""
        train = self.config.train
        if measuring:
            frozen = bool(train.freeze_encoder_steps or train.freeze_encoder_epochs)
        else:
            frozen = global_step < self.freeze_until
        was_frozen = self.trainer.encoder_frozen
        self.trainer.set_encoder_frozen(frozen, full_cost=measuring)
        return was_frozen and not frozen


def freeze_steps(train, steps_per_epoch: int) -> int:
    """The optimizer steps the encoder stays frozen: train.freeze_encoder_steps, or train.freeze_encoder_epochs
    epochs of `steps_per_epoch` (a budgeted run's planned epochs), rounded."""
    if train.freeze_encoder_steps is not None:
        return int(train.freeze_encoder_steps)
    return int(round(train.freeze_encoder_epochs * steps_per_epoch))


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
    from segtrain.encoders.backbones import encoder_of
    from segtrain.model import build_model, output_channels

    train, classes = config.train, config.data.classes
    check_batch_split(config.data.batch_size, strategy.num_replicas_in_sync)
    steps = steps_per_epoch(len(prepared.train_pairs), config.data.batch_size, train.steps_per_epoch)
    plan, total = None, None
    if train.budget is not None:
        from segtrain.engine.budget import read_plan

        plan = read_plan(run_dir, train.budget_seconds) if resume else None
        # before the plan: measuring steps in epoch 1 (at most train.steps_per_epoch of them)
        steps, total = (plan.steps_per_epoch, plan.end_step()) if plan else (train.steps_per_epoch or 2**62, None)
    with strategy.scope():
        model = build_model(config.model, prepared.channels, output_channels(len(classes)),
                            normalization=prepared.class_stats.get("normalization"), load_weights=not resume)
        encoder = encoder_of(model)
        if strategy.num_replicas_in_sync > 1:
            _synchronize_batch_norm(model)
        loss_fn = build_loss(config.loss, classes, prepared.class_weights)
        lr_scale = tf.Variable(1.0, dtype=tf.float32, trainable=False, name="lr_scale")
        if train.budget is None:
            schedule = make_schedule(train, steps * train.epochs, steps, lr_scale)
        else:
            schedule = make_budget_schedule(train, plan, lr_scale) if plan else measuring_schedule(train)
        # built on every variable that ever trains (the encoder's too), so checkpoints hold the same state in
        # either phase; the encoder is unfrozen here
        optimizer = make_optimizer(train, schedule, policy, encoder.trainable_variables if encoder else None)
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
                      labeler=labeler, jit_compile=jit, encoder=encoder)
    plateau = PlateauState(train, checkpoint.lr_scale, checkpoint.plateau_wait) if train.schedule == "plateau" else None
    engine = Engine(config, strategy, model, optimizer, trainer, checkpoint, plateau, loop, policy, chief, restored,
                    resolve_steps_per_execution(train), jit, plan)
    if encoder is not None and (train.budget is None or plan is not None):
        engine.freeze_until = freeze_steps(train, plan.steps_per_epoch if plan else steps)
    if plan is not None and plan.replans and restored:  # the re-plans made until the restored epoch, not later
        engine.apply_plan(plan, int(checkpoint.epoch.numpy()))
    return engine


def _synchronize_batch_norm(model) -> None:
    """BatchNorm statistics over the global batch (all replicas), as on one device; saved in the .keras config."""
    for layer in model._flatten_layers(include_self=False, recursive=True):  # an encoder's layers too
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
