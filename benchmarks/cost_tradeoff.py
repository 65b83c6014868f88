"""Do the costs do what was asked? CrackForest trained with a high fn_cost, default costs and a high fp_cost.

The shipped configs/crackforest.yaml is trained three times with the same seed and the
same number of steps (the wall-clock budget turned into steps from a measured step
time), changing only the cost_sensitive term's prices of the crack class:
  high fn_cost (missing a crack costs F), default (1 and 1), high fp_cost (a false
  crack costs F).
Each is scored as `segtrain eval` scores it (whole val images, the config's decision
rule, which under `decision: cost` also moves the threshold to fp / (fp + fn)) on
last.keras (no selection on val). Expected: crack recall ordered high fn > default >
high fp, and crack precision in the reverse order. Prints the table (Markdown) and
the checks; the last line is `ratio: X`, X = recall(high fn) / recall(high fp).

    python benchmarks/cost_tradeoff.py --minutes 3 --factor 5
    python benchmarks/cost_tradeoff.py --tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPO, evaluate_model_file, machine_line, measure_step_seconds, output_folder,  # noqa: E402
                     set_budget, timed_run_fit, write_tiny_config)


def with_costs(config, fp: float, fn: float):
    """A copy of config whose cost_sensitive term (added if missing) prices the last class at fp / fn."""
    from segtrain.config import term_class

    config = copy.deepcopy(config)
    k = len(config.data.classes)
    terms = config.loss.terms
    cost_terms = [t for t in terms if t.name == "cost_sensitive"]
    if not cost_terms:
        terms.insert(0, term_class("cost_sensitive")())
        cost_terms = terms[:1]
    term = cost_terms[0]
    term.cost_matrix = None
    term.fp_cost = [1.0] * (k - 1) + [float(fp)]
    term.fn_cost = [1.0] * (k - 1) + [float(fn)]
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/crackforest.yaml")
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget per run")
    parser.add_argument("--factor", type=float, default=5.0, help="the high cost F")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="keep run folders here (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: a synthetic set, a few steps each")
    args = parser.parse_args()

    from segtrain.config import load_config

    print(machine_line())
    with output_folder(args.out, "segtrain_costs_") as out:
        if args.tiny:
            config_path = write_tiny_config(out, "crack", "loss: {terms: [cost_sensitive, {name: tversky, alpha: 0.3, "
                                                          "beta: 0.7}]}\npredict: {decision: cost}\n")
            config = load_config(config_path, args.overrides)
            total_steps = 3
        else:
            config = load_config(REPO / args.config, args.overrides)
            step = measure_step_seconds(config, out / "calibration")
            total_steps = max(10, int(args.minutes * 60 * 0.85 / step))
            print(f"{step:.3f} s per step measured -> {total_steps} steps for {args.minutes} min per run", flush=True)
        set_budget(config, total_steps, epochs=2 if args.tiny else 10)
        crack = config.data.classes[-1]
        variants = {f"high fn_cost ({crack}: fn {args.factor:g})": (1.0, args.factor),
                    "default costs (fn 1, fp 1)": (1.0, 1.0),
                    f"high fp_cost ({crack}: fp {args.factor:g})": (args.factor, 1.0)}
        rows = []
        for i, (name, (fp, fn)) in enumerate(variants.items()):
            run_dir = out / f"run{i}"
            metrics = timed_run_fit(with_costs(config, fp, fn), run_dir)
            last = evaluate_model_file(run_dir / "last.keras")
            c = last["per_class"][crack]
            rows.append({"variant": name, "threshold": last["decision"]["threshold"], "rule": last["decision"]["rule"],
                         "minutes": metrics["train_seconds"] / 60, "iou": c["iou"], "f1": c["dice"],
                         "precision": c["precision"], "recall": c["recall"],
                         "predicted_fraction": sum(r[-1] for r in last["confusion_matrix"]) / last["num_pixels"],
                         "expected_cost": last.get("expected_cost")})
            print(f"{name}: recall {c['recall']}, precision {c['precision']} "
                  f"({metrics['train_seconds'] / 60:.2f} min)", flush=True)
        (out / "cost_tradeoff.json").write_text(json.dumps(rows, indent=2))

        def f(v):
            return "n/a" if v is None else f"{v:.3f}"

        print()
        print(f"{config.train.epochs * config.train.steps_per_epoch} steps per run, seed {config.train.seed}, "
              f"decision {config.predict.decision}; val split, whole images, last.keras")
        print(f"| costs | decision | minutes | {crack} recall | {crack} precision | {crack} F1 | {crack} IoU | "
              f"predicted {crack} share |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            rule = r["rule"] if r["rule"] != "cost" else f"cost (threshold {fp_over(variants, r['variant']):.3f})"
            print(f"| {r['variant']} | {rule} | {r['minutes']:.2f} | {f(r['recall'])} | {f(r['precision'])} | "
                  f"{f(r['f1'])} | {f(r['iou'])} | {r['predicted_fraction']:.4f} |")
        recall = [r["recall"] or 0.0 for r in rows]
        precision = [r["precision"] for r in rows]
        recall_ok = recall[0] > recall[1] > recall[2]
        precision_ok = None not in precision and precision[0] < precision[1] < precision[2]
        print(f"recall high-to-low (fn > default > fp): {'yes' if recall_ok else 'NO'}; "
              f"precision low-to-high: {'yes' if precision_ok else 'NO'}")
        print(f"ratio: {recall[0] / recall[2]:.3f}" if recall[2] > 0 else "ratio: inf")


def fp_over(variants: dict, name: str) -> float:
    fp, fn = variants[name]
    return fp / (fp + fn)


if __name__ == "__main__":
    main()
