"""The training loop, as an outline: for each epoch train, validate, write, checkpoint, decide whether to stop.

Exact resume: the checkpoint is the commit point of an epoch. At an epoch end the history
row, last.keras and best.keras are written first and the checkpoint last, so a run killed at
any moment resumes from a checkpoint whose epoch's files are either all written or redone
identically. Checkpoints inside an epoch (`train.checkpoint_every_steps`, a signal) fall on
call boundaries of the compiled step, where the loop state and the weights agree.

With `train.budget`, a new run first measures the step time (`measure_and_plan`, rules in
`segtrain.engine.budget`), records the plan (budget.json) and checkpoints; the epochs then follow the plan.
A resumed run reads the plan back and never measures again.
"""

from __future__ import annotations

import math
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Optional

import tensorflow as tf

from segtrain.engine.schedules import current_learning_rate
from segtrain.engine.epoch_files import EpochFiles
from segtrain.engine.setup import Engine, RunData
from segtrain.engine.state import LoopState
from segtrain.errors import DataError, Interrupted, TrainingDiverged


def run_training(engine: Engine, data: RunData, run_dir: Path, log) -> LoopState:
    """Train from where `engine.loop` stands to the last epoch (or an early stop); returns the loop state."""
    train, loop = engine.config.train, engine.loop
    files = EpochFiles(run_dir, engine.chief, engine, data)
    from segtrain.engine import budget

    budget_clock = None  # when this process measured the step time: the budget's start (budget.clock), to re-plan
    epoch_times: list = []  # (seconds, steps) of each epoch in this process, validation and writes included
    with StopFlag() as stop:
        if train.budget is not None and engine.plan is None:
            budget_clock = budget.clock()
            measure_and_plan(engine, data, stop, run_dir, log)
        while loop.epoch < engine.epochs:
            started = time.perf_counter()
            epoch_clock = budget.clock() if budget_clock is not None else None
            steps_before = loop.step_in_epoch
            train_epoch(engine, data, loop, stop, run_dir, log)
            steps_done = loop.step_in_epoch - steps_before
            row = epoch_row(engine, loop, time.perf_counter() - started, steps_done)
            validated = (loop.epoch + 1) % train.validate_every == 0 or loop.epoch + 1 == engine.epochs
            if validated:
                row.update(validation_columns(engine, data))
            improved = loop.finish_epoch(row)
            lowered = engine.plateau.update(improved) if engine.plateau is not None and validated else None
            files.write(loop.rows, engine.model, improved)
            if epoch_clock is not None:
                epoch_times.append((budget.clock() - epoch_clock, steps_done))
            if engine.plan is not None:
                replan_at_epoch_end(engine, epoch_times, budget_clock, run_dir, log)
            save_checkpoint(engine, loop, f"after epoch {loop.epoch}", run_dir)
            if engine.trainer.stop_agreed(stop.requested):  # a signal during validation or saving
                raise interrupted(stop, f"after epoch {loop.epoch}", run_dir)
            log(epoch_summary(row))
            if lowered is not None:
                log(f"{train.monitor} has not improved for {train.plateau_patience} validated epoch(s): "
                    f"learning rate lowered to {current_learning_rate(engine.optimizer):.3g}.")
            if should_stop_early(loop, train.early_stopping_patience):
                log(f"Early stopping: {train.monitor} has not improved for {train.early_stopping_patience} epochs "
                    f"(best {loop.best_text()} at epoch {loop.best_epoch}).")
                break
    return loop


def replan_at_epoch_end(engine: Engine, epoch_times: list, budget_clock: Optional[float], run_dir: Path,
                        log) -> None:
    """A budgeted run's epoch end, before its checkpoint: replay the re-plan recorded for this epoch (a resumed
    run), or, in the process that measured the step time, price the time left at the last epochs' wall time per
    step (not the first epoch's, which pays a trace) and move the run's end when it drifted (`segtrain.engine.budget.replan`; recorded in budget.json first)."""
    from segtrain.engine import budget

    plan, loop = engine.plan, engine.loop
    recorded = [r for r in plan.replans if r["after_epoch"] == loop.epoch]
    if recorded:
        decision = recorded[0]
    elif budget_clock is not None and loop.epoch < engine.epochs and len(epoch_times) >= 2:
        window = epoch_times[1:][-budget.REPLAN_WINDOW:]  # the first epoch pays the planned schedule's trace
        seconds, steps = sum(t for t, _ in window), sum(n for _, n in window)
        if steps == 0:
            return
        elapsed, per_step = engine.trainer.agreed_mean([budget.clock() - budget_clock, seconds / steps])
        decision = budget.replan(plan, loop.epoch, loop.global_step, elapsed, per_step)
        if decision is None:
            return
        plan.replans = [r for r in plan.replans if r["after_epoch"] < loop.epoch] + [decision]
        if engine.chief:
            budget.write_plan(plan, run_dir)
        log(f"Budget re-planned after epoch {loop.epoch}: {budget.clock_text(elapsed)} of {plan.budget} used, "
            f"{per_step:.3g} s per step over the last {len(window)} epoch(s) (validation and writes included): the "
            f"run now ends at step {decision['total_steps']} (was {plan.end_step(loop.epoch - 1)}); the learning "
            "rate still completes its schedule there.")
    else:
        return
    engine.apply_plan(plan, loop.epoch)


