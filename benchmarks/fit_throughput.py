"""Training throughput of segtrain's real path against plain Keras `model.fit` on in-memory tensors.

segtrain: image and mask files on disk, Pillow decode, cache, shuffle, random crop and
flips/rot90 in tf.data, the class-weighted cross-entropy + Jaccard loss, run through the loop
`segtrain fit` runs (`segtrain.engine.loop.train_epoch`: compiled calls of
`train.steps_per_execution` steps, XLA per `train.jit_compile`, both at their `auto`
defaults). Peers: the same U-Net (segtrain.model.build_unet), batch and crop, compiled with
plain Keras (Adam, BinaryCrossentropy(from_logits=True)) and fed pre-cropped batches held in
memory, once with Keras's defaults (one step per call, jit_compile auto) and once with its
fastest settings (`jit_compile=True, steps_per_execution=8`). Timed in alternation, medians
over repeats; a cross-check runs the real `segtrain.train.run_fit` and reads the images/s it
records per epoch in history.csv. The last line is `ratio: X`, X = segtrain images/s / the
faster Keras setting's (targets: >= 1.2 over Keras defaults, >= 1.0 over the fastest).

    python benchmarks/fit_throughput.py                 # 64 images 256x256, crop 128, batch 8, depth 4
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

import numpy as np  # noqa: E402

from _common import (SegtrainSetup, alternate, keras_unet, machine_line, median_line,  # noqa: E402
                     synthetic_config, write_dataset)


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
    parser.add_argument("--tiny", action="store_true", help="smoke run: 8 images 64 px, crop 32, depth 2, 2 repeats")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.size, args.crop, args.batch, args.depth, args.base_filters = 8, 64, 32, 4, 2, 4
        args.steps, args.repeats, args.fit_epochs = 8, 2, 2

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
              f"weights {np.round(setup.prepared.class_weights, 3).tolist()}), steps_per_execution "
              f"{setup.steps_per_execution}, jit_compile {setup.jit_compile}; Keras loss: BinaryCrossentropy")
        batches = max(2, args.images // args.batch)
        peers = {"keras_defaults": keras_unet(setup, 1, "auto", batches),
                 "keras_xla_8_per_call": keras_unet(setup, 8, True, batches)}
        steps_per_epoch = max(1, -(-args.images // args.batch))
        print(f"{args.steps} steps per timed run, {args.repeats} repeats, alternated; warm-up "
              f"{steps_per_epoch + 8} steps each (traces, compiles, fills the cache)")
        setup.run_steps(steps_per_epoch + 8)
        for model, ds in peers.values():
            model.fit(ds, epochs=1, steps_per_epoch=steps_per_epoch + 8, verbose=0)
        images_per_run = args.steps * args.batch

        def segtrain_run() -> float:
            return images_per_run / timed_call(lambda: setup.run_steps(args.steps))

        def keras_run(model, ds):
            return lambda: images_per_run / timed_call(
                lambda: model.fit(ds, epochs=1, steps_per_epoch=args.steps, verbose=0))

        variants = {"segtrain": segtrain_run, **{name: keras_run(*peer) for name, peer in peers.items()}}
        results = alternate(variants, args.repeats)
        for name, values in results.items():
            print(median_line(f"{name:>22s} images/s", values, "img/s", ".1f"))
        medians = {name: statistics.median(values) for name, values in results.items()}
        for name in peers:
            print(f"segtrain / {name}: {medians['segtrain'] / medians[name]:.3f}")
        keras_median = max(medians[name] for name in peers)
        if args.fit_epochs >= 2:
            start = time.perf_counter()
            history = run_fit_cross_check(args, root, work)
            print(median_line("run_fit history.csv images/s (epochs 2+, one run after the alternated ones)",
                              history, "img/s", ".1f") + f"  [{time.perf_counter() - start:.0f} s]")
            print(f"run_fit / keras median: {statistics.median(history) / keras_median:.3f}")
        print(f"ratio: {medians['segtrain'] / keras_median:.3f}")


def timed_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
