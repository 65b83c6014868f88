"""Class-aware sampling and the new augmentations against a shipped config, at the same steps and seed.

For each named config (configs/<set>.yaml) four runs, each the same number of steps (10 epochs),
the same seed and the same validation schedule:
- plain: the config as shipped;
- sampling: plus `data.sampling: {<foreground>: SHARE}` (default 0.5: half the crops centred on
  a foreground pixel; `loss.class_weights_from` stays the config's default, `sampled`);
- augmentation: plus `rotate: 30`, `scale: [0.8, 1.25]`, `brightness: 0.1`, `contrast: 0.2`;
- both.
Scored as `segtrain eval` scores (whole val images, the config's decision rule, calibration as fit
fits it) for best.keras (picked on val by the config's monitor) and last.keras (no selection on val).
Prints the foreground's IoU, F1, precision and recall and the mean IoU as a Markdown table. One seed:
differences of a point or two are within seed noise.

    python benchmarks/data_variants.py --sets membrane,epfl_roads --steps 400
    python benchmarks/data_variants.py --tiny        # seconds-long smoke run on synthetic data
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, evaluate_model_file, machine_line, set_budget, timed_run_fit, write_dataset  # noqa: E402

AUGMENT = ["data.augment.rotate=30", "data.augment.scale=[0.8, 1.25]", "data.augment.brightness=0.1",
           "data.augment.contrast=0.2"]


def variants(foreground: str, share: float) -> dict[str, list[str]]:
    sampling = [f"data.sampling={{{foreground}: {share}}}"]
    return {"plain": [], "sampling": sampling, "augmentation": AUGMENT, "both": sampling + AUGMENT}


def row(name: str, variant: str, model: str, metrics: dict) -> dict:
    fg = list(metrics["per_class"].values())[-1]
    return {"set": name, "variant": variant, "model": model, "iou": fg["iou"], "f1": fg["dice"],
            "precision": fg["precision"], "recall": fg["recall"], "mean_iou": metrics["mean_iou"]}


def table(rows: list[dict]) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| set | variant | model | fg IoU | fg F1 | precision | recall | mean IoU |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['set']} | {r['variant']} | {r['model']} | {f(r['iou'])} | {f(r['f1'])} | {f(r['precision'])} | "
              f"{f(r['recall'])} | {f(r['mean_iou'])} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="membrane,epfl_roads", help="comma-separated configs/<set>.yaml names")
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (10 epochs)")
    parser.add_argument("--share", type=float, default=0.5, help="share of crops centred on the foreground")
    parser.add_argument("--variants", default="plain,sampling,augmentation,both")
    parser.add_argument("--out", type=Path, help="keep run folders and results.json here (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: a synthetic set, a few steps each")
    args = parser.parse_args()

    from segtrain.config import load_config

    print(machine_line(), flush=True)
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="segtrain_variants_")
    out = args.out or Path(tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        if args.tiny:
            root = write_dataset(out / "tiny_data", 6, 2, 64)
            config_path = out / "tiny.yaml"
            config_path.write_text(
                f"data: {{root: {root}, classes: [background, line], mask: {{threshold: 127}}, crop: 32, "
                "batch_size: 2}\nmodel: {depth: 2, base_filters: 4}\n")
            plan = {"tiny": config_path}
        else:
            plan = {name: REPO / "configs" / f"{name}.yaml" for name in args.sets.split(",")}
        steps = 4 if args.tiny else args.steps
        for name, config_path in plan.items():
            foreground = load_config(config_path).data.classes[-1]
            for variant, overrides in variants(foreground, args.share).items():
                if variant not in args.variants.split(","):
                    continue
                config = load_config(config_path, overrides)
                set_budget(config, steps, epochs=2 if args.tiny else 10)
                run_dir = out / f"{name}_{variant}"
                metrics = timed_run_fit(config, run_dir)
                rows.append(row(name, variant, "best", metrics))
                rows.append(row(name, variant, "last", evaluate_model_file(run_dir / "last.keras")))
                print(f"{name} {variant}: {config.train.epochs * config.train.steps_per_epoch} steps in "
                      f"{metrics['train_seconds'] / 60:.2f} min; fg IoU best {rows[-2]['iou']}, last {rows[-1]['iou']}",
                      flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        print()
        print("tiny: a few steps per run, figures mean nothing" if args.tiny else
              f"{args.steps} steps per run, seed as configured; val split, whole images")
        print(table(rows))
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
