"""Validation quality of segtrain's shipped configs against a plain Keras script, for the same minutes.

For each shared data set (../shared/datasets: membrane, epfl_roads, crackforest):
1. segtrain: configs/<set>.yaml trained by `segtrain.train.run_fit` for a wall-clock
   budget: the step time of this config is measured on this machine first, and the
   budget becomes a number of steps (spread over 10 epochs, so the cosine schedule
   decays over exactly the budget). Scored as `segtrain eval` scores: whole validation
   images, the config's decision rule, one confusion matrix over the split; for both
   best.keras (picked on val by the config's monitor, what `segtrain eval` uses) and
   last.keras (no selection on val: the like-for-like row).
2. baseline: benchmarks/plain_keras_baseline.py (simple U-Net of the same size, plain
   BCE, Adam defaults, model.fit, the same crop and batch) for the same minutes that
   segtrain's training took, scored on whole val images at threshold 0.5 with
   segtrain.metrics.confusion_matrix_np + metrics_from_confusion.
Prints per-class IoU, F1, precision and recall as a Markdown table, the minutes, steps
and the machine. One seed per run (the CPU budget allows no more): differences of a
few IoU points are within seed noise.

    python benchmarks/quality.py --minutes 3                 # all three sets
    python benchmarks/quality.py --sets crackforest --minutes 3 --set loss.max_weight=20
    python benchmarks/quality.py --tiny                      # seconds-long smoke run on synthetic data
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPO, class_rows, evaluate_model_file, machine_line, measure_step_seconds,  # noqa: E402
                     output_folder, set_budget, timed_run_fit, write_tiny_config)

SETS = {  # config, and how the plain script reads the same masks (raw value of the foreground)
    "membrane": ("configs/membrane.yaml", "0"),
    "epfl_roads": ("configs/epfl_roads.yaml", "above127"),
    "crackforest": ("configs/crackforest.yaml", "255"),
}


def run_baseline(root: Path, foreground: str, config, minutes: float, out: Path, max_steps=None) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / "plain_keras_baseline.py"), str(root),
               "--foreground", foreground, "--crop", str(config.data.crop), "--batch", str(config.data.batch_size),
               "--depth", str(config.model.depth), "--filters", str(config.model.base_filters),
               "--minutes", f"{minutes:.4f}", "--seed", str(config.train.seed), "--json", str(out)]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"baseline failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def table(results: list[dict]) -> str:
    lines = ["| set | run | minutes | steps | class | IoU | F1 | precision | recall |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        for name, iou, f1, precision, recall in class_rows(r["metrics"]):
            lines.append(f"| {r['set']} | {r['run']} | {r['minutes']:.2f} | {r['steps']} | {name} | {iou:.3f} | "
                         f"{f1:.3f} | {precision:.3f} | {recall:.3f} |")
    return "\n".join(lines)


def foreground(metrics: dict) -> dict:
    return list(metrics["per_class"].values())[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated subset of " + ", ".join(SETS))
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget per run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override segtrain's configs (all sets), e.g. train.learning_rate=0.003")
    parser.add_argument("--skip-baseline", action="store_true", help="train segtrain only (for tuning)")
    parser.add_argument("--out", type=Path, help="keep run folders and results.json here (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: a synthetic set, a few steps each")
    args = parser.parse_args()

    from segtrain.config import load_config

    print(machine_line())
    results = []
    with output_folder(args.out, "segtrain_quality_") as out:
        if args.tiny:
            config_path = write_tiny_config(
                out, extra="loss: {terms: [cross_entropy, {name: jaccard, weight: 0.5}], class_weights: balanced}\n")
            plan = {"tiny": (str(config_path), "above127")}
        else:
            plan = {name: SETS[name] for name in args.sets.split(",")}
        for name, (config_file, fg) in plan.items():
            config = load_config(REPO / config_file, args.overrides)
            root = Path(config.data.root).resolve()
            if args.tiny:
                total_steps = 3
            else:
                step = measure_step_seconds(config, out / f"{name}_calibration")
                total_steps = max(10, int(args.minutes * 60 * 0.85 / step))
                print(f"{name}: {step:.3f} s per step measured -> {total_steps} steps for {args.minutes} min", flush=True)
            set_budget(config, total_steps, epochs=2 if args.tiny else 10)
            run_dir = out / f"{name}_segtrain"
            metrics = timed_run_fit(config, run_dir)
            steps = config.train.epochs * config.train.steps_per_epoch
            minutes = metrics["train_seconds"] / 60
            last = evaluate_model_file(run_dir / "last.keras")
            decision = metrics["decision"]["rule"] + (f" {metrics['decision']['threshold']}"
                                                      if metrics["decision"]["threshold"] is not None else "")
            results.append({"set": name, "run": f"segtrain best.keras ({decision})", "minutes": minutes,
                            "steps": steps, "metrics": metrics})
            results.append({"set": name, "run": f"segtrain last.keras ({decision})", "minutes": minutes,
                            "steps": steps, "metrics": last})
            print(f"{name}: segtrain {steps} steps in {minutes:.2f} min (+{metrics['eval_seconds']:.0f} s eval); "
                  f"foreground IoU best {foreground(metrics)['iou']}, last {foreground(last)['iou']}", flush=True)
            if not args.skip_baseline:
                base = run_baseline(root, fg, config, minutes, out / f"{name}_baseline.json",
                                    max_steps=3 if args.tiny else None)
                base["per_class"] = dict(zip(config.data.classes, base["per_class"].values()))  # the set's names
                results.append({"set": name, "run": "plain Keras (BCE, 0.5)", "minutes": base["train_seconds"] / 60,
                                "steps": base["steps"], "metrics": base})
                print(f"{name}: plain Keras {base['steps']} steps in {base['train_seconds'] / 60:.2f} min; "
                      f"foreground IoU {foreground(base)['iou']}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        print()
        print("tiny: a few steps per run, figures mean nothing" if args.tiny else
              f"budget {args.minutes} min of training per run; val split, whole images")
        print(table(results))
        if not args.skip_baseline:
            print()
            for name in plan:
                rows = {r["run"].split(" (")[0]: foreground(r["metrics"]) for r in results if r["set"] == name}
                seg, base = rows["segtrain last.keras"], rows["plain Keras"]
                print(f"{name}: foreground IoU segtrain(last) {seg['iou'] or 0:.3f} vs plain {base['iou'] or 0:.3f}, "
                      f"F1 {seg['dice'] or 0:.3f} vs {base['dice'] or 0:.3f} -> "
                      f"{'segtrain better' if (seg['iou'] or 0) > (base['iou'] or 0) else 'NOT better'}")


if __name__ == "__main__":
    main()