def train_epoch(engine: Engine, data: RunData, loop: LoopState, stop: "StopFlag", run_dir: Path, log=None) -> None:
    """The epoch's remaining optimizer steps, in compiled calls of up to `steps_per_execution` steps (a call ends
    where an encoder unfreezes, `Engine.sync_encoder`)."""
    from tqdm import tqdm

    train, batch = engine.config.train, engine.config.data.batch_size
    epoch_label = f"epoch {loop.epoch + 1}/{engine.epochs}"
    bar = tqdm(total=loop.epoch_steps, initial=loop.step_in_epoch, desc=epoch_label, unit="step",
               dynamic_ncols=True, disable=None)
    started, images = time.perf_counter(), 0
    try:
        while loop.steps_left_in_epoch > 0:
            count = steps_in_next_call(loop, train.checkpoint_every_steps, engine.steps_per_execution,
                                       engine.freeze_until)
            if engine.sync_encoder(loop.global_step) and log is not None:
                log(f"Encoder unfrozen at step {loop.global_step}: it trains from now on at the learning rate x "
                    f"train.encoder_lr_scale = {train.encoder_lr_scale:g}.")
            try:
                losses = engine.trainer.train_steps(data.train_iterator, count)
            except tf.errors.OpError as exc:
                raise data_error_from(exc) from None
            check_finite(losses, loop, run_dir)
            loop.add_step_losses(losses)
            images += count * batch
            bar.set_postfix(loss=f"{loop.mean_loss:.4f}", img_s=f"{images / max(time.perf_counter() - started, 1e-9):.1f}")
            bar.update(count)
            where = f"at epoch {loop.epoch + 1}, step {loop.step_in_epoch}"
            if engine.trainer.stop_agreed(stop.requested):
                save_checkpoint(engine, loop, where, run_dir)
                raise interrupted(stop, where, run_dir)
            every = train.checkpoint_every_steps
            if every and loop.global_step % every == 0 and loop.steps_left_in_epoch > 0:
                save_checkpoint(engine, loop, where, run_dir)
    finally:
        bar.close()


