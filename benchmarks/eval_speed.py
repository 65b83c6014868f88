"""Evaluation speed: `segtrain eval`, the forward pass through `Predictor`, fit's post-training step and fit's
per-epoch validation, each against the bare forward pass of the same model over the same pixels.

One fake run folder is built in a temporary folder from configs/camvid.yaml (data root
../shared/datasets/camvid beside the repo): config.yaml (segtrain.config.load_config / save_config),
best.keras (an untrained U-Net from segtrain.model.build_unet with the config's depth and filters, weights
seeded by keras.utils.set_random_seed), class_stats.json (segtrain.train.prepare_data's, so `class_weights` are
those of the config's loss.class_weights strategy: median_frequency for CamVid) and run.json
({"input_sample_type": "uint8", "in_channels": 3}). Then, in this one process, interleaved round by round
(`_common.alternate`, median over --repeats rounds):

  bare (call)       a compiled call `model(x, training=False)` (tf.function) per image, batch 1, logits fetched
                    to NumPy and discarded; the images are read beforehand as segtrain reads them
                    (segtrain.data.images.read_image) and zero-padded to a multiple of 2**depth.
  bare (predict)    the same with `model.predict(x, verbose=0)` per image.
  predictor         `segtrain.policy.predictor.Predictor.logits` over the same in-memory images (model loaded once).
  eval              `segtrain.evaluate(run, split=val)`: the API of `segtrain eval`, model load, reading the
                    files, metrics and every report.
  post-training     `segtrain.train._evaluate_best` (what `fit` runs after its loop: calibration + evaluation of
                    best.keras from one shared `SplitLogits`), called with a minimal stand-in engine inside
                    `training_process_settings` as in fit.
  validate          `Trainer.validate` over `evaluation_dataset` of the val pairs, built as
                    `segtrain.engine.setup.build_engine` and `RunData` build them (the train iterator of RunData
                    is left out: it would prefetch training batches in the background); what each epoch of fit
                    runs. Its dataset caches decoded images in memory, so its first run decodes and the next
                    ones read the cache, as fit's epochs after the first.

With --before DIR (a checkout of the code before the rebuild, e.g. `git worktree add /tmp/segtrain_before 4c0035b`)
a subprocess with PYTHONPATH=DIR times the old `segtrain.evaluate` and the old post-training
(`fit_calibration` + `evaluate_run`, as the old `_evaluate_best`) on a copy of the run folder (config.yaml
rewritten by the old code, keys it does not know dropped); skipped with a message when DIR is absent.

The bare time used in the ratios is the faster of the two bare variants. The last line is
`ratio: X`, X = eval / bare (target: <= 1.5).

    python benchmarks/eval_speed.py                      # CamVid val, all 101 images
    python benchmarks/eval_speed.py --images 10 --repeats 1
    python benchmarks/eval_speed.py --quick              # synthetic smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, SHARED_DATASETS, load_average, median_line  # noqa: E402

BEFORE_MARK = "EVAL_SPEED_BEFORE_JSON "


def quiet(*args, **kwargs) -> None:
    """A log that prints nothing (segtrain's tables and messages would drown the benchmark's lines)."""


# ---------------------------------------------------------------------------- data and the run folder


def subset_root(source: Path, target: Path, split: str, count: int) -> Path:
    """TARGET: a data set folder whose train split links to SOURCE's and whose `split` holds links to the first
    `count` pairs of SOURCE's (in find_pairs order)."""
    from segtrain.data.discovery import find_pairs

    pairs = find_pairs(source, split)[:count]
    target.mkdir(parents=True, exist_ok=True)
    (target / "train").symlink_to(Path(source).resolve() / "train")
    for kind in ("images", "masks"):
        (target / split / kind).mkdir(parents=True)
    for pair in pairs:
        (target / split / "images" / pair.image.name).symlink_to(pair.image.resolve())
        (target / split / "masks" / pair.mask.name).symlink_to(pair.mask.resolve())
    return target


