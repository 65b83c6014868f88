"""`segtrain fit`: check the inputs, prepare the run folder, run the training loop, evaluate.

Every input check (config, data pairs, every image decoded once, mask values,
checkpoint compatibility) runs before the run folder is created or replaced, so bad
input never touches an earlier run. The loop itself is `segtrain.engine.loop`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click
import numpy as np

import segtrain.tracking as tracking
from segtrain.atomic import write_json
from segtrain.config import Config, save_config
from segtrain.data.discovery import Pair, find_pairs
from segtrain.data.holdout import HeldOutSplit, make_holdout
from segtrain.data.holdout import describe as describe_holdout
from segtrain.data.images import image_channels, image_sample_type
from segtrain.data.masks import MaskMapping
from segtrain.data.scan import scan_pairs, scan_training_set
from segtrain.errors import CheckpointError, DataError
from segtrain.history import read_history
from segtrain.runs import RUN_INFO, check_run_dir, prepare_run_dir, save_model_atomic

LOCATIONS_FILE = "class_locations.npz"
"""Where each sampled class lies (data.sampling), recorded by the class-statistics pass; read back on resume."""


@dataclass
class PreparedData:
    """Checked data: pairs, mapping, channels and the training class statistics."""

    train_pairs: list[Pair]
    val_pairs: list[Pair]
    mapping: MaskMapping
    channels: int
    class_stats: dict
    class_weights: Optional[np.ndarray]
    locations: Optional[object] = None
    """`segtrain.data.sampling.ClassLocations` of the training pairs with data.sampling, else None."""
    holdout: Optional[HeldOutSplit] = None
    """The images data.val_fraction held out of the training split (RUN/split.json), else None."""


def prepare_data(config: Config, cached_stats: Optional[dict] = None,
                 cached_locations: Optional[Path] = None, holdout: Optional[HeldOutSplit] = None) -> PreparedData:
    """Find and check every pair, and count class pixels over the whole training set in one pass.

    On resume the counts cached in class_stats.json are reused (and the files are not
    checked again), and so are the pixel statistics of data.normalize: dataset; the weights are
    always recomputed from the counts, so they follow the config's current loss.class_weights.
    With data.sampling the same pass records where each sampled class lies; on resume those
    locations are read from `cached_locations` (class_locations.npz). With data.val_fraction the validation images
    are `holdout`'s (the run's split.json on resume), else chosen now (`segtrain.data.holdout`).
    """
    from segtrain.class_weights import ClassCounter, class_stats_dict

    data = config.data
    val_dir = Path(data.root) / data.val_split
    if data.val_fraction is None and Path(data.root).is_dir() and not val_dir.is_dir():  # before the long pass
        raise DataError(f"{val_dir}: split folder not found. Create it with images/ and masks/ inside, or set "
                        f"data.val_fraction: 0.2 to validate on a fifth of {data.train_split}/ (recorded per run).")
    if data.val_fraction is not None and holdout is None:
        holdout = make_holdout(data, config.train.seed)
    source = find_pairs(data.root, data.train_split) if holdout is not None else None
    if cached_stats is None:
        train = scan_training_set(data, description="class statistics",
                                  pairs=None if holdout is None else holdout.select(source, held_out=False))
        val_pairs = find_pairs(data.root, data.val_split) if holdout is None else holdout.select(source, True)
        scan_pairs(val_pairs, train.mapping, train.channels, data.max_image_pixels, None,
                   description="checking val pairs", reference=train.pairs[0].image)
        train_pairs, mapping, channels, counter = train
    else:
        if list(cached_stats.get("classes", [])) != list(data.classes):
            raise CheckpointError(
                f"data.classes: the run was trained with classes {cached_stats.get('classes')} but the config names "
                f"{list(data.classes)}. Resume with the run's own config.yaml, or start a new run with --out."
            )
        if holdout is None:
            train_pairs, val_pairs = find_pairs(data.root, data.train_split), find_pairs(data.root, data.val_split)
        else:
            train_pairs, val_pairs = holdout.select(source, held_out=False), holdout.select(source, held_out=True)
        mapping = MaskMapping(data.mask, data.classes)
        channels = image_channels(train_pairs[0].image)
        counter = ClassCounter(len(data.classes), _cached_locations(data, cached_locations, len(train_pairs)))
        counter.counts[:] = cached_stats["counts"]
        counter.image_pixels[:] = cached_stats["image_pixels"]
        counter.num_images = cached_stats["num_images"]
    strategy = config.loss.class_weights
    stats = class_stats_dict(counter, data.classes, strategy, config.loss.max_weight, config.loss.class_weights_from)
    if cached_stats is not None:
        normalization = _cached_normalization(data, cached_stats, channels)
        if normalization is not None:
            stats["normalization"] = normalization
    weights = None if strategy == "none" else np.asarray(stats["class_weights"], dtype=np.float32)
    return PreparedData(train_pairs, val_pairs, mapping, channels, stats, weights, counter.locations, holdout)


def _cached_normalization(data, cached_stats: dict, channels: int) -> Optional[dict]:
    """On resume with data.normalize: dataset, the statistics the run computed (they are built into its model),
    checked against the config and the images' channels."""
    normalization = cached_stats.get("normalization")
    if data.normalize != "dataset":
        if normalization is not None:
            raise CheckpointError("data.normalize: the run was trained with normalize: dataset (class_stats.json) but "
                                  f"the config says {data.normalize}. Resume with the run's own config.yaml, or "
                                  "start a new run with --out.")
        return None
    if normalization is None:
        raise CheckpointError("data.normalize: the run was trained without dataset statistics (class_stats.json "
                              "has no normalization). Resume with the run's own config.yaml, or start a new run "
                              "with --out.")
    if len(normalization.get("low", [])) != channels:
        raise CheckpointError(f"data.normalize: the run's statistics are for {len(normalization.get('low', []))} "
                              f"channel(s) but the images have {channels}. Resume on the run's own data.")
    return normalization


