"""`segtrain fit`: check the inputs, prepare the run folder, train, and write the run's results.

Every input check (config, data pairs, every image decoded once, mask values,
checkpoint compatibility) runs before the run folder is created or replaced, so bad
input never touches an earlier run.

Exact resume: the checkpoint (see `segtrain.engine.checkpoints.TrainingState`) is the
commit point of an epoch. At an epoch end the history row, last.keras and best.keras
are written first and the checkpoint last, so a run killed at any moment resumes from
a checkpoint whose epoch's files are either all written or redone identically.
"""

from __future__ import annotations

import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click
import numpy as np

from segtrain.config import Config, decision_cost_matrix, save_config
from segtrain.history import is_better, plot_history_png, read_history, write_history, write_scalars
from segtrain.data.discovery import Pair, find_pairs
from segtrain.data.images import image_channels
from segtrain.data.masks import MaskMapping
from segtrain.data.scan import scan_pairs
from segtrain.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from segtrain.runs import (
    RUN_INFO,
    check_run_dir,
    prepare_run_dir,
    save_model_atomic,
)
from segtrain.atomic import write_json


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
    """Find and check every pair, and count class pixels over the whole training set in one pass.

    On resume the counts cached in class_stats.json are reused (and the files are not
    checked again); the weights are always recomputed from the counts, so they follow the
    config's current loss.class_weights.
    """
    from segtrain.class_weights import ClassCounter, class_stats_dict

    data = config.data
    train_pairs = find_pairs(data.root, data.train_split)
    val_pairs = find_pairs(data.root, data.val_split)
    mapping = MaskMapping(data.mask, data.classes)
    counter = ClassCounter(len(data.classes))
    if cached_stats is None:
        channels = image_channels(train_pairs[0].image)
        scan_pairs(train_pairs, mapping, channels, data.max_image_pixels, counter, description="class statistics")
        scan_pairs(val_pairs, mapping, channels, data.max_image_pixels, None, description="checking val pairs")
    else:
        if list(cached_stats.get("classes", [])) != list(data.classes):
            raise CheckpointError(
                f"data.classes: the run was trained with classes {cached_stats.get('classes')} but the config names "
                f"{list(data.classes)}. Resume with the run's own config.yaml, or start a new run with --out."
            )
        channels = image_channels(train_pairs[0].image)
        counter.counts[:] = cached_stats["counts"]
        counter.image_pixels[:] = cached_stats["image_pixels"]
        counter.num_images = cached_stats["num_images"]
    strategy = config.loss["class_weights"]
    stats = class_stats_dict(counter, data.classes, strategy, config.loss["max_weight"])
    weights = None if strategy == "none" else np.asarray(stats["class_weights"], dtype=np.float32)
    return PreparedData(train_pairs, val_pairs, mapping, channels, stats, weights)


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


# ---------------------------------------------------------------------------- fit


def run_fit(config: Config, run_dir: Path, resume: bool = False, overwrite: bool = False,
            config_path: Optional[Path] = None, log=click.echo) -> dict:
    """Train from a checked config into run_dir; returns the final metrics dict.

    The process-global settings it changes (Keras dtype policy, TF op determinism) are
    restored when it returns.
    """
    import keras

    from segtrain.engine.devices import configure_cpu_devices

    configure_cpu_devices()  # before anything initialises TensorFlow
    cached_stats = None
    stats_path = run_dir / "class_stats.json"
    if resume and stats_path.is_file():
        import json

        cached_stats = json.loads(stats_path.read_text())
    prepared = prepare_data(config, cached_stats)
    for warning in prepared.class_stats.get("warnings", []):
        log(f"warning: {warning}")

    previous_policy = keras.mixed_precision.global_policy().name
    determinism_before = _op_determinism_enabled()
    try:
        return _fit(config, prepared, run_dir, resume, overwrite, config_path, log)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        if config.train.deterministic and not determinism_before:
            _disable_op_determinism()