def quick_config(work: Path) -> Path:
    """A synthetic data set (4 train, 3 val images of 90 x 90) and its config file, for --quick."""
    from _common import synthetic_config, write_dataset
    from segtrain.config import save_config

    root = write_dataset(work / "quick_data", 4, 3, 90)
    path = work / "quick.yaml"
    save_config(synthetic_config(root, 32, 2, 2, 4), path)
    return path


def build_run(config, prepared, run_dir: Path, seed: int):
    """The fake run folder: config.yaml, class_stats.json, run.json, best.keras (untrained, seeded)."""
    import keras

    from segtrain.atomic import write_json
    from segtrain.config import save_config
    from segtrain.model import build_unet, output_channels
    from segtrain.runs import save_model_atomic

    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    write_json(prepared.class_stats, run_dir / "class_stats.json")
    write_json({"input_sample_type": "uint8", "in_channels": prepared.channels}, run_dir / "run.json")
    keras.utils.set_random_seed(seed)
    model = build_unet(prepared.channels, output_channels(len(config.data.classes)), config.model.depth,
                       config.model.base_filters, config.model.batch_norm, config.model.dropout,
                       normalization=prepared.class_stats.get("normalization"))
    save_model_atomic(model, run_dir / "best.keras")
    return model


# ---------------------------------------------------------------------------- the timed variants


def make_variants(config, prepared, run_dir: Path, work: Path) -> tuple[dict, dict]:
    """{name: function returning its seconds} for the variants timed in this process, and facts to print."""
    import numpy as np
    import tensorflow as tf

    from segtrain.data.images import read_image
    from segtrain.data.pipeline import DataSpec, evaluation_dataset
    from segtrain.engine.devices import make_strategy, training_process_settings
    from segtrain.engine.setup import build_engine
    from segtrain.policy.predictor import Predictor
    from segtrain.runs import load_model
    from segtrain.train import _evaluate_best

    import segtrain

    pairs, divisor = prepared.val_pairs, 2**config.model.depth
    model_path = run_dir / "best.keras"
    images = [read_image(p.image, prepared.channels, config.data.max_image_pixels) for p in pairs]
    padded = []
    for image in images:
        h, w = image.shape[:2]
        ph, pw = -(-h // divisor) * divisor, -(-w // divisor) * divisor
        padded.append(np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)))[None])
    facts = {"images": len(images), "pixels": sum(i.shape[0] * i.shape[1] for i in images),
             "padded_pixels": sum(p.shape[1] * p.shape[2] for p in padded),
             "shapes": sorted({i.shape for i in images})}

    model = load_model(model_path)
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    predictor = Predictor.load(model_path, config, log=quiet)
    forward(padded[0]).numpy(), model.predict(padded[0], verbose=0), predictor.logits(images[0])  # trace once

    def bare_call():
        start = time.perf_counter()
        for x in padded:
            forward(x).numpy()
        return time.perf_counter() - start

    def bare_predict():
        start = time.perf_counter()
        for x in padded:
            model.predict(x, verbose=0)
        return time.perf_counter() - start

    def predictor_forward():
        start = time.perf_counter()
        for image in images:
            predictor.logits(image)
        return time.perf_counter() - start

    def evaluate():
        start = time.perf_counter()
        segtrain.evaluate(run_dir, split=config.data.val_split, out=work / "eval_after", log=quiet)
        return time.perf_counter() - start

    # what _evaluate_best reads of fit's engine: config, loop.best_epoch (and model only when best.keras is missing)
    engine_stand_in = SimpleNamespace(config=config, model=model, loop=SimpleNamespace(best_epoch=1))

    def post_training():
        with training_process_settings(config.train):
            start = time.perf_counter()
            metrics = _evaluate_best(engine_stand_in, prepared, run_dir, quiet)
            seconds = time.perf_counter() - start
        facts.setdefault("post_training_forward_passes", []).append(metrics.get("post_training_forward_passes"))
        facts.setdefault("post_training_seconds_reported", []).append(metrics.get("post_training_seconds"))
        return seconds

    # fit's validation: build_engine's Trainer (its loss with the class weights, its labeler) and RunData's val set
    with training_process_settings(config.train) as precision:
        strategy = make_strategy(config.train.distribute)
        engine = build_engine(config, prepared, strategy, precision, work / "engine_run", True, False)
    engine.model.set_weights(model.get_weights())
    spec = DataSpec(config.data, prepared.mapping, prepared.channels, divisor, config.train.seed, prepared.locations)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    val_ds = evaluation_dataset(pairs, spec, max(1, min(config.data.batch_size, 4))).with_options(options)

    def validate():
        with training_process_settings(config.train):
            start = time.perf_counter()
            engine.trainer.validate(val_ds)
            return time.perf_counter() - start

    variants = {"bare (call)": bare_call, "bare (predict)": bare_predict, "predictor": predictor_forward,
                "post-training": post_training, "eval": evaluate, "validate": validate}
    return variants, facts