def _cached_locations(data, path: Optional[Path], num_pairs: int):
    """On resume with data.sampling, the class locations the run recorded (class_locations.npz), checked."""
    from segtrain.data.sampling import ClassLocations, class_shares, new_locations

    if new_locations(data) is None:
        if path is not None and path.is_file():
            raise CheckpointError(f"data.sampling: the run was trained with class-aware sampling ({path.name}) but "
                                  "the config has none. Resume with the run's own config.yaml, or start a new run.")
        return None
    if path is None or not path.is_file():
        raise CheckpointError("data.sampling: the run has no class_locations.npz (was it trained without "
                              "data.sampling?). Resume with the run's own config.yaml, or start a new run with --out.")
    locations = ClassLocations.load(path)
    if not locations.matches(class_shares(data), data.crop, data.resize) or locations.num_images != num_pairs:
        raise CheckpointError(f"data.sampling: {path} was recorded for other sampling settings (shares, crop, resize "
                              "or training images) than the config's. Resume with the run's own config.yaml, or "
                              "start a new run with --out.")
    return locations


# ---------------------------------------------------------------------------- fit


def run_fit(config: Config, run_dir: Path, resume: bool = False, overwrite: bool = False,
            config_path: Optional[Path] = None, log=click.echo) -> dict:
    """Train from a checked config into run_dir; returns the final metrics dict.

    The outline: check the inputs (data, config, checkpoint) before anything is written,
    prepare the run folder, run the training loop (`segtrain.engine.loop`), evaluate
    best.keras on the validation split. The process-global settings it changes (Keras
    dtype policy, TF op determinism) are restored when it returns.
    """
    from segtrain.engine.devices import configure_cpu_devices, is_chief, make_strategy, training_process_settings
    from segtrain.engine.setup import build_engine

    configure_cpu_devices()  # before anything initialises TensorFlow
    holdout = HeldOutSplit.load(run_dir) if resume and config.data.val_fraction is not None else None
    prepared = prepare_data(config, _cached_stats(run_dir, resume), run_dir / LOCATIONS_FILE if resume else None,
                            holdout)
    if prepared.holdout is not None:
        log(describe_holdout(prepared.holdout, len(prepared.train_pairs)))
    for warning in prepared.class_stats.get("warnings", []):
        log(f"warning: {warning}")
    # The strategy first: MultiWorkerMirroredStrategy must configure collectives before TF initialises.
    strategy = make_strategy(config.train.distribute)
    chief = is_chief(strategy)
    if chief:
        check_run_dir(run_dir, resume, overwrite)
        tracking.check(config)  # tracking: mlflow: MLflow installed and its store opens, before the run folder
    with training_process_settings(config.train) as policy:
        engine = build_engine(config, prepared, strategy, policy, run_dir, chief, resume,
                              history_rows=lambda epoch: read_history(run_dir / "history.csv", epoch))
        created_run_dir = chief and (overwrite or not run_dir.exists())
        if chief:  # every input check has passed: only now is the run folder created or replaced
            _write_run_header(config, prepared, engine, run_dir, resume, overwrite, config_path)
        training_seconds = _train(engine, prepared, run_dir, resume, created_run_dir, log)
        if not chief:
            return {}
        metrics = _evaluate_best(engine, prepared, run_dir, log, training_seconds)
        _write_report(run_dir, log)
        tracking.finish(run_dir, config, metrics, log)  # last: every file of the run folder is written
        return metrics


