"""Training throughput of segtrain's real path against plain Keras `model.fit` on in-memory tensors.

segtrain: image and mask files on disk, Pillow decode, cache, shuffle, random crop and
flips/rot90 in tf.data, the class-weighted cross-entropy + Jaccard loss, the Trainer's
tf.function step under the tf.distribute strategy, the loss fetched every step and the
tqdm bar of run_fit (the objects built as `run_fit` builds them). Ceiling: the same
U-Net (segtrain.model.build_unet), batch and crop, compiled with plain Keras
(`model.compile(Adam, BinaryCrossentropy(from_logits=True))`, Keras defaults: no XLA on
the CPU, one step per call) and fed pre-cropped batches held in memory.
The two are timed in alternation, medians over repeats; a cross-check runs the
real `segtrain.train.run_fit` and reads the images/s it records per epoch in history.csv.
The last line is `ratio: X`, X = segtrain images/s / Keras images/s (target: X >= 0.90).

    python benchmarks/fit_throughput.py                 # 64 images 256x256, crop 128, batch 8, depth 4
    python benchmarks/fit_throughput.py --prototypes    # also time candidate engine changes
    python benchmarks/fit_throughput.py --tiny          # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from _common import (SegtrainSetup, alternate, in_memory_batches, machine_line, median_line,  # noqa: E402
                     synthetic_config, write_dataset)


def keras_ceiling(setup: SegtrainSetup, batches: int):
    """Plain Keras: the same U-Net, compiled with Adam and BCE, fed in-memory crops. Returns (model, dataset)."""
    from segtrain.model import build_unet, output_channels

    config = setup.config
    keras.utils.set_random_seed(1)
    model = build_unet(setup.prepared.channels, output_channels(len(config.data.classes)), config.model.depth,
                       config.model.base_filters, config.model.batch_norm, config.model.dropout)
    model.compile(optimizer=keras.optimizers.Adam(config.train.learning_rate),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    images, masks = in_memory_batches(setup.prepared.train_pairs, setup.spec, batches)
    targets = np.clip(masks, 0, 1).astype(np.float32)[..., None]
    ds = tf.data.Dataset.from_tensor_slices((images, targets)).batch(config.data.batch_size, drop_remainder=True)
    return model, ds.cache().repeat().prefetch(tf.data.AUTOTUNE)


class MultiStepTrainer:
    """Prototype of an engine change: k optimizer steps per tf.function call (like Keras's steps_per_execution).

    The loss of every step is still returned (a (k,) tensor), so NaN checks and the progress bar keep
    their per-step figures; only the Python round trip per step goes away.
    """

    def __init__(self, trainer, k: int, jit: bool = False):
        self.trainer, self.k = trainer, k
        replica_step = trainer._replica_train_step
        if jit:
            replica_step = tf.function(replica_step, jit_compile=True)

        def steps(iterator):
            losses = tf.TensorArray(tf.float32, size=k)
            for i in tf.range(k):
                images, masks = next(iterator)
                per_replica = trainer.strategy.run(replica_step, args=(images, masks))
                losses = losses.write(i, trainer.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
            return losses.stack()

        self._steps = tf.function(steps)

    def run_steps(self, iterator, n: int) -> None:
        for _ in range(max(1, n // self.k)):
            losses = self._steps(iterator).numpy()
            if not np.isfinite(losses).all():
                raise RuntimeError("non-finite loss")


class JitTrainer:
    """Prototype of an engine change: the replica step compiled with XLA (tf.function(jit_compile=True))."""

    def __init__(self, trainer):
        self.trainer = trainer
        replica_step = tf.function(trainer._replica_train_step, jit_compile=True)

        def step(iterator):
            images, masks = next(iterator)
            per_replica = trainer.strategy.run(replica_step, args=(images, masks))
            return trainer.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        self._step = tf.function(step)

    def run_steps(self, iterator, n: int) -> None:
        for _ in range(n):
            if not np.isfinite(float(self._step(iterator))):
                raise RuntimeError("non-finite loss")


def run_fit_cross_check(args, root: Path, work: Path) -> list[float]:
    """The real `run_fit`: images/s it writes to history.csv for every epoch after the first (tracing)."""
    from segtrain.train import run_fit

    config = synthetic_config(root, args.crop, args.batch, args.depth, args.base_filters, args.cache,
                              {"train.epochs": args.fit_epochs, "train.steps_per_epoch": args.steps,
                               "train.validate_every": 1000})
    run_dir = work / "run_fit"
    run_fit(config, run_dir, overwrite=True, log=lambda *a, **k: None)
    with (run_dir / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [float(r["images_per_second"]) for r in rows[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="training images written to disk")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--format", default="png", choices=["png", "jpg"], help="image file format")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--cache", default="memory", choices=["memory", "disk", "none"],
                        help="segtrain's data.cache (memory is the default config's)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fit-epochs", type=int, default=4, help="epochs of the run_fit cross-check (0: skip it)")
    parser.add_argument("--prototypes", action="store_true",
                        help="also time candidate engine changes (k steps per call, XLA)")
    parser.add_argument("--steps-per-call", type=int, default=10, help="k of the multi-step prototype")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 8 images 64 px, crop 32, depth 2, 2 repeats")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.size, args.crop, args.batch, args.depth, args.base_filters = 8, 64, 32, 4, 2, 4
        args.steps, args.repeats, args.fit_epochs, args.steps_per_call = 4, 2, 2, 2

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="segtrain_fit_bench_") as tmp:
        work = Path(tmp)
        root = write_dataset(work / "data", args.images, 2, args.size, image_ext=f".{args.format}")
        config = synthetic_config(root, args.crop, args.batch, args.depth, args.base_filters, args.cache)
        setup = SegtrainSetup(config, work, total_steps=10_000)
        print(f"model: segtrain.model.build_unet, depth {args.depth}, base filters {args.base_filters}, "
              f"{setup.model.count_params():,} parameters; {args.images} {args.format.upper()} images "
              f"{args.size}x{args.size} on disk, crop {args.crop}, batch {args.batch}, data.cache {args.cache}; "
              f"{setup.strategy.__class__.__name__}, {setup.policy}")
        print(f"segtrain loss: {setup.loss_fn.__class__.__name__} (cross_entropy + 0.5 jaccard, balanced class "
              f"weights {np.round(setup.prepared.class_weights, 3).tolist()}); Keras loss: BinaryCrossentropy")
        model, keras_ds = keras_ceiling(setup, max(2, args.images // args.batch))
        steps_per_epoch = max(1, -(-args.images // args.batch))
        print(f"{args.steps} steps per timed run, {args.repeats} repeats, alternated; warm-up "
              f"{steps_per_epoch + 2} steps each (traces, fills the cache)")

        setup.run_steps(steps_per_epoch + 2)
        model.fit(keras_ds, epochs=1, steps_per_epoch=steps_per_epoch + 2, verbose=0, shuffle=False)
        images_per_run = args.steps * args.batch

        def segtrain_run() -> float:
            return images_per_run / timed_call(lambda: setup.run_steps(args.steps))

        def keras_run() -> float:
            return images_per_run / timed_call(
                lambda: model.fit(keras_ds, epochs=1, steps_per_epoch=args.steps, verbose=0, shuffle=False))

        variants = {"segtrain": segtrain_run, "keras": keras_run}
        if args.prototypes:
            multi = MultiStepTrainer(setup.trainer, args.steps_per_call)
            jit = JitTrainer(setup.trainer)
            multi.run_steps(setup.iterator, args.steps_per_call)
            jit.run_steps(setup.iterator, 2)
            variants[f"proto_{args.steps_per_call}_steps_per_call"] = (
                lambda: images_per_run / timed_call(lambda: multi.run_steps(setup.iterator, args.steps)))
            variants["proto_xla"] = lambda: images_per_run / timed_call(lambda: jit.run_steps(setup.iterator, args.steps))
        results = alternate(variants, args.repeats)

        for name, values in results.items():
            print(median_line(f"{name:>28s} images/s", values, "img/s", ".1f"))
        keras_median = statistics.median(results["keras"])
        for name, values in results.items():
            if name.startswith("proto"):
                print(f"{name} / keras: {statistics.median(values) / keras_median:.3f}")
        if args.fit_epochs >= 2:
            start = time.perf_counter()
            try:
                history = run_fit_cross_check(args, root, work)
            except Exception as exc:  # the engine is someone else's: report, keep the alternated figures
                history = None
                print(f"run_fit cross-check failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        if args.fit_epochs >= 2 and history:
            print(median_line("run_fit history.csv images/s (epochs 2+, one run after the alternated ones)",
                              history, "img/s", ".1f") + f"  [{time.perf_counter() - start:.0f} s]")
            print(f"run_fit / keras median: {statistics.median(history) / keras_median:.3f}")
        per_round = [s / k for s, k in zip(results["segtrain"], results["keras"])]
        print(f"per-round ratios (segtrain / keras of the same round): {', '.join(f'{r:.3f}' for r in per_round)}; "
              f"median {statistics.median(per_round):.3f}")
        print(f"ratio: {statistics.median(results['segtrain']) / keras_median:.3f}")


def timed_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