# ---------------------------------------------------------------------------- the code before, in a subprocess


def run_before(before: Path, run_dir: Path, split: str, repeats: int, timeout: float) -> dict:
    """Times of the old eval and post-training from a subprocess importing the package in `before`."""
    env = {**os.environ, "PYTHONPATH": str(before), "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, str(Path(__file__).resolve()), "--before-worker", str(run_dir), "--split", split,
               "--before-repeats", str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=before, env=env, timeout=timeout)
    for line in result.stdout.splitlines():
        if line.startswith(BEFORE_MARK):
            return json.loads(line[len(BEFORE_MARK):])
    raise RuntimeError(f"the before subprocess failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n"
                       f"{result.stderr[-4000:]}")


def _prune(raw: dict, cls) -> list[str]:
    """Drop the keys of `raw` that dataclass `cls` (and its nested dataclasses) does not have; return them."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    dropped = []
    for key in list(raw):
        if key not in hints:
            dropped.append(key)
            del raw[key]
            continue
        types = [hints[key], *typing.get_args(hints[key])]
        nested = next((t for t in types if dataclasses.is_dataclass(t)), None)
        if nested is not None and isinstance(raw[key], dict):
            dropped += [f"{key}.{k}" for k in _prune(raw[key], nested)]
    return dropped


def before_worker(args) -> None:
    """(Runs with PYTHONPATH=the old checkout.) Time the old `segtrain.evaluate` and the old post-training
    (`fit_calibration` + `evaluate_run`) on a copy of the run folder; print one JSON line."""
    import yaml

    import segtrain

    here = Path(segtrain.__file__).resolve()
    expected = Path(os.environ["PYTHONPATH"]).resolve()
    if expected not in here.parents:
        raise SystemExit(f"imported segtrain from {here}, not from {expected}")
    from segtrain import config as old_config
    from segtrain.calibration import fit_calibration
    from segtrain.data.discovery import find_pairs
    from segtrain.data.masks import MaskMapping
    from segtrain.evaluation import evaluate_run
    from segtrain.runs import load_model

    source = Path(args.before_worker)
    run_dir = source.parent / "run_before"
    run_dir.mkdir()
    for name in ("best.keras", "class_stats.json", "run.json"):
        shutil.copy2(source / name, run_dir / name)
    raw = yaml.safe_load((source / "config.yaml").read_text())
    dropped = [k for section, cls in (("data", old_config.DataConfig), ("model", old_config.ModelConfig),
                                      ("train", old_config.TrainConfig), ("predict", old_config.PredictConfig))
               if isinstance(raw.get(section), dict) for k in (f"{section}.{d}" for d in _prune(raw[section], cls))]
    config = old_config.config_from_dict(raw)
    old_config.save_config(config, run_dir / "config.yaml")
    model_path = run_dir / "best.keras"
    pairs = find_pairs(config.data.root, args.split)
    mapping = MaskMapping(config.data.mask, config.data.classes)
    import numpy as np

    model = load_model(model_path)  # TensorFlow's start-up outside the timings (the new side has it done too)
    model.predict(np.zeros((1, 64, 64, int(model.input_shape[-1])), np.float32), verbose=0)
    del model
    try:
        from segtrain.engine.devices import training_process_settings
    except ImportError:  # pragma: no cover - older layouts
        training_process_settings = None

    times = {"post-training": [], "eval": []}
    for _ in range(args.before_repeats):
        # the old _evaluate_best: calibration.json (its own forward pass), then evaluate_run (another one)
        settings = training_process_settings(config.train) if training_process_settings else None
        if settings is not None:
            settings.__enter__()
        try:
            start = time.perf_counter()
            if config.predict.calibrate:
                fit_calibration(model_path, config, pairs, mapping, run_dir, args.split, quiet)
            evaluate_run(model_path, config, pairs, mapping, run_dir, log=quiet)
            times["post-training"].append(time.perf_counter() - start)
        finally:
            if settings is not None:
                settings.__exit__(None, None, None)
        start = time.perf_counter()
        segtrain.evaluate(run_dir, split=args.split, out=run_dir / "eval_before", log=quiet)
        times["eval"].append(time.perf_counter() - start)
    tile = config.predict.tile_size or (2 * config.data.crop if config.data.crop else 512)
    print(BEFORE_MARK + json.dumps({"times": times, "package": str(here.parent), "dropped_keys": dropped,
                                    "tile_size": tile, "images": len(pairs)}), flush=True)


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "camvid.yaml"))
    parser.add_argument("--data", default=str(SHARED_DATASETS / "camvid"),
                        help="data set root (default: ../shared/datasets/camvid beside the repo)")
    parser.add_argument("--images", type=int, default=None, help="use the first N val images (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the in-process variants (median)")
    parser.add_argument("--before", default="/tmp/segtrain_before",
                        help="checkout of the code before (git worktree add /tmp/segtrain_before 4c0035b); "
                             "skipped when absent; '' to skip")
    parser.add_argument("--before-repeats", type=int, default=1,
                        help="runs of the old eval and post-training (each is several times slower)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained model's weights")
    parser.add_argument("--quick", "--tiny", action="store_true",
                        help="smoke run: 3 synthetic 90 x 90 val images, depth 2, 4 filters, 1 round")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--build-run", default=None, metavar="DIR",
                        help="only build the fake run folder (DIR/run, its data subset in DIR/data) and stop: for "
                             "profiling `segtrain eval DIR/run` on its own")
    parser.add_argument("--before-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--split", default="val", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.before_worker:
        before_worker(args)
        return

    from _common import machine_line

    print(machine_line())
    load_start = load_average()
    if args.build_run:
        work = Path(args.build_run)
        work.mkdir(parents=True, exist_ok=False)
        run(args, work, load_start)
        return
    work = Path(tempfile.mkdtemp(prefix="segtrain_eval_speed_"))
    try:
        run(args, work, load_start)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, load_start: str) -> None:
    from _common import alternate
    from segtrain.config import load_config
    from segtrain.engine.devices import configure_cpu_devices
    from segtrain.train import prepare_data

    configure_cpu_devices()
    if args.quick:
        config_path, source_root = quick_config(work), None
        args.repeats, args.before_repeats = 1, 1
    else:
        config_path, source_root = Path(args.config), Path(args.data).resolve()
    config = load_config(config_path)
    if source_root is not None:
        from segtrain.data.discovery import find_pairs

        total = len(find_pairs(source_root, config.data.val_split))
        if args.images is not None and args.images < total:
            source_root = subset_root(source_root, work / "data", config.data.val_split, args.images)
        config.data.root = str(source_root)
    elif args.images is not None:
        print("--images is ignored with --quick")
    start = time.perf_counter()
    prepared = prepare_data(config)  # fit's own checks and class-statistics pass: class_stats.json as fit writes it
    prepare_seconds = time.perf_counter() - start
    run_dir = work / "run"
    model = build_run(config, prepared, run_dir, args.seed)
    weights = prepared.class_stats.get("class_weights")
    print(f"config: {config_path} (data root {config.data.root}); model: segtrain.model.build_unet, depth "
          f"{config.model.depth}, base filters {config.model.base_filters}, {model.count_params():,} parameters, "
          f"untrained (seed {args.seed}); class_stats.json from segtrain.train.prepare_data "
          f"({prepare_seconds:.1f} s): class_weights of the config's strategy {config.loss.class_weights!r}"
          + (f" = [{', '.join(f'{w:.3g}' for w in weights)}]" if weights else ""))
    predict = config.predict
    print(f"predict: tile_size {predict.tile_size}, overlap {predict.overlap}, tta {predict.tta}, decision "
          f"{predict.decision}, prior_correction {predict.prior_correction}, calibrate {predict.calibrate}")
    if args.build_run:
        print(f"built {run_dir}")
        return
    variants, facts = make_variants(config, prepared, run_dir, work)
    print(f"val split {config.data.val_split!r}: {facts['images']} images, sizes "
          f"{', '.join(f'{s[0]}x{s[1]}' for s in facts['shapes'][:4])}{' ...' if len(facts['shapes']) > 4 else ''}, "
          f"{facts['pixels'] / 1e6:.2f} Mpx ({facts['padded_pixels'] / 1e6:.2f} Mpx padded to a multiple of "
          f"{2**config.model.depth}); {args.repeats} interleaved round(s), median of each")

    times = alternate(variants, args.repeats)
    for name, values in times.items():
        print(median_line(f"{name:<14}", values, "s"))
    print(f"post-training: forward passes over val per call {facts.get('post_training_forward_passes')}, "
          f"its own post_training_seconds {facts.get('post_training_seconds_reported')}")
    med = {name: statistics.median(values) for name, values in times.items()}
    bare_name = min(("bare (call)", "bare (predict)"), key=lambda n: med[n])
    bare = med[bare_name]

    before = None
    before_dir = Path(args.before) if args.before else None
    if before_dir is None or not (before_dir / "segtrain" / "__init__.py").is_file():
        print(f"before: skipped, no checkout at {args.before or '(none given)'} "
              "(make one with `git worktree add /tmp/segtrain_before 4c0035b`, or pass --before DIR)")
    else:
        try:
            before = run_before(before_dir, run_dir, config.data.val_split, args.before_repeats,
                                timeout=max(600.0, 40 * (med["post-training"] + med["eval"]) * args.before_repeats))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"before: failed: {exc}")
        if before is not None:
            print(f"before: {before['package']} in a subprocess, {before['images']} images, tile {before['tile_size']} "
                  f"(2 x crop), {args.before_repeats} run(s) each; config keys it does not know dropped: "
                  f"{', '.join(before['dropped_keys']) or 'none'}")
            for name in ("post-training", "eval"):
                print(median_line(f"before {name:<14}", before["times"][name], "s"))

    print(f"ratios (bare = {bare_name}, the faster, {bare:.2f} s):")
    print(f"  eval/bare                {med['eval'] / bare:.3f}")
    print(f"  predictor-forward/bare   {med['predictor'] / bare:.3f}")
    print(f"  post-training/bare       {med['post-training'] / bare:.3f}")
    print(f"  validate/bare            {med['validate'] / bare:.3f}")
    print(f"  bare predict/bare call   {med['bare (predict)'] / med['bare (call)']:.3f}")
    if before is not None:
        old_eval, old_post = (statistics.median(before["times"][n]) for n in ("eval", "post-training"))
        print(f"  before-eval/after-eval                     {old_eval / med['eval']:.3f}")
        print(f"  before-post-training/after-post-training   {old_post / med['post-training']:.3f}")
        print(f"fit's post-training on {config.data.val_split}: before {old_post:.1f} s, after "
              f"{med['post-training']:.1f} s")
    print(f"{load_start} at start, {load_average()} at end")
    print(f"ratio: {med['eval'] / bare:.3f}")


if __name__ == "__main__":
    main()