def _cached_stats(run_dir: Path, resume: bool) -> Optional[dict]:
    """On resume, the class statistics the run already computed (class_stats.json)."""
    path = run_dir / "class_stats.json"
    return json.loads(path.read_text()) if resume and path.is_file() else None


def _write_run_header(config: Config, prepared: PreparedData, engine, run_dir: Path, resume: bool, overwrite: bool,
                      config_path: Optional[Path]) -> None:
    """Create (or replace) the run folder and write config.yaml, split.json (data.val_fraction), class_stats.json
    (and class_locations.npz with data.sampling) and run.json."""
    prepare_run_dir(run_dir, resume, overwrite)
    save_config(config, run_dir / "config.yaml")
    if prepared.holdout is not None and not resume:
        prepared.holdout.save(run_dir)
    if prepared.locations is not None:  # before class_stats.json, whose presence means a resume reuses both
        prepared.locations.save(run_dir / LOCATIONS_FILE)
    write_json(prepared.class_stats, run_dir / "class_stats.json")
    write_json({"in_channels": prepared.channels, "num_classes": len(config.data.classes),
                "precision": engine.policy, "replicas": engine.replicas,
                "input_sample_type": image_sample_type(prepared.train_pairs[0].image),
                "config_file": str(config_path) if config_path else None}, run_dir / RUN_INFO)


def _train(engine, prepared: PreparedData, run_dir: Path, resume: bool, created_run_dir: bool, log) -> float:
    """Run the loop; a data error before the first step removes a run folder this run created. Returns the loop's
    seconds in this process (a resumed run: since the resume)."""
    import time

    from segtrain.engine.loop import run_training
    from segtrain.engine.setup import RunData

    loop, train = engine.loop, engine.config.train
    if engine.restored:
        log(f"Resuming {run_dir} at epoch {loop.epoch + 1}, step {loop.global_step} (from {engine.restored}).")
    if train.budget is not None and engine.plan is None:
        shape = f"within a budget of {train.budget}, its steps planned from the step time measured first"
    elif engine.plan is not None:
        shape = (f"{loop.steps_per_epoch} steps/epoch, {engine.epochs} epochs, {engine.plan.total_steps} steps "
                 f"planned for the {train.budget} budget in {run_dir / 'budget.json'}")
    else:
        shape = f"{loop.steps_per_epoch} steps/epoch, {train.epochs} epochs"
    log(f"Training {engine.model.name} on {len(prepared.train_pairs)} images ({shape}, {engine.policy}, "
        f"{engine.replicas} replica(s)) -> {run_dir}")
    start_step = loop.global_step
    data = RunData(engine.config, prepared, engine, run_dir)
    started = time.perf_counter()
    try:
        run_training(engine, data, run_dir, log)
    except DataError:
        # A file that passed the checks failed in the pipeline (changed on disk?): remove a run folder
        # this run created before it trained anything; never one that existed before.
        if created_run_dir and loop.global_step == start_step and not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        data.close()
    seconds = time.perf_counter() - started
    log(_training_time_report(engine, seconds, start_step))
    return seconds


