"""Class-aware sampling and the new augmentations against a shipped config, at the same steps or time and seed.

For each named config (configs/<set>.yaml) four runs, each the same number of steps (10 epochs) or, with
--budget, the same wall-clock budget (`train.budget`: fit plans its steps from its measured step time), the
same seed and the same validation schedule:
- plain: the config as shipped;
- sampling: plus `data.sampling: {<foreground>: SHARE}` (default 0.5: half the crops centred on
  a foreground pixel; `loss.class_weights_from` stays the config's default, `sampled`);
- augmentation: plus `rotate: 30`, `scale: [0.8, 1.25]`, `brightness: 0.1`, `contrast: 0.2`;
- both;
- unsampled: with `data.sampling: {}`, for a config that samples already (a planned one: the ablation of its own
  sampling; `--sets` takes a YAML path as well as a shipped config's name).
Scored as `segtrain eval` scores (whole val images, the config's decision rule, calibration as fit
fits it) for best.keras (picked on val by the config's monitor) and last.keras (no selection on val).
Prints the foreground's IoU, F1, precision and recall and the mean IoU as a Markdown table. One seed:
differences of a point or two are within seed noise.

    python benchmarks/data_variants.py --sets membrane,epfl_roads --steps 400
    python benchmarks/data_variants.py --sets crackforest --budget 30m --side-by-side   # two runs at once, a core each
    python benchmarks/data_variants.py --sets runs/camvid_planned.yaml --budget 30m --side-by-side \
        --variants plain,unsampled
    python benchmarks/data_variants.py --tiny        # seconds-long smoke run on synthetic data
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPO, add_pinned_arguments, budgeted_fit, evaluate_model_file, fit_side_by_side,  # noqa: E402
                     load_average, machine_line, output_folder, run_pinned_child, set_budget, timed_run_fit,
                     write_tiny_config)

AUGMENT = ["data.augment.rotate=30", "data.augment.scale=[0.8, 1.25]", "data.augment.brightness=0.1",
           "data.augment.contrast=0.2"]


def variants(foreground: str, share: float) -> dict[str, list[str]]:
    sampling = [f"data.sampling={{{foreground}: {share}}}"]
    return {"plain": [], "sampling": sampling, "augmentation": AUGMENT, "both": sampling + AUGMENT,
            "unsampled": ["data.sampling={}"]}


def config_file(name: str) -> Path:
    """A YAML path as given, or a shipped config's name: configs/<name>.yaml."""
    return Path(name) if name.endswith((".yaml", ".yml")) else REPO / "configs" / f"{name}.yaml"


def row(name: str, variant: str, model: str, metrics: dict, steps: int, minutes: float) -> dict:
    fg = list(metrics["per_class"].values())[-1]
    return {"set": name, "variant": variant, "model": model, "steps": steps, "minutes": minutes, "iou": fg["iou"],
            "f1": fg["dice"], "precision": fg["precision"], "recall": fg["recall"], "mean_iou": metrics["mean_iou"]}


def table(rows: list[dict]) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| set | variant | model | steps | training minutes | fg IoU | fg F1 | precision | recall | mean IoU |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['set']} | {r['variant']} | {r['model']} | {r['steps']} | {r['minutes']:.1f} | {f(r['iou'])} | "
              f"{f(r['f1'])} | {f(r['precision'])} | {f(r['recall'])} | {f(r['mean_iou'])} |" for r in rows]
    return "\n".join(lines)


def fit_steps(config_path: Path, overrides: list[str], steps: int, epochs: int, run_dir: Path) -> tuple[dict, int, float]:
    """A run of exactly `steps` steps: (metrics, steps, training minutes)."""
    from segtrain.config import load_config

    config = load_config(config_path, overrides)
    set_budget(config, steps, epochs=epochs)
    metrics = timed_run_fit(config, run_dir)
    return metrics, config.train.epochs * config.train.steps_per_epoch, metrics["train_seconds"] / 60


def fit_budgets(jobs: list[tuple[str, list[str]]], config_path: Path, budget: str, out: Path, name: str,
                side_by_side: bool) -> dict[str, tuple[dict, int, float]]:
    """Budgeted runs of (variant, overrides): one after another, or two at a time, each pinned to its own core."""
    results = {}
    if not side_by_side:
        for variant, overrides in jobs:
            metrics = budgeted_fit(config_path, budget, out / f"{name}_{variant}", overrides)
            results[variant] = (metrics, metrics["planned_steps"], metrics["train_minutes"])
        return results
    for pair in (jobs[i:i + 2] for i in range(0, len(jobs), 2)):
        print(f"{name}: {' and '.join(v for v, _ in pair)} side by side, one core each [{load_average()}]", flush=True)
        runs = [(f"{variant} on {name}", config_path, out / f"{name}_{variant}", overrides)
                for variant, overrides in pair]
        for (variant, _), metrics in zip(pair, fit_side_by_side(__file__, runs, budget)):
            results[variant] = (metrics, metrics["planned_steps"], metrics["train_minutes"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="membrane,epfl_roads",
                        help="comma-separated configs/<set>.yaml names or YAML paths")
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (10 epochs)")
    parser.add_argument("--share", type=float, default=0.5, help="share of crops centred on the foreground")
    parser.add_argument("--variants", default="plain,sampling,augmentation,both")
    parser.add_argument("--out", type=Path, help="keep run folders and results.json here (default: a temp folder)")
    parser.add_argument("--budget", help="a wall-clock budget per run (e.g. 30m) instead of --steps")
    parser.add_argument("--side-by-side", action="store_true",
                        help="with --budget: two runs at a time, each pinned to its own core")
    parser.add_argument("--tiny", action="store_true", help="smoke run: a synthetic set, a few steps each")
    add_pinned_arguments(parser)  # the child process of --side-by-side
    args = parser.parse_args()
    if run_pinned_child(args):
        return
    if args.side_by_side and not args.budget:
        parser.error("--side-by-side needs --budget")

    from segtrain.config import load_config

    print(machine_line(), flush=True)
    rows = []
    with output_folder(args.out, "segtrain_variants_") as out:
        if args.tiny:
            config_path = write_tiny_config(out)
            plan = {"tiny": config_path}
        else:
            plan = {Path(name).stem: config_file(name) for name in args.sets.split(",")}
        steps = 4 if args.tiny else args.steps
        budget = args.budget
        for name, config_path in plan.items():
            foreground = load_config(config_path).data.classes[-1]
            jobs = [(variant, overrides) for variant, overrides in variants(foreground, args.share).items()
                    if variant in args.variants.split(",")]
            if budget:
                results = fit_budgets(jobs, config_path, budget, out, name, args.side_by_side)
            else:
                results = {variant: fit_steps(config_path, overrides, steps, 2 if args.tiny else 10,
                                              out / f"{name}_{variant}") for variant, overrides in jobs}
            for variant, (metrics, run_steps, minutes) in results.items():
                rows.append(row(name, variant, "best", metrics, run_steps, minutes))
                last = evaluate_model_file(out / f"{name}_{variant}" / "last.keras")
                rows.append(row(name, variant, "last", last, run_steps, minutes))
                print(f"{name} {variant}: {run_steps} steps in {minutes:.2f} min; fg IoU best {rows[-2]['iou']}, "
                      f"last {rows[-1]['iou']} [{load_average()}]", flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        print()
        per_run = f"a budget of {budget}" if budget else f"{steps} steps"
        print(f"tiny: {per_run} per run, figures mean nothing" if args.tiny else
              f"{per_run} per run, seed as configured; val split, whole images")
        print(table(rows))


if __name__ == "__main__":
    main()
