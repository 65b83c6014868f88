"""On a GPU: segtrain's training speed with mixed_float16 against float32, and its real input pipeline
against synthetic in-memory input.

Three variants of segtrain's own training objects (built as `run_fit` builds them:
class-weighted loss, Trainer calls of `train.steps_per_execution` steps, XLA per
`train.jit_compile: auto`, under the tf.distribute strategy) and one plain Keras peer, timed
in alternation, medians over repeats:
  float32 / in-memory input, mixed_float16 / in-memory input (the same batch held on
  the device, no input cost), mixed_float16 / the real pipeline (files on disk, decode,
  augmentation, prefetch), and Keras `fit` with its fastest settings (jit_compile=True,
  steps_per_execution=8, mixed_float16) on in-memory crops.
Printed: the mixed-precision speed-up (mixed / float32, in-memory input; target >= 2),
the pipeline efficiency (real pipeline / in-memory, under mixed_float16; 1.0 means the GPU
never waits for data; target >= 0.95) and segtrain over the fastest Keras (target >= 0.95).
The last line is `ratio: X`, X = the mixed-precision speed-up.

Without a GPU it prints why and exits with status 0 without measuring (mixed_float16 on
a CPU says nothing about a GPU). `--allow-cpu` runs the same code on the CPU anyway, to
check that the script works; its figures mean nothing.

    python benchmarks/gpu_mixed_precision.py                      # 128 images 512 px, crop 256, batch 32, depth 4, 32 filters
    python benchmarks/gpu_mixed_precision.py --tiny --allow-cpu   # smoke run of the code path
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

from _common import (SegtrainSetup, alternate, in_memory_batches, keras_unet, machine_line, median_line,  # noqa: E402
                     synthetic_config, write_dataset)

NO_GPU = ("no GPU: TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty), so the "
          "mixed-precision benchmark was not run. Run it on a machine with a CUDA GPU "
          "(or pass --allow-cpu to smoke-test the script; CPU figures mean nothing).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="training images written to disk")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base-filters", type=int, default=32)
    parser.add_argument("--cache", default="memory", choices=["memory", "disk", "none"])
    parser.add_argument("--steps", type=int, default=50, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test only)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 8 images 64 px, crop 32, depth 2, 2 repeats")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.size, args.crop, args.batch, args.depth, args.base_filters = 8, 64, 32, 4, 2, 4
        args.steps, args.repeats = 3, 2

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.allow_cpu:
        print(NO_GPU)
        return
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    print(machine_line())
    if not gpus:
        print("WARNING: --allow-cpu: running on the CPU; the figures below only show that the script works.")
    with tempfile.TemporaryDirectory(prefix="segtrain_gpu_bench_") as tmp:
        work = Path(tmp)
        root = write_dataset(work / "data", args.images, 2, args.size)
        setups = {}
        for precision in ("float32", "mixed_float16"):
            config = synthetic_config(root, args.crop, args.batch, args.depth, args.base_filters, args.cache,
                                      {"train.precision": precision})
            setups[precision] = SegtrainSetup(config, work / precision)
        images, masks = in_memory_batches(setups["float32"].prepared.train_pairs, setups["float32"].spec, 1)
        fixed = tf.data.Dataset.from_tensors((images, masks)).repeat()
        in_memory = {p: iter(s.strategy.experimental_distribute_dataset(fixed)) for p, s in setups.items()}
        print(f"model depth {args.depth}, base filters {args.base_filters}, "
              f"{setups['float32'].model.count_params():,} parameters; crop {args.crop}, batch {args.batch}, "
              f"{args.images} PNG images {args.size}x{args.size}, data.cache {args.cache}; "
              f"{setups['float32'].strategy.__class__.__name__} with "
              f"{setups['float32'].strategy.num_replicas_in_sync} replica(s); {args.steps} steps per run, "
              f"{args.repeats} repeats, alternated")

        def run(precision: str, real: bool):
            setup = setups[precision]
            iterator = setup.iterator if real else in_memory[precision]
            per_call = setup.steps_per_execution

            def timed_run() -> float:
                start = time.perf_counter()
                for _ in range(max(1, args.steps // per_call)):
                    setup.trainer.train_steps(iterator, per_call)  # fetches the losses: the steps have finished
                return max(1, args.steps // per_call) * per_call * args.batch / (time.perf_counter() - start)
            return timed_run

        # the fastest plain Keras setting on the same network and in-memory crops (mixed_float16 policy is global now)
        # (--tiny compiles it without XLA: the smoke test checks the code path, and XLA's compile takes most of a minute)
        keras_model, keras_ds = keras_unet(setups["mixed_float16"], 8, not args.tiny)

        def keras_run() -> float:
            start = time.perf_counter()
            keras_model.fit(keras_ds, epochs=1, steps_per_epoch=args.steps, verbose=0)
            return args.steps * args.batch / (time.perf_counter() - start)

        variants = {"float32 in-memory": run("float32", False),
                    "mixed_float16 in-memory": run("mixed_float16", False),
                    "mixed_float16 real pipeline": run("mixed_float16", True),
                    "keras xla 8/call mixed_float16": keras_run}
        warm_steps = -(-args.images // args.batch) + 2
        for name, fn in variants.items():  # trace, autotune, fill the cache
            saved, args.steps = args.steps, warm_steps
            fn()
            args.steps = saved
        results = alternate(variants, args.repeats)
        for name, values in results.items():
            print(median_line(f"{name:>28s}", values, "img/s", ".1f"))
        speedup = statistics.median(results["mixed_float16 in-memory"]) / statistics.median(results["float32 in-memory"])
        efficiency = (statistics.median(results["mixed_float16 real pipeline"])
                      / statistics.median(results["mixed_float16 in-memory"]))
        print(f"pipeline efficiency (real pipeline / in-memory input, mixed_float16): {efficiency:.3f}")
        print(f"segtrain (in-memory, mixed_float16) / fastest plain Keras: "
              f"{statistics.median(results['mixed_float16 in-memory']) / statistics.median(results['keras xla 8/call mixed_float16']):.3f}")
        print(f"mixed_float16 speed-up over float32: {speedup:.3f}")
        print(f"ratio: {speedup:.3f}")


if __name__ == "__main__":
    main()
