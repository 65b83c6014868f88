"""The tf.data input pipeline alone against what segtrain's training step consumes.

Pipeline: `segtrain.data.pipeline.training_dataset` over image and mask files on disk
(Pillow decode, cache, shuffle, random crop, flips, rot90, batch, prefetch), iterated
as fast as it goes; with data.cache none every element is decoded again, with memory
only augmentation runs after the first pass. Training step: segtrain's Trainer step on
batches already in memory (no input cost). Both are timed in alternation (a fresh pipeline iterator each run, its start-up untimed), medians
over repeats, and the CPU time the pipeline uses is reported as cores busy.
The last line is `ratio: X`, X = pipeline images/s / train-step images/s for the
slower pipeline (data.cache none: decode every element) (target: X >= 3).

    python benchmarks/pipeline_throughput.py
    python benchmarks/pipeline_throughput.py --tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorflow as tf  # noqa: E402

from _common import (SegtrainSetup, alternate, cores, in_memory_batches, machine_line,  # noqa: E402
                     median_line, synthetic_config, write_dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="training images written to disk")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--format", default="png", choices=["png", "jpg"])
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40, help="pipeline batches per timed run")
    parser.add_argument("--steps", type=int, default=10, help="train steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="smoke run: 8 images 64 px, crop 32, depth 2, 2 repeats")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.size, args.crop, args.batch, args.depth, args.base_filters = 8, 64, 32, 4, 2, 4
        args.batches, args.steps, args.repeats = 4, 3, 2

    print(machine_line())
    print(f"tf.data: AUTOTUNE parallelism, {cores()} cores usable, inter-op threads "
          f"{tf.config.threading.get_inter_op_parallelism_threads() or 'default (= cores)'}, intra-op threads "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default (= cores)'}")
    with tempfile.TemporaryDirectory(prefix="segtrain_pipe_bench_") as tmp:
        work = Path(tmp)
        root = write_dataset(work / "data", args.images, 2, args.size, image_ext=f".{args.format}")
        setup = SegtrainSetup(synthetic_config(root, args.crop, args.batch, args.depth, args.base_filters, "memory"),
                              work)
        from segtrain.data.pipeline import training_dataset

        pipelines = {}
        for cache in ("none", "memory"):
            spec = setup.spec.__class__(**{**setup.spec.__dict__,
                                           "data": setup.spec.data.__class__(**{**setup.spec.data.__dict__,
                                                                                "cache": cache})})
            pipelines[cache] = training_dataset(setup.prepared.train_pairs, spec, work / f"cache_{cache}")
        images, masks = in_memory_batches(setup.prepared.train_pairs, setup.spec, 1)
        fixed = tf.data.Dataset.from_tensors((images, masks)).repeat()
        step_iterator = iter(setup.strategy.experimental_distribute_dataset(fixed))
        print(f"model depth {args.depth}, base filters {args.base_filters}; {args.images} {args.format.upper()} "
              f"images {args.size}x{args.size} on disk, crop {args.crop}, batch {args.batch}; "
              f"{args.batches} batches per pipeline run, {args.steps} steps per train run, {args.repeats} repeats")

        cpu_fraction = {name: [] for name in pipelines}
        epoch_batches = -(-args.images // args.batch)
        for name, ds in pipelines.items():  # warm-up: one pass (fills the memory cache, shared by later iterators)
            it = iter(ds)
            for _ in range(epoch_batches + 1):
                next(it)
        setup.trainer.train_steps(step_iterator, 2)

        def pipeline_run(name):
            def run() -> float:
                # A fresh iterator each run: an old one would have filled its prefetch buffers while the
                # other variants ran, and hand them out for free. Its first batches (start-up) are not timed.
                it = iter(pipelines[name])
                next(it), next(it)
                cpu0, start = time.process_time(), time.perf_counter()
                for _ in range(args.batches):
                    next(it)
                wall = time.perf_counter() - start
                cpu_fraction[name].append((time.process_time() - cpu0) / wall)
                return args.batches * args.batch / wall
            return run

        def train_run() -> float:
            start = time.perf_counter()
            setup.trainer.train_steps(step_iterator, args.steps)
            return args.steps * args.batch / (time.perf_counter() - start)

        results = alternate({"pipeline_cache_none": pipeline_run("none"),
                             "pipeline_cache_memory": pipeline_run("memory"),
                             "train_step": train_run}, args.repeats)
        for name, values in results.items():
            print(median_line(f"{name:>22s}", values, "img/s", ".1f"))
        for name, values in cpu_fraction.items():
            print(f"cores busy while the pipeline runs alone (cache {name}): median {statistics.median(values):.2f} "
                  f"of {cores()}")
        step = statistics.median(results["train_step"])
        ratios = {name: statistics.median(results[f"pipeline_cache_{name}"]) / step for name in pipelines}
        for name, value in ratios.items():
            print(f"pipeline (cache {name}) / train step: {value:.2f}")
        print(f"ratio: {ratios['none']:.3f}")


if __name__ == "__main__":
    main()
