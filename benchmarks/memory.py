"""Peak memory of `segtrain fit` and of the class-statistics pass on a data set ten times larger than another.

Two synthetic data sets are written to a temporary folder: `small` (N training pairs)
and `big` (10 N), with the same validation split. Each `segtrain fit` (one epoch = one
full pass over the training set, then the final evaluation) runs as its own subprocess
and its peak resident set size is read from `os.wait4` (ru_maxrss of that one child;
RUSAGE_CHILDREN would keep the largest child seen so far). data.cache none and disk
must stream: big/small peak <= 1.2. data.cache memory is measured too, as a control
that the measurement does see growth (it keeps every decoded image). The class-statistics
pass (`segtrain.train.prepare_data`, as fit runs it: every file checked, class pixels counted) is measured in a child that resets its peak
(/proc/self/clear_refs) after imports, so the figure is the pass's own memory.
Medians over repeats. The last line is `ratio: X`, X = the larger big/small fit peak of
cache none and cache disk (target: X <= 1.2).

    python benchmarks/memory.py --small 20 --size 512
    python benchmarks/memory.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, cores, cpu_model, load_average, write_dataset  # noqa: E402

STATS_CHILD = r"""
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from segtrain.config import load_config
from segtrain.train import prepare_data

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])  # kB

config = load_config(sys.argv[1])
before = status("VmRSS:")
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM (the peak) to the current RSS
    reset = True
except OSError:
    reset = False
prepared = prepare_data(config)  # fit's pass: decode check of every image, class counts over the train masks
print(json.dumps({"before_kb": before, "peak_kb": status("VmHWM:"), "reset": reset,
                  "images": len(prepared.train_pairs), "counts": prepared.class_stats.get("counts")}))
"""


def write_config(path: Path, root: Path, args, cache: str) -> Path:
    path.write_text(
        "data:\n"
        f"  root: {root}\n"
        "  classes: [background, line]\n"
        "  mask: {threshold: 127}\n"
        f"  crop: {args.crop}\n"
        f"  batch_size: {args.batch}\n"
        f"  cache: {cache}\n"
        + (f"  shuffle_buffer: {args.shuffle_buffer}\n" if args.shuffle_buffer else "")
        + "model: {depth: %d, base_filters: %d}\n" % (args.depth, args.base_filters)
        + "loss:\n"
        "  terms: [{name: cross_entropy}, {name: jaccard, weight: 0.5}]\n"
        "  class_weights: balanced\n"
        "train: {epochs: 1, seed: 0}\n"
        "predict: {tile_size: %d}\n" % (2 * args.crop)
    )
    return path


def child_peak_mb(command: list[str], log: Path) -> tuple[float, float]:
    """(peak RSS in MiB of this one child process, wall seconds); raises if the child fails."""
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss / 1024.0, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=20, help="training pairs of the small set (big: 10x)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--base-filters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=None,
                        help="data.shuffle_buffer for the runs (default: segtrain's default)")
    parser.add_argument("--modes", default="none,disk,memory", help="data.cache values to measure")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 2 vs 20 pairs of 64 px, cache none only")
    args = parser.parse_args()
    if args.tiny:
        args.small, args.size, args.crop, args.batch, args.base_filters, args.repeats = 2, 64, 32, 2, 4, 1
        args.modes = "none"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    import platform

    print(f"machine: {platform.platform()}, {cpu_model()}, {cores()} cores usable, python "
          f"{platform.python_version()}, {load_average()} at start (no TensorFlow in this parent process)")
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="segtrain_mem_bench_") as tmp:
        work = Path(tmp)
        sets = {"small": args.small, "big": 10 * args.small}
        for name, count in sets.items():
            write_dataset(work / name, count, 2, args.size, n_distinct=min(count, 20), seed=1)
        decoded_mb = args.size**2 * 3 * 4 / 2**20
        print(f"data: small {sets['small']} / big {sets['big']} training pairs of {args.size}x{args.size} RGB PNG "
              f"({decoded_mb:.1f} MiB per decoded float32 image), 2 val pairs; fit: 1 epoch (a full pass), "
              f"crop {args.crop}, batch {args.batch}, depth {args.depth}, base filters {args.base_filters}, "
              f"then the final evaluation; data.shuffle_buffer {args.shuffle_buffer or 'default'}; "
              f"{args.repeats} repeat(s), small and big alternated")

        fit_peaks: dict[tuple[str, str], list[float]] = {}
        for repeat in range(args.repeats):
            for mode in modes:
                for name in sets:
                    cfg = write_config(work / f"{name}_{mode}.yaml", work / name, args, mode)
                    out = work / f"run_{name}_{mode}_{repeat}"
                    peak, seconds = child_peak_mb(
                        [python, "-m", "segtrain", "fit", str(cfg), "--out", str(out)], work / f"{out.name}.log")
                    fit_peaks.setdefault((mode, name), []).append(peak)
                    print(f"  fit cache={mode:<6s} {name:<5s} run {repeat + 1}: peak RSS {peak:7.1f} MiB ({seconds:.0f} s)",
                          flush=True)

        stats_peaks: dict[str, list[float]] = {}
        stats_total: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name in sets:
                cfg = work / f"{name}_{modes[0]}.yaml"
                log = work / f"stats_{name}.log"
                total, _ = child_peak_mb([python, "-c", STATS_CHILD, str(cfg)], log)
                result = json.loads(log.read_text().strip().splitlines()[-1])
                assert result["images"] == sets[name]
                stats_peaks.setdefault(name, []).append((result["peak_kb"] - result["before_kb"]) / 1024.0)
                stats_total.setdefault(name, []).append(total)
                peak_reset = result["reset"]

        print("\nfit peak RSS (MiB), medians:")
        print(f"  {'data.cache':<10s} {'small':>8s} {'big':>8s} {'big/small':>10s}")
        ratios = {}
        for mode in modes:
            small = statistics.median(fit_peaks[(mode, "small")])
            big = statistics.median(fit_peaks[(mode, "big")])
            ratios[mode] = big / small
            note = "  (control: keeps every decoded image)" if mode == "memory" else ""
            print(f"  {mode:<10s} {small:8.1f} {big:8.1f} {big / small:10.3f}{note}")
        print("class-statistics pass (segtrain.train.prepare_data: file checks + class counts), medians "
              f"(peak reset after imports through /proc/self/clear_refs: {'yes' if peak_reset else 'NO, figures include imports'}):")
        for name in sets:
            print(f"  {name:<5s}: the pass's own peak above the RSS before it {statistics.median(stats_peaks[name]):6.1f} MiB; "
                  f"whole child process peak {statistics.median(stats_total[name]):7.1f} MiB")
        small_pass = max(statistics.median(stats_peaks["small"]), 0.1)
        print(f"class-statistics pass big/small (pass's own peak): "
              f"{statistics.median(stats_peaks['big']) / small_pass:.3f}; whole process: "
              f"{statistics.median(stats_total['big']) / statistics.median(stats_total['small']):.3f}")
        streaming = [ratios[m] for m in ("none", "disk") if m in ratios]
        print(f"ratio: {max(streaming) if streaming else float('nan'):.3f}")


if __name__ == "__main__":
    main()
