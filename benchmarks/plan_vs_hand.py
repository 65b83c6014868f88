"""`segtrain plan` + a time budget against the shipped hand-written config at the same budget.

For each shared data set: `segtrain plan` writes a config from the data (CPU, the budget given), the shipped
`configs/<set>.yaml` gets the same `train.budget`, and both train with `fit` (best.keras picked on val, as fit
does). Prints, per set and config, the minutes of training actually used, the planned steps and the val split's
mean IoU and foreground IoU (two classes) or pixel accuracy (several), whole images, the policy fit leaves (one
temperature, argmax). One seed: differences of a point or two are within seed noise.

    python benchmarks/plan_vs_hand.py --sets membrane,crackforest --budget 10m
    python benchmarks/plan_vs_hand.py --budget 30m --side-by-side   # plan and hand at once, a core each
    python benchmarks/plan_vs_hand.py --tiny        # a seconds-long smoke run on a synthetic set

--side-by-side trains a set's two configs at the same time, each in its own process pinned to its own core
(os.sched_setaffinity; TensorFlow then sizes its thread pools to the one core), so both see the same machine:
whatever else runs slows both alike, and neither measures its step time on a quieter machine than the other.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPO, SHARED_DATASETS, add_pinned_arguments, budgeted_fit, fit_side_by_side,  # noqa: E402
                     fmt, load_average, machine_line, output_folder, run_pinned_child, write_dataset)


def plan_config(root: Path, budget: str, out: Path) -> Path:
    """The planned config for `root` (CPU) written to `out`."""
    from segtrain.planning.fingerprint import fingerprint
    from segtrain.planning.plan import make_plan
    from segtrain.planning.units import parse_budget
    from segtrain.planning.writer import write_plan

    ignore = [11] if root.name == "camvid" else None  # CamVid's void is an ordinary id: its README names it
    write_plan(make_plan(fingerprint(root, ignore=ignore), "cpu", None, parse_budget(budget)), out)
    return out


def row(name: str, config: str, metrics: dict) -> str:
    classes = list(metrics["per_class"])
    fg = metrics["per_class"][classes[1]]["iou"] if len(classes) == 2 else None
    return (f"| {name} | {config} | {metrics['train_minutes']:.1f} | {metrics['planned_steps']} | "
            f"{fmt(metrics['mean_iou'])} | {fmt(fg)} | {fmt(metrics['pixel_accuracy'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="membrane,epfl_roads,crackforest,camvid")
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--out", type=Path, help="keep the configs and run folders here (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: a synthetic set, a few-second budget")
    parser.add_argument("--side-by-side", action="store_true",
                        help="train plan and hand at the same time, each pinned to its own core")
    add_pinned_arguments(parser)  # the child process of --side-by-side
    args = parser.parse_args()
    if run_pinned_child(args):
        return

    print(machine_line(), flush=True)
    lines = ["| set | config | training minutes | steps | mean IoU | foreground IoU | pixel acc. |",
             "|---|---|---:|---:|---:|---:|---:|"]
    with output_folder(args.out, "segtrain_plan_vs_hand_") as out:
        if args.tiny:
            sets = {"tiny": write_dataset(out / "tiny", 6, 4, 64)}
            budget = "2s"
        else:
            sets = {name: SHARED_DATASETS / name for name in args.sets.split(",")}
            budget = args.budget
        for name, root in sets.items():
            planned = plan_config(root, budget, out / f"{name}_planned.yaml")
            hand = REPO / "configs" / ("roads.yaml" if args.tiny else f"{name}.yaml")
            extra = [f"data.root={root}"] if args.tiny else []
            configs = (("plan", planned), ("hand", hand))
            if args.side_by_side:
                print(f"{name}: plan and hand side by side, one core each [{load_average()}]", flush=True)
                runs = [(f"{label} fit on {name}", config, out / f"run_{name}_{label}",
                         extra if label == "hand" else ()) for label, config in configs]
                for (label, config), metrics in zip(configs, fit_side_by_side(__file__, runs, budget)):
                    lines.append(row(name, f"{label} ({config.name})", metrics))
                    print(lines[-1], f"[{load_average()}]", flush=True)
                continue
            for label, config in configs:
                metrics = budgeted_fit(config, budget, out / f"run_{name}_{label}", extra if label == "hand" else ())
                lines.append(row(name, f"{label} ({config.name})", metrics))
                print(lines[-1], f"[{load_average()}]", flush=True)
        print()
        print(f"budget {budget} per run; val split, whole images, the policy fit leaves (one temperature, argmax)")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
