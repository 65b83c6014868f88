"""The planner's memory and time models (segtrain/planning/resources.py) against a measured training step.

For each (crop, batch) setting a child process builds segtrain's U-Net (`segtrain.model.build_unet`), Adam and a
tf.function training step (sigmoid cross-entropy, gradients, update) on random float32 crops, resets its peak RSS
(/proc/self/clear_refs) and runs the step:

- measured: the peak RSS of that first step above the RSS before it. TensorFlow's CPU allocator keeps what the first
  step took, so the next steps grow the RSS by almost nothing (printed as "later steps"): the first step's growth is
  the step's memory.
- estimated: `resources.training_bytes` (activations x bytes per value x TRAINING_FACTOR, plus weights, gradients and
  Adam's slots) for the same setting.
- runtime: the RSS before the first step (TensorFlow, the model, the optimizer): the planner's RUNTIME_BYTES.
- rate: FLOP/s of the step, 3 x `resources.forward_flops` x batch / the median step time: the planner's CPU rate.

The parameter count of the built model is checked against `resources.parameter_count`. The last line is
`ratio: X`, X = the median of estimated / measured over the settings (1 = the model is exact; > 1 it over-estimates).

    python benchmarks/plan_memory.py                 # crops 128 / 192 / 256, depth 4, 16 filters, batch 4
    python benchmarks/plan_memory.py --tiny          # smoke run: crops 32 / 64, depth 2, 4 filters
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, cores, cpu_model, load_average  # noqa: E402

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
import keras
from segtrain.model import build_unet

crop, batch, depth, filters, channels, steps = (int(a) for a in sys.argv[1:7])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")

model = build_unet(channels, 1, depth, filters)
optimizer = keras.optimizers.Adam(1e-3)
optimizer.build(model.trainable_variables)
rng = np.random.default_rng(0)
x = tf.constant(rng.uniform(0, 255, (batch, crop, crop, channels)).astype("float32"))
y = tf.constant((rng.random((batch, crop, crop, 1)) > 0.8).astype("float32"))

@tf.function
def step(x, y):
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y, logits))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

runtime = status("VmRSS:")
reset_peak()
step(x, y).numpy()
first = status("VmHWM:") - runtime
times, growth = [], []
for _ in range(steps):
    before = status("VmRSS:")
    reset_peak()
    start = time.perf_counter()
    step(x, y).numpy()
    times.append(time.perf_counter() - start)
    growth.append(status("VmHWM:") - before)
print(json.dumps({"runtime": runtime, "first": first, "growth": growth, "times": times,
                  "params": int(model.count_params())}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", default="128,192,256", help="crop sides to measure")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="measured steps after the first (median)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: crops 32 and 64, depth 2, 4 filters, batch 2")
    args = parser.parse_args()
    if args.tiny:
        args.crops, args.batch, args.depth, args.base_filters, args.steps = "32,64", 2, 2, 4, 1
    sys.path.insert(0, str(REPO))
    from segtrain.planning import resources

    print(f"machine: {platform.platform()}, {cpu_model()}, {cores()} cores usable, python "
          f"{platform.python_version()}, {load_average()} at start")
    print(f"model: depth {args.depth}, {args.base_filters} base filters, {args.channels} channels, 2 classes, "
          f"batch {args.batch}, float32 (CPU); TRAINING_FACTOR {resources.TRAINING_FACTOR['cpu']}")
    ratios, rates = [], []
    for crop in (int(c) for c in args.crops.split(",")):
        result = subprocess.run([sys.executable, "-c", CHILD, str(crop), str(args.batch), str(args.depth),
                                 str(args.base_filters), str(args.channels), str(args.steps)],
                                capture_output=True, text=True, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(f"crop {crop} failed:\n{result.stderr[-3000:]}")
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        estimate = resources.training_bytes(crop, args.depth, args.base_filters, args.channels, 2, args.batch, "cpu")
        kept = resources.activation_values(crop, args.depth, args.base_filters, args.channels, 2) * 4 * args.batch
        growth = measured["first"]
        later = statistics.median(measured["growth"])
        seconds = statistics.median(measured["times"])
        flops = 3 * resources.forward_flops(crop, args.depth, args.base_filters, args.channels, 2) * args.batch / seconds
        params = resources.parameter_count(args.depth, args.base_filters, args.channels, 2)
        ratio = estimate / growth
        ratios.append(ratio)
        rates.append(flops)
        print(f"crop {crop:4d}: estimate {estimate / 2**20:8.1f} MiB (kept activations {kept / 2**20:7.1f}), "
              f"measured first-step peak growth {growth / 2**20:8.1f} MiB (later steps {later / 2**20:5.1f}),"
              f" kept/measured {kept / growth:4.2f}, estimate/measured {ratio:5.2f}; runtime RSS before the first "
              f"step {measured['runtime'] / 2**20:6.0f} "
              f"MiB; step median {seconds:.2f} s = {args.batch / seconds:.1f} crops/s = {flops / 1e9:.1f} GFLOP/s; "
              f"parameters {measured['params']} (model: {params})", flush=True)
        if measured["params"] != params:
            raise SystemExit(f"parameter_count {params} != the built model's {measured['params']}")
    print(f"effective rate: median {statistics.median(rates) / 1e9:.1f} GFLOP/s on {cores()} cores "
          f"(planner: {resources.device_flops('cpu') / 1e9:.0f})")
    print(f"estimate/measured median over {len(ratios)} settings (runs: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
