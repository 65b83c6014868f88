"""Crackforest: calibration, and an operating point tuned on one half of val and reported on the other.

configs/crackforest.yaml trained for a fixed number of steps. Its val split (23 images) is cut into two
fixed halves in file order: `val_a` (the first 12) picks best.keras, fits the temperature and tunes the
operating point; `val_b` (the last 11) is only reported on. Rows, all on val_b, whole images:
- argmax: the untuned rule (p_fg >= 0.5 on calibrated probabilities: temperature scaling keeps the arg-max);
- tuned for F1, without and with post-processing (`segtrain tune --split val_a --objective f1`);
- tuned for cost, without and with post-processing (`--objective cost`, the config's costs: a missed crack
  pixel costs 5, a false alarm 1).
Columns: crack F1, precision, recall, IoU and the mean cost per pixel under those costs; the expected
calibration error (15 bins) on val_b before and after the temperature is printed above the table.
One seed: differences of a point or two are within seed noise.

    python benchmarks/operating_point.py --steps 400
    python benchmarks/operating_point.py --tiny        # seconds-long smoke run on synthetic data
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPO, SHARED_DATASETS, fmt, machine_line, output_folder, set_budget, split_halves,  # noqa: E402
                     timed_run_fit, write_dataset)

QUIET = lambda *a, **k: None  # noqa: E731
TINY_OVERRIDES = ["data.mask.values={0: 0, 255: 1}", "data.crop=32", "data.batch_size=2", "model.depth=2",
                  "model.base_filters=4"]


def evaluate(run_dir: Path, data_root: Path, split: str = "val_b", tuned: bool = True) -> dict:
    """Metrics of run_dir/best.keras on `split`, with the run's operating point (tuned) or without."""
    import dataclasses

    from segtrain.data.discovery import find_pairs
    from segtrain.data.masks import MaskMapping
    from segtrain.evaluation import evaluate_run
    from segtrain.runs import run_config

    config = run_config(run_dir)
    config = dataclasses.replace(config, predict=dataclasses.replace(config.predict, tuned=tuned))
    pairs = find_pairs(str(data_root), split)
    return evaluate_run(run_dir / "best.keras", config, pairs, MaskMapping(config.data.mask, config.data.classes),
                        run_dir / f"eval_{split}", split, log=QUIET, worst=0)


def row(name: str, metrics: dict, costs) -> dict:
    import numpy as np

    from segtrain.policy.tuning import objective_values

    fg = list(metrics["per_class"].values())[1]
    cm = np.asarray(metrics["confusion_matrix"])
    return {"row": name, "f1": fg["dice"], "precision": fg["precision"], "recall": fg["recall"], "iou": fg["iou"],
            "mean_cost": -float(objective_values(cm, "cost", costs)[0]), "threshold": metrics["decision"]["threshold"],
            "postprocess": metrics["decision"]["postprocess"]}


def table(rows: list[dict]) -> str:
    lines = ["| operating point | threshold | post-processing | F1 | precision | recall | IoU | mean cost / pixel |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        post = ", ".join(f"{c}: min_size {n}, max_hole {m}" for c, (n, m) in r["postprocess"].items()) or "-"
        lines.append(f"| {r['row']} | {fmt(r['threshold'])} | {post} | {fmt(r['f1'])} | {fmt(r['precision'])} | "
                     f"{fmt(r['recall'])} | {fmt(r['iou'])} | {fmt(r['mean_cost'], 4)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (10 epochs)")
    parser.add_argument("--out", type=Path, help="keep the run folder and results.json here (default: a temp folder)")
    parser.add_argument("--objectives", default="f1,cost", help="comma-separated objectives to tune for")
    parser.add_argument("--tiny", action="store_true", help="smoke run: a synthetic set, a few steps")
    args = parser.parse_args()

    from segtrain.config import load_config
    from segtrain.decision import decision_cost_matrix
    from segtrain.policy.tuning import tune_run

    print(machine_line(), flush=True)
    with output_folder(args.out, "segtrain_operating_point_") as out:
        source = write_dataset(out / "tiny_source", 6, 4, 64) if args.tiny else SHARED_DATASETS / "crackforest"
        data_root = split_halves(source, out / "data")
        overrides = [f"data.root={data_root}", "data.val_split=val_a"] + (TINY_OVERRIDES if args.tiny else [])
        config = load_config(REPO / "configs" / "crackforest.yaml", overrides)
        steps = 2 if args.tiny else args.steps
        set_budget(config, steps, epochs=1 if args.tiny else 10)
        run_dir = out / "run"
        metrics = timed_run_fit(config, run_dir)
        print(f"crackforest: {steps} steps in {metrics['train_seconds'] / 60:.2f} min", flush=True)
        costs = decision_cost_matrix(config)
        untuned = evaluate(run_dir, data_root, tuned=False)
        calibration = untuned["calibration"]
        rows = [row("argmax (untuned)", untuned, costs)]
        for objective in args.objectives.split(","):
            for post in (False, True):
                tune_run(str(run_dir), "val_a", objective, postprocess=post, log=QUIET)
                name = f"tuned for {objective}" + (" + post-processing" if post else "")
                rows.append(row(name, evaluate(run_dir, data_root), costs))
        (out / "results.json").write_text(json.dumps({"rows": rows, "calibration": calibration}, indent=2,
                                                     default=str))
        print()
        print("tiny: a few steps, figures mean nothing" if args.tiny else
              f"{steps} steps; best.keras picked, temperature fitted and operating points tuned on val_a; "
              "every figure on val_b, whole images")
        print(f"calibration on val_b: T = {calibration['temperature']}, ECE {fmt(calibration['ece_before'], 4)} "
              f"before -> {fmt(calibration['ece_after'], 4)} after ({calibration['ece_bins']} bins)")
        print(f"costs: {costs.tolist()}")
        print(table(rows))


if __name__ == "__main__":
    main()