def _fit(config: Config, prepared: PreparedData, run_dir: Path, resume: bool, overwrite: bool,
         config_path: Optional[Path], log) -> dict:
    import keras
    import tensorflow as tf

    from segtrain.data.pipeline import (
        DataSpec,
        evaluation_dataset,
        steps_per_epoch,
        training_dataset,
    )
    from segtrain.engine.checkpoints import TrainingState
    from segtrain.engine.devices import is_chief, make_strategy, set_precision
    from segtrain.engine.trainer import (
        PlateauState,
        Trainer,
        current_learning_rate,
        logits_labeler,
        make_optimizer,
        make_schedule,
    )
    from segtrain.losses import build_loss
    from segtrain.metrics import metrics_from_confusion
    from segtrain.model import build_unet, output_channels

    train_cfg = config.train
    # The strategy first: MultiWorkerMirroredStrategy must configure collectives before TF initialises.
    strategy = make_strategy(train_cfg.distribute)
    replicas = strategy.num_replicas_in_sync
    if config.data.batch_size < replicas or config.data.batch_size % replicas:
        raise ConfigError(
            f"data.batch_size: the global batch of {config.data.batch_size} cannot be split evenly over "
            f"{replicas} replicas; use a multiple of {replicas} (e.g. --set data.batch_size={replicas * max(1, config.data.batch_size // replicas)})."
        )
    chief = is_chief(strategy)
    if chief:
        check_run_dir(run_dir, resume, overwrite)
    if train_cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(train_cfg.seed)
    policy = set_precision(train_cfg.precision)
    num_classes = len(config.data.classes)
    steps = steps_per_epoch(len(prepared.train_pairs), config.data.batch_size, train_cfg.steps_per_epoch)
    total_steps = steps * train_cfg.epochs

    with strategy.scope():
        model = build_unet(prepared.channels, output_channels(num_classes), config.model.depth,
                           config.model.base_filters, config.model.batch_norm, config.model.dropout)
        if replicas > 1:
            _synchronize_batch_norm(model)
        loss_fn = build_loss(config.loss, config.data.classes, prepared.class_weights)
        lr_scale = tf.Variable(1.0, dtype=tf.float32, trainable=False, name="lr_scale")
        optimizer = make_optimizer(train_cfg, make_schedule(train_cfg, total_steps, steps, lr_scale), policy)
        optimizer.build(model.trainable_variables)
        state = TrainingState(model, optimizer, run_dir / "checkpoints", train_cfg.keep_checkpoints,
                              writer=chief, lr_scale=lr_scale)
        restored = state.restore_latest() if resume else None
    if resume and restored is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'}: no checkpoint to resume from; run without --resume.")

    # Every input check has passed: only now is the run folder created or replaced.
    created_run_dir = False
    if chief:
        created_run_dir = overwrite or not run_dir.exists()
        prepare_run_dir(run_dir, resume, overwrite)
        save_config(config, run_dir / "config.yaml")
        write_json(prepared.class_stats, run_dir / "class_stats.json")
        write_json({"in_channels": prepared.channels, "num_classes": num_classes,
                           "precision": policy, "replicas": replicas,
                           "config_file": str(config_path) if config_path else None}, run_dir / RUN_INFO)

    start_epoch = int(state.epoch.numpy()) if restored else 0
    global_step = int(state.step.numpy()) if restored else 0
    spec = DataSpec(config.data, prepared.mapping, prepared.channels, 2**config.model.depth, train_cfg.seed)
    scratch = None
    cache_dir = run_dir / "cache"
    if not chief:
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="segtrain-worker-"))
        cache_dir = scratch / "cache"
    if config.data.cache == "disk":
        shutil.rmtree(cache_dir, ignore_errors=True)  # a killed run leaves a partial cache and its lock file
    train_ds = training_dataset(prepared.train_pairs, spec, cache_dir, start_element=global_step * config.data.batch_size)
    val_ds = evaluation_dataset(prepared.val_pairs, spec, max(1, min(config.data.batch_size, 4)))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_ds, val_ds = train_ds.with_options(options), val_ds.with_options(options)
    iterator = iter(strategy.experimental_distribute_dataset(train_ds))
    labeler = logits_labeler(config.predict.decision, config.predict.threshold, decision_cost_matrix(config))
    trainer = Trainer(strategy, model, loss_fn, optimizer, num_classes, grad_clip_norm=train_cfg.grad_clip_norm,
                      labeler=labeler)  # validation decides like eval, so best.keras is chosen by the reported rule
    plateau = PlateauState(train_cfg, state.lr_scale, state.plateau_wait) if train_cfg.schedule == "plateau" else None

    history_path = run_dir / "history.csv"
    rows = read_history(history_path, start_epoch) if restored else []
    monitor = train_cfg.monitor
    best, best_epoch = state.best_value, int(state.best_epoch.numpy())
    writer = tf.summary.create_file_writer(str(run_dir / "logs")) if chief else None
    if restored:
        log(f"Resuming {run_dir} at epoch {start_epoch + 1}, step {global_step} (from {restored}).")
    log(f"Training {model.name} on {len(prepared.train_pairs)} images ({steps} steps/epoch, "
        f"{train_cfg.epochs} epochs, {policy}, {replicas} replica(s)) -> {run_dir}")

    from tqdm import tqdm

    def save_checkpoint(epoch_done: int, where: str) -> None:
        if not trainer.weights_finite():
            raise TrainingDiverged(
                f"the weights became NaN or Inf {where} (global step {global_step}). The last good checkpoint is "
                f"kept in {run_dir / 'checkpoints'}. Lower train.learning_rate or set train.grad_clip_norm."
            )
        state.epoch_loss_sum.assign(loss_sum)
        state.epoch_loss_steps.assign(loss_steps)
        state.best.assign(float("nan") if best is None else best)
        state.best_epoch.assign(best_epoch)
        state.save(epoch_done, global_step)

    final_metrics = {}
    first_step_done = False
    try:
        with _StopFlag() as stop:
            epoch = start_epoch
            while epoch < train_cfg.epochs:
                step_in_epoch = global_step - epoch * steps
                resumed_mid_epoch = restored and epoch == start_epoch and step_in_epoch > 0
                loss_sum = float(state.epoch_loss_sum.numpy()) if resumed_mid_epoch else 0.0
                loss_steps = int(state.epoch_loss_steps.numpy()) if resumed_mid_epoch else 0
                bar = tqdm(total=steps, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{train_cfg.epochs}",
                           unit="step", dynamic_ncols=True, disable=None)
                started = time.perf_counter()
                images_seen = 0
                while step_in_epoch < steps:
                    try:
                        result = trainer.train_step(iterator)
                    except tf.errors.OpError as exc:
                        raise _data_error_from(exc) from None
                    first_step_done = True
                    if not result.finite:
                        bar.close()
                        raise TrainingDiverged(
                            f"loss became {result.loss} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                            f"(global step {global_step + 1}). The last good checkpoint is kept in "
                            f"{run_dir / 'checkpoints'}. Lower train.learning_rate or set train.grad_clip_norm."
                        )
                    loss_sum += result.loss
                    loss_steps += 1
                    global_step += 1
                    step_in_epoch += 1
                    images_seen += config.data.batch_size
                    elapsed = time.perf_counter() - started
                    bar.set_postfix(loss=f"{loss_sum / loss_steps:.4f}",
                                    img_s=f"{images_seen / max(elapsed, 1e-9):.1f}")
                    bar.update(1)
                    if trainer.stop_agreed(stop.signal_name is not None):
                        bar.close()
                        where = f"at epoch {epoch + 1}, step {step_in_epoch}"
                        save_checkpoint(epoch, where)
                        raise _interrupted(stop, where, config_path, run_dir)
                    every = train_cfg.checkpoint_every_steps
                    if every and global_step % every == 0 and step_in_epoch < steps:
                        save_checkpoint(epoch, f"at epoch {epoch + 1}, step {step_in_epoch}")
                bar.close()
                epoch += 1
                seconds = time.perf_counter() - started
                row = {"epoch": epoch, "step": global_step, "loss": loss_sum / loss_steps if loss_steps else None,
                       "lr": current_learning_rate(optimizer), "seconds": seconds,
                       "images_per_second": images_seen / max(seconds, 1e-9)}
                metrics = None
                validated = epoch % train_cfg.validate_every == 0 or epoch == train_cfg.epochs
                if validated:
                    try:
                        val_loss, cm = trainer.validate(val_ds)
                    except tf.errors.OpError as exc:
                        raise _data_error_from(exc) from None
                    metrics = metrics_from_confusion(cm, config.data.classes)
                    row["val_loss"] = val_loss
                    row["val_mean_iou"] = metrics["mean_iou"]
                    row["val_pixel_accuracy"] = metrics["pixel_accuracy"]
                    for name, values in metrics["per_class"].items():
                        row[f"val_iou_{name}"] = values["iou"]
                        row[f"val_dice_{name}"] = values["dice"]
                rows.append(row)
                value = row.get(monitor)
                improved = is_better(monitor, value, best)
                if improved:
                    best, best_epoch = value, epoch
                lowered = plateau.update(improved) if plateau is not None and validated else None
                if chief:  # the epoch's files first, the checkpoint (the commit point) last
                    write_history(rows, history_path)
                    save_model_atomic(model, run_dir / "last.keras")
                    if improved:
                        save_model_atomic(model, run_dir / "best.keras")
                    write_scalars(writer, row, epoch)
                    plot_history_png(rows, run_dir / "history.png")
                loss_sum, loss_steps = 0.0, 0
                save_checkpoint(epoch, f"after epoch {epoch}")
                if trainer.stop_agreed(stop.signal_name is not None):  # a signal during validation or saving
                    raise _interrupted(stop, f"after epoch {epoch}", config_path, run_dir)
                summary = f"epoch {epoch}: loss {row['loss']:.4f}"
                if metrics is not None:
                    summary += f", val_loss {row['val_loss']:.4f}, val_mean_iou {row['val_mean_iou']:.4f}"
                log(summary)
                if lowered is not None:
                    log(f"{monitor} has not improved for {train_cfg.plateau_patience} validated epoch(s): "
                        f"learning rate lowered to {current_learning_rate(optimizer):.3g}.")
                patience = train_cfg.early_stopping_patience
                stale = sum(1 for r in rows if int(r["epoch"]) > best_epoch and r.get(monitor) not in (None, ""))
                if patience is not None and best_epoch and stale >= patience:
                    log(f"Early stopping: {monitor} has not improved for {patience} epochs "
                        f"(best {best:.4f} at epoch {best_epoch}).")
                    break
    except DataError:
        # A file that passed the checks failed in the pipeline (changed on disk?): remove a run folder
        # this run created before it trained anything; never one that existed before.
        if chief and created_run_dir and not first_step_done and not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if chief:
        if not (run_dir / "best.keras").exists():
            save_model_atomic(model, run_dir / "best.keras")
        from segtrain.evaluate import evaluate_run

        final_metrics = evaluate_run(run_dir / "best.keras", config, prepared.val_pairs, prepared.mapping,
                                     run_dir, log=log)
        final_metrics["best_epoch"] = best_epoch
        from segtrain.atomic import write_json

        write_json(final_metrics, run_dir / "metrics.json")
    return final_metrics


def _interrupted(stop: _StopFlag, where: str, config_path: Optional[Path], run_dir: Path) -> Interrupted:
    reason = stop.signal_name or "a signal on another worker"
    return Interrupted(
        f"{reason}: stopped {where}; checkpoint saved. "
        f"Resume with: segtrain fit {run_dir / 'config.yaml'} --resume --out {run_dir}"
    )


def _synchronize_batch_norm(model) -> None:
    """BatchNorm statistics over the global batch (all replicas), as on one device; saved in the .keras config."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def _op_determinism_enabled() -> bool:
    try:
        from tensorflow.python.framework.config import is_op_determinism_enabled
    except ImportError:  # pragma: no cover - private API moved
        return False
    return bool(is_op_determinism_enabled())


def _disable_op_determinism() -> None:
    try:
        from tensorflow.python.framework.config import disable_op_determinism
    except ImportError:  # pragma: no cover - private API moved
        return
    disable_op_determinism()


def _data_error_from(exc) -> Exception:
    """A DataError raised inside the tf.data pipeline arrives wrapped in a TF error: unwrap its message."""
    message = str(exc)
    marker = "DataError: "
    if marker in message:
        text = message.split(marker, 1)[1].splitlines()[0].strip()
        return DataError(text)
    return exc
