"""`segtrain fit`: check the inputs, prepare the run folder, train, and write the run's results.

Every input check (config, data pairs, mask values, checkpoint compatibility) runs
before the run folder is created or replaced, so bad input never touches an earlier run.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click
import numpy as np

from segtrain.config import Config, save_config
from segtrain.data.discovery import Pair, find_pairs
from segtrain.data.images import image_channels
from segtrain.data.masks import MaskMapping
from segtrain.data.scan import scan_pairs
from segtrain.errors import DataError, TrainingDiverged
from segtrain.runs import RUN_INFO, prepare_run_dir, save_model_atomic, write_json_atomic, write_text_atomic


class Interrupted(click.ClickException):
    """SIGINT/SIGTERM during training: a checkpoint was saved; exit code 130."""

    exit_code = 130


@dataclass
class PreparedData:
    """Checked data: pairs, mapping, channels and the training class statistics."""

    train_pairs: list[Pair]
    val_pairs: list[Pair]
    mapping: MaskMapping
    channels: int
    class_stats: dict
    class_weights: Optional[np.ndarray]


def prepare_data(config: Config, cached_stats: Optional[dict] = None) -> PreparedData:
    """Find and check every pair, and count class pixels over the whole training set in one pass."""
    from segtrain.class_weights import ClassCounter, class_stats_dict, resolve_class_weights

    data = config.data
    train_pairs = find_pairs(data.root, data.train_split)
    val_pairs = find_pairs(data.root, data.val_split)
    mapping = MaskMapping(data.mask, data.classes)
    channels = image_channels(train_pairs[0].image)
    if cached_stats is None:
        counter = ClassCounter(len(data.classes))
        scan_pairs(train_pairs, mapping, data.max_image_pixels, counter, description="class statistics")
        scan_pairs(val_pairs, mapping, data.max_image_pixels, None, description="checking val masks")
        stats = class_stats_dict(counter, data.classes, config.loss["class_weights"], config.loss["max_weight"])
    else:
        stats = cached_stats
    weights = resolve_class_weights(config.loss, data.classes, stats)
    return PreparedData(train_pairs, val_pairs, mapping, channels, stats, weights)


def _history_rows(path: Path, upto_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return [row for row in csv.DictReader(handle) if int(row["epoch"]) <= upto_epoch]


def _write_history(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = [",".join(keys)]
    for row in rows:
        lines.append(",".join(_csv_value(row.get(k)) for k in keys))
    write_text_atomic("\n".join(lines) + "\n", path)


def _csv_value(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _monitor_is_better(monitor: str, value: float, best: Optional[float]) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    lower_is_better = "loss" in monitor or "cost" in monitor
    return value < best if lower_is_better else value > best


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}

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


def run_fit(config: Config, run_dir: Path, resume: bool = False, overwrite: bool = False,
            config_path: Optional[Path] = None, log=click.echo) -> dict:
    """Train from a checked config into run_dir; returns the final metrics dict."""
    import keras
    import tensorflow as tf

    from segtrain.data.pipeline import DataSpec, evaluation_dataset, steps_per_epoch, training_dataset
    from segtrain.engine.checkpoints import TrainingState
    from segtrain.engine.devices import is_chief, make_strategy, set_precision
    from segtrain.engine.trainer import Trainer, make_optimizer, make_schedule
    from segtrain.losses import build_loss
    from segtrain.metrics import metrics_from_confusion
    from segtrain.model import build_unet, output_channels

    cached_stats = None
    stats_path = run_dir / "class_stats.json"
    if resume and stats_path.is_file():
        import json

        cached_stats = json.loads(stats_path.read_text())
    prepared = prepare_data(config, cached_stats)
    for warning in prepared.class_stats.get("warnings", []):
        log(f"warning: {warning}")

    train_cfg = config.train
    if train_cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(train_cfg.seed)
    policy = set_precision(train_cfg.precision)
    strategy = make_strategy(train_cfg.distribute)
    replicas = strategy.num_replicas_in_sync
    if config.data.batch_size < replicas or config.data.batch_size % replicas:
        from segtrain.errors import ConfigError

        raise ConfigError(
            f"data.batch_size: {config.data.batch_size} cannot be split evenly over {replicas} replicas; "
            f"use a multiple of {replicas}."
        )
    chief = is_chief(strategy)
    num_classes = len(config.data.classes)
    steps = steps_per_epoch(len(prepared.train_pairs), config.data.batch_size, train_cfg.steps_per_epoch)
    total_steps = steps * train_cfg.epochs

    with strategy.scope():
        model = build_unet(prepared.channels, output_channels(num_classes), config.model.depth,
                           config.model.base_filters, config.model.batch_norm, config.model.dropout)
        loss_fn = build_loss(config.loss, config.data.classes, prepared.class_weights)
        optimizer = make_optimizer(train_cfg, make_schedule(train_cfg, total_steps, steps), policy)
        state = TrainingState(model, optimizer, run_dir / "checkpoints", train_cfg.keep_checkpoints)
        restored = state.restore_latest() if resume else None
    if resume and restored is None:
        from segtrain.errors import CheckpointError

        raise CheckpointError(f"{run_dir / 'checkpoints'}: no checkpoint to resume from; run without --resume.")

    # Every input check has passed: only now is the run folder created or replaced.
    if chief:
        prepare_run_dir(run_dir, resume, overwrite)
        save_config(config, run_dir / "config.yaml")
        write_json_atomic(prepared.class_stats, stats_path)
        write_json_atomic({"in_channels": prepared.channels, "num_classes": num_classes,
                           "precision": policy, "replicas": replicas,
                           "config_file": str(config_path) if config_path else None}, run_dir / RUN_INFO)

    start_epoch = int(state.epoch.numpy()) if restored else 0
    global_step = int(state.step.numpy()) if restored else 0
    spec = DataSpec(config.data, prepared.mapping, prepared.channels, 2**config.model.depth, train_cfg.seed)
    train_ds = training_dataset(prepared.train_pairs, spec, run_dir / "cache",
                                start_element=global_step * config.data.batch_size)
    val_ds = evaluation_dataset(prepared.val_pairs, spec, max(1, min(config.data.batch_size, 4)))
    iterator = iter(strategy.experimental_distribute_dataset(train_ds))
    trainer = Trainer(strategy, model, loss_fn, optimizer, num_classes)

    history_path = run_dir / "history.csv"
    rows = _history_rows(history_path, start_epoch) if restored else []
    monitor = train_cfg.monitor
    best = None
    best_epoch = 0
    for row in rows:
        value = float(row[monitor]) if row.get(monitor) not in (None, "") else None
        if _monitor_is_better(monitor, value, best):
            best, best_epoch = value, int(row["epoch"])
    writer = tf.summary.create_file_writer(str(run_dir / "logs")) if chief else None
    if restored:
        log(f"Resuming {run_dir} at epoch {start_epoch + 1}, step {global_step} (from {restored}).")
    log(f"Training {model.name} on {len(prepared.train_pairs)} images ({steps} steps/epoch, "
        f"{train_cfg.epochs} epochs, {policy}, {replicas} replica(s)) -> {run_dir}")

    from tqdm import tqdm

    final_metrics = {}
    with _StopFlag() as stop:
        epoch = start_epoch
        while epoch < train_cfg.epochs:
            step_in_epoch = global_step - epoch * steps
            bar = tqdm(total=steps, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{train_cfg.epochs}",
                       unit="step", dynamic_ncols=True, disable=None)
            started = time.perf_counter()
            losses = []
            images_seen = 0
            while step_in_epoch < steps:
                try:
                    result = trainer.train_step(iterator)
                except tf.errors.OpError as exc:
                    raise _data_error_from(exc) from None
                if not result.finite:
                    bar.close()
                    raise TrainingDiverged(
                        f"loss became {result.loss} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                        f"(global step {global_step + 1}). The last good checkpoint is kept in "
                        f"{run_dir / 'checkpoints'}. Lower train.learning_rate or set train.grad_clip_norm."
                    )
                losses.append(result.loss)
                global_step += 1
                step_in_epoch += 1
                images_seen += config.data.batch_size
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", img_s=f"{images_seen / max(elapsed, 1e-9):.1f}")
                bar.update(1)
                if stop.signal_name:
                    bar.close()
                    state.save(epoch, global_step)
                    raise Interrupted(
                        f"{stop.signal_name}: stopped at epoch {epoch + 1}, step {step_in_epoch}; checkpoint saved. "
                        f"Resume with: segtrain fit {config_path or 'CONFIG'} --resume --out {run_dir}"
                    )
            bar.close()
            epoch += 1
            seconds = time.perf_counter() - started
            row = {"epoch": epoch, "step": global_step, "loss": float(np.mean(losses)) if losses else None,
                   "lr": float(_current_lr(optimizer)), "seconds": seconds,
                   "images_per_second": images_seen / max(seconds, 1e-9)}
            metrics = None
            if epoch % train_cfg.validate_every == 0 or epoch == train_cfg.epochs:
                val_loss, cm = trainer.validate(val_ds)
                metrics = metrics_from_confusion(cm, config.data.classes)
                row["val_loss"] = val_loss
                row["val_mean_iou"] = metrics["mean_iou"]
                row["val_pixel_accuracy"] = metrics["pixel_accuracy"]
                for name, values in metrics["per_class"].items():
                    row[f"val_iou_{name}"] = values["iou"]
                    row[f"val_dice_{name}"] = values["dice"]
            rows.append(row)
            state.save(epoch, global_step)
            if chief:
                _write_history(rows, history_path)
                save_model_atomic(model, run_dir / "last.keras")
                value = row.get(monitor)
                if _monitor_is_better(monitor, value, best):
                    best, best_epoch = value, epoch
                    save_model_atomic(model, run_dir / "best.keras")
                with writer.as_default():
                    for key, value in row.items():
                        if key != "epoch" and isinstance(value, (int, float)) and value is not None:
                            tf.summary.scalar(key, value, step=epoch)
                writer.flush()
                _plot_history(rows, run_dir / "history.png")
            summary = f"epoch {epoch}: loss {row['loss']:.4f}"
            if metrics is not None:
                summary += f", val_loss {row['val_loss']:.4f}, val_mean_iou {row['val_mean_iou']:.4f}"
            log(summary)
            patience = train_cfg.early_stopping_patience
            if patience is not None and best_epoch and epoch - best_epoch >= patience:
                log(f"Early stopping: {monitor} has not improved for {patience} epochs (best {best:.4f} at epoch {best_epoch}).")
                break
    if chief:
        if not (run_dir / "best.keras").exists():
            save_model_atomic(model, run_dir / "best.keras")
        from segtrain.evaluate import evaluate_run

        final_metrics = evaluate_run(run_dir / "best.keras", config, prepared.val_pairs, prepared.mapping,
                                     run_dir, log=log)
        final_metrics["best_epoch"] = best_epoch
        from segtrain.reports import write_metrics_json

        write_metrics_json(final_metrics, run_dir / "metrics.json")
    return final_metrics


def _current_lr(optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


def _plot_history(rows: list[dict], path: Path) -> None:
    try:
        from segtrain.reports import plot_history
    except ImportError:
        return
    plot_history(rows, path)


def _data_error_from(exc) -> Exception:
    """A DataError raised inside the tf.data pipeline arrives wrapped in a TF error: unwrap its message."""
    message = str(exc)
    marker = "DataError: "
    if marker in message:
        text = message.split(marker, 1)[1].splitlines()[0].strip()
        return DataError(text)
    return exc
