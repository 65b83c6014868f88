"""The training loop's own cost per step: segtrain's real loop against Keras `model.fit(steps_per_execution=32)`.

The network is so small (U-Net depth 1, 4 filters, 16x16 crops, batch 8) that its math is
nearly free, so steps/s measures what the loop costs around each step: Python calls, host
syncs (reading the loss back), the progress bar, NaN and stop checks. On a GPU, where a real
U-Net step takes a few milliseconds, that cost is what starves the device; this is its CPU
stand-in.

segtrain: `segtrain.engine.loop.train_epoch` (the loop fit runs) with the config's defaults
(`train.steps_per_execution: auto`, `train.jit_compile: auto`), its tf.data pipeline over
PNG files with the in-memory cache. Keras: the same network compiled with Adam and
BinaryCrossentropy, `steps_per_execution=32` and Keras's default `jit_compile`, fed the same
crops as in-memory tensors. Alternated rounds, medians. The last line is `ratio: X`,
X = segtrain steps/s / Keras steps/s (target: X >= 0.9).

    python benchmarks/step_overhead.py            # 2048 steps per timed run, 5 rounds
    python benchmarks/step_overhead.py --tiny     # seconds-long smoke run
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2048, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps-per-execution", default="auto", help="segtrain's train.steps_per_execution")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 128 steps, 2 rounds")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.repeats = 128, 2

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="segtrain_step_bench_") as tmp:
        work = Path(tmp)
        root = write_dataset(work / "data", 64, 2, 32)
        spe = args.steps_per_execution if args.steps_per_execution == "auto" else int(args.steps_per_execution)
        # the same loss on both sides (unweighted binary cross-entropy), so only the loops differ
        config = synthetic_config(root, 16, 8, 1, 4, extra={"train.steps_per_execution": spe,
                                                            "loss": {"terms": [{"name": "cross_entropy"}]}})
        setup = SegtrainSetup(config, work)
        # (--tiny compiles Keras's side without XLA: the smoke test checks the code path, and XLA's compile would
        # take most of its time)
        model, keras_ds = keras_unet(setup, steps_per_execution=32, jit_compile=False if args.tiny else "auto")
        # and the same in-memory crops: segtrain's loop reads them through its distributed iterator
        images, masks = in_memory_batches(setup.prepared.train_pairs, setup.spec, 8)
        crops = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8, drop_remainder=True).cache().repeat()
        setup.data.train_iterator = iter(setup.strategy.experimental_distribute_dataset(crops.prefetch(2)))
        print(f"model: U-Net depth 1, 4 filters, {setup.model.count_params():,} parameters; crop 16, batch 8; "
              f"segtrain steps_per_execution {setup.steps_per_execution}, jit_compile {setup.jit_compile}; "
              f"Keras steps_per_execution 32, jit_compile {model.jit_compile}")
        setup.run_steps(64)  # traces, fills the cache
        model.fit(keras_ds, epochs=1, steps_per_epoch=64, verbose=0)

        def segtrain_run() -> float:
            start = time.perf_counter()
            setup.run_steps(args.steps)
            return args.steps / (time.perf_counter() - start)

        def keras_run() -> float:
            start = time.perf_counter()
            model.fit(keras_ds, epochs=1, steps_per_epoch=args.steps, verbose=0)
            return args.steps / (time.perf_counter() - start)

        results = alternate({"segtrain": segtrain_run, "keras": keras_run}, args.repeats)
        for name, values in results.items():
            print(median_line(f"{name:>9s} steps/s", values, "steps/s", ".0f"))
        per_round = [s / k for s, k in zip(results["segtrain"], results["keras"])]
        print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in per_round)}")
        print(f"ratio: {statistics.median(results['segtrain']) / statistics.median(results['keras']):.3f}")


if __name__ == "__main__":
    main()