def measure_and_plan(engine: Engine, data: RunData, stop: "StopFlag", run_dir: Path, log) -> None:
    """A budgeted run's start: train while timing the step and a validation pass, plan the steps and epochs,
    record the plan (budget.json, before the first checkpoint), switch to the planned schedule, checkpoint."""
    from segtrain.engine import budget
    from segtrain.engine.schedules import measuring_rate

    config, loop, trainer = engine.config, engine.loop, engine.trainer
    train = config.train
    engine.sync_encoder(loop.global_step, measuring=True)

    def train_call(count: int) -> None:
        try:
            losses = trainer.train_steps(data.train_iterator, count)
        except tf.errors.OpError as exc:
            raise data_error_from(exc) from None
        check_finite(losses, loop, run_dir)
        loop.add_step_losses(losses)

    def validate(one_batch: bool) -> None:
        if one_batch and isinstance(engine.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return  # a batch would reach one worker only; the timed pass then includes the trace (a safe overestimate)
        try:
            trainer.validate(data.val.take(1) if one_batch else data.val)
        except tf.errors.OpError as exc:
            raise data_error_from(exc) from None

    def epoch_end() -> None:
        """An epoch end's writes (EpochFiles and a checkpoint), into a scratch folder that is then removed."""
        from segtrain.config import monitor_columns

        scratch = Path(tempfile.mkdtemp(prefix="segtrain-budget-"))
        try:
            files = EpochFiles(scratch, chief=True)
            row = epoch_row(engine, loop, 1.0, 1)
            row.update({name: 0.0 for name in monitor_columns(config.data.classes) if name.startswith("val_")})
            files.write([row], engine.model, improved=True)
            files.writer.close()
            if not isinstance(engine.strategy, tf.distribute.MultiWorkerMirroredStrategy):  # a collective there
                engine.checkpoint.checkpoint.write(str(scratch / "checkpoints" / "ckpt"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    try:
        found = budget.measure(train_call, validate, engine.steps_per_execution, train.budget_seconds,
                               cap=train.steps_per_epoch, agree=trainer.stop_agreed,
                               stopped=lambda: trainer.stop_agreed(stop.requested), epoch_end=epoch_end)
    except budget.MeasuringStopped:
        raise Interrupted(
            f"{stop.signal_name or 'a signal on another worker'}: stopped while measuring the step time for "
            f"train.budget, before the plan and the first checkpoint, so there is nothing to resume. Start again "
            f"with: segtrain fit {run_dir / 'config.yaml'} --out {run_dir} --overwrite"
        ) from None
    # every worker plans from the same numbers (rounded, so that the plans agree to the step)
    per_step, validation, writes, spent, trace = (round(x, 6) for x in trainer.agreed_mean(
        [found.seconds_per_step, found.validation_seconds, found.epoch_end_seconds, found.seconds,
         found.trace_seconds]))
    plan = budget.plan_budget(train.budget_seconds, per_step, validation, data.train_images,
                              config.data.batch_size, measured_steps=found.steps, measuring_seconds=spent,
                              trace_seconds=trace, epoch_end_seconds=writes, validate_every=train.validate_every,
                              steps_per_epoch=train.steps_per_epoch, budget=train.budget,
                              timed_steps=found.timed_steps)
    plan.measuring_learning_rate = measuring_rate(train)
    if engine.chief:
        budget.write_plan(plan, run_dir)
    log(plan.summary())
    for warning in plan.warnings:
        log(f"warning: {warning}")
    engine.apply_plan(plan)
    where = f"after measuring the step time (global step {loop.global_step})"
    save_checkpoint(engine, loop, where, run_dir)
    if trainer.stop_agreed(stop.requested):
        raise interrupted(stop, where, run_dir)


def steps_in_next_call(loop: LoopState, checkpoint_every: Optional[int], per_call: int,
                       freeze_until: int = 0) -> int:
    """Steps of the next compiled call: at most `per_call`, never past the epoch's end, a checkpoint step or the
    step where the encoder unfreezes (`freeze_until`)."""
    count = min(per_call, loop.steps_left_in_epoch)
    if checkpoint_every:
        count = min(count, checkpoint_every - loop.global_step % checkpoint_every)
    if loop.global_step < freeze_until:
        count = min(count, freeze_until - loop.global_step)
    return count


def check_finite(losses, loop: LoopState, run_dir: Path) -> None:
    """A NaN or Inf loss stops the run, naming the epoch and step; the last good checkpoint is kept."""
    for offset, value in enumerate(losses):
        if not math.isfinite(float(value)):
            raise TrainingDiverged(
                f"loss became {float(value)} at epoch {loop.epoch + 1}, step {loop.step_in_epoch + offset + 1} "
                f"(global step {loop.global_step + offset + 1}). The last good checkpoint is kept in "
                f"{run_dir / 'checkpoints'}. Lower train.learning_rate or set train.grad_clip_norm."
            )


def epoch_row(engine: Engine, loop: LoopState, seconds: float, steps_done: int) -> dict:
    """The history row of the epoch under way (before validation)."""
    images = steps_done * engine.config.data.batch_size
    return {"epoch": loop.epoch + 1, "step": loop.global_step, "loss": loop.mean_loss,
            "lr": current_learning_rate(engine.optimizer), "seconds": seconds,
            "images_per_second": images / max(seconds, 1e-9)}


def validation_columns(engine: Engine, data: RunData) -> dict:
    """val_loss, val_mean_iou, val_pixel_accuracy, val_iou_<class>, val_dice_<class> over the whole val split."""
    from segtrain.metrics import metrics_from_confusion

    try:
        val_loss, confusion = engine.trainer.validate(data.val)
    except tf.errors.OpError as exc:
        raise data_error_from(exc) from None
    metrics = metrics_from_confusion(confusion, engine.config.data.classes)
    columns = {"val_loss": val_loss, "val_mean_iou": metrics["mean_iou"],
               "val_pixel_accuracy": metrics["pixel_accuracy"]}
    for name, values in metrics["per_class"].items():
        columns[f"val_iou_{name}"] = values["iou"]
        columns[f"val_dice_{name}"] = values["dice"]
    return columns


def should_stop_early(loop: LoopState, patience: Optional[int]) -> bool:
    return patience is not None and loop.best_epoch > 0 and loop.epochs_without_improvement() >= patience


def epoch_summary(row: dict) -> str:
    summary = f"epoch {row['epoch']}: loss {row['loss']:.4f}"
    if "val_loss" in row:
        summary += f", val_loss {row['val_loss']:.4f}, val_mean_iou {row['val_mean_iou']:.4f}"
    return summary


def save_checkpoint(engine: Engine, loop: LoopState, where: str, run_dir: Path) -> None:
    """Checkpoint the model, optimizer and loop state, after checking that the weights are finite."""
    if not engine.trainer.weights_finite():
        raise TrainingDiverged(
            f"the weights became NaN or Inf {where} (global step {loop.global_step}). The last good checkpoint is "
            f"kept in {run_dir / 'checkpoints'}. Lower train.learning_rate or set train.grad_clip_norm."
        )
    engine.checkpoint.save_loop(loop)


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each compiled call."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def interrupted(stop: StopFlag, where: str, run_dir: Path) -> Interrupted:
    reason = stop.signal_name or "a signal on another worker"
    return Interrupted(
        f"{reason}: stopped {where}; checkpoint saved. "
        f"Resume with: segtrain fit {run_dir / 'config.yaml'} --resume --out {run_dir}"
    )


def data_error_from(exc) -> Exception:
    """A DataError raised inside the tf.data pipeline arrives wrapped in a TF error: unwrap its message."""
    message = str(exc)
    marker = "DataError: "
    if marker in message:
        return DataError(message.split(marker, 1)[1].splitlines()[0].strip())
    return exc