def _training_time_report(engine, seconds: float, start_step: int) -> str:
    """The training loop's wall time in this process (with a budget: against it); calibration and evaluation,
    which come after it, are not part of it."""
    from segtrain.engine.budget import clock_text

    loop, plan = engine.loop, engine.plan
    text = f"Training took {clock_text(seconds)}, steps {start_step} to {loop.global_step}"
    if plan is not None and start_step == 0:
        text += (f": {seconds / plan.budget_seconds:.0%} of the {plan.budget} budget "
                 f"({clock_text(plan.planned_seconds)} planned for {plan.total_steps} steps)")
        if seconds > plan.budget_seconds:
            text += f", {clock_text(seconds - plan.budget_seconds)} over it (the steps ran slower than measured)"
    elif plan is not None:
        text += f" in this process, of the {plan.total_steps} steps planned for the {plan.budget} budget"
    return text + ". Calibration and evaluation follow, outside the training time."


def _evaluate_best(engine, prepared: PreparedData, run_dir: Path, log, training_seconds: float = 0.0) -> dict:
    """best.keras (last.keras if no epoch improved) on the validation split, from ONE forward pass over it: the
    temperature (unless predict.calibrate is false) into policy.json, then metrics.json and the reports from the
    same logits. The time it took is reported apart from training's (metrics.json `post_training_seconds`)."""
    import time

    from segtrain.evaluation import evaluate_split
    from segtrain.policy.calibrate import fit_temperature_on, store_calibration
    from segtrain.policy.predictor import Predictor, SplitLogits
    from segtrain.policy.store import StoredPolicy, resolve_policy, trained_class_weights, write_stored

    start = time.perf_counter()
    model_path = run_dir / "best.keras"
    if not model_path.exists():
        save_model_atomic(engine.model, model_path)
    config, split = engine.config, engine.config.data.val_split
    predictor = Predictor.load(model_path, config, log=log, use_calibration=False, use_tuned=False)
    split_logits = SplitLogits(predictor, prepared.val_pairs, prepared.mapping, "validating best.keras")
    if config.predict.calibrate:
        store_calibration(fit_temperature_on(split_logits, split), model_path, config, run_dir, log)
    else:
        write_stored(StoredPolicy.new(model_path, trained_class_weights(config, run_dir)), run_dir)
    resolved = resolve_policy(model_path, config, log=log)
    split_logits.predictor = Predictor(predictor.model, config, resolved.policy, resolved)
    metrics = evaluate_split(split_logits, split, run_dir, log=log, model_path=model_path)
    metrics["best_epoch"] = engine.loop.best_epoch
    metrics["post_training_seconds"] = round(time.perf_counter() - start, 2)
    metrics["post_training_forward_passes"] = split_logits.forward_passes
    metrics["training_seconds"] = round(training_seconds, 2)
    write_json(metrics, run_dir / "metrics.json")
    log(f"After training: calibration and evaluation of best.keras took {metrics['post_training_seconds']:.1f} s "
        f"({split_logits.forward_passes} forward pass(es) over {split}).")
    return metrics


def _write_report(run_dir: Path, log) -> None:
    """RUN/report.html (`segtrain.html_report`): a view of the files written; a finished run never fails over it."""
    from segtrain.html_report import write_report

    try:
        log(f"Report: {write_report(run_dir)}")
    except Exception as exc:  # noqa: BLE001 - the run's own files are complete; the page can be redone
        log(f"warning: report.html was not written ({type(exc).__name__}: {exc}); `segtrain report {run_dir}` "
            "writes it.")
