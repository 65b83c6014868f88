"""CamVid: class weights, and a decision that undoes what they cost (prior correction, tau tuned on labelled data).

configs/camvid.yaml trained twice for the same steps and seed, with `loss.class_weights: none` and
`median_frequency` (max weight 20), both with `predict.prior_correction: tuned` for the tuned rows. CamVid's val split (one 101-frame drive) is cut into two fixed halves in file order:
`val_a` (the first 51 frames) picks best.keras, fits the temperature and tunes tau; `val_b` (the last 50)
is only reported on. Rows, all on val_b, whole images:
- none: unweighted training, arg-max;
- median_frequency: weighted training, arg-max;
- + weights: arg-max of p / w (tau = 1, nothing tuned);
- + tuned: arg-max of p / w**tau * exp(b), tau and one bias per class tuned on val_a for mean IoU
  (`segtrain tune --split val_a --no-postprocess`), written only when it beat the untuned rule on held-out folds
  of val_a;
- + tuned + post-processing: the same tune also choosing per-class min_size / max_hole;
- none + tuned: the unweighted model with the same tune (class biases only: its weights are all 1).
Then, for both models, one temperature against per-class temperatures, both fitted on val_a's logits and scored on
val_b's: NLL, ECE, and the arg-max's mean IoU and pixel accuracy (per-class temperatures change the arg-max).
Prints Markdown tables. One seed: differences of a point or two are within seed noise.

    python benchmarks/prior_correction.py --steps 480
    python benchmarks/prior_correction.py --tiny        # seconds-long smoke run on synthetic data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPO, SHARED_DATASETS, fmt, machine_line, output_folder, set_budget, split_halves,  # noqa: E402
                     timed_run_fit)

QUIET = lambda *a, **k: None  # noqa: E731


def tiny_dataset(root: Path) -> Path:
    """Three classes (noise, red stripes, rare green squares) in the layout split_halves reads."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 4)):
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            mask = np.zeros((32, 32), np.uint8)
            mask[:, rng.integers(0, 28):][:, :3] = 1
            y, x = rng.integers(0, 29, 2)
            mask[y:y + 3, x:x + 3] = 2
            image = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            image[mask == 1, 0] = 220
            image[mask == 2, 1] = 220
            Image.fromarray(image).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i:03d}.png")
    return root


TINY_OVERRIDES = ["data.classes=[background, stripe, square]", "data.mask.values={0: 0, 1: 1, 2: 2}",
                  "data.mask.ignore=[]", "data.crop=16", "data.batch_size=2", "model.depth=1", "model.base_filters=4"]


def evaluate(run_dir: Path, data_root: Path, correction: str, split: str = "val_b") -> dict:
    """Metrics of run_dir/best.keras on `split` with predict.prior_correction = `correction`; the run's tuned point
    (tau, biases, post-processing in policy.json) only for "tuned"."""
    from segtrain.data.discovery import find_pairs
    from segtrain.data.masks import MaskMapping
    from segtrain.evaluation import evaluate_run
    from segtrain.runs import run_config

    config = run_config(run_dir)
    config = dataclasses.replace(config, predict=dataclasses.replace(config.predict, prior_correction=correction,
                                                                     tuned=correction == "tuned"))
    pairs = find_pairs(str(data_root), split)
    return evaluate_run(run_dir / "best.keras", config, pairs, MaskMapping(config.data.mask, config.data.classes),
                        run_dir / f"eval_{split}_{correction}", split, log=QUIET, worst=0)


def temperatures(run_dir: Path, data_root: Path) -> list[dict]:
    """One T and per-class T fitted on val_a's logits, each scored on val_b's: NLL, ECE, arg-max mean IoU and pixel
    accuracy (T = 1 too)."""
    import numpy as np

    from segtrain.data.discovery import find_pairs
    from segtrain.data.masks import MaskMapping
    from segtrain.metrics import metrics_from_confusion
    from segtrain.policy.calibration import PixelSample, expected_calibration_error
    from segtrain.policy.predictor import Predictor, SplitLogits
    from segtrain.decision import decide
    from segtrain.policy.temperature import (apply_temperature, fit_class_temperatures, fit_temperature,
                                             negative_log_likelihood)
    from segtrain.policy.tuning import confusion
    from segtrain.runs import run_config

    config = run_config(run_dir)
    mapping = MaskMapping(config.data.mask, config.data.classes)
    predictor = Predictor.load(run_dir / "best.keras", config, log=QUIET, use_calibration=False, use_tuned=False)
    fit = PixelSample()
    for _, _, truth, logits in SplitLogits(predictor, find_pairs(str(data_root), "val_a"), mapping):
        fit.add(logits, truth)
    scalar = fit_temperature(fit.logits, fit.labels)
    vector = fit_class_temperatures(fit.logits, fit.labels)
    k = len(config.data.classes)
    rows = []
    scored = SplitLogits(predictor, find_pairs(str(data_root), "val_b"), mapping)
    for name, t in (("T = 1", 1.0), (f"one T ({scalar:.3f})", scalar),
                    ("per-class T (" + ", ".join(f"{v:.2f}" for v in vector) + ")", vector)):
        sample, cm = PixelSample(), np.zeros((k, k), np.int64)
        for _, _, truth, logits in scored:
            sample.add(logits, truth)
            cm += confusion(truth, decide(apply_temperature(logits, t)), k)
        m = metrics_from_confusion(cm, config.data.classes)
        rows.append({"row": name, "nll": negative_log_likelihood(sample.logits, sample.labels, t),
                     "ece": expected_calibration_error(apply_temperature(sample.logits, t), sample.labels),
                     "mean_iou": m["mean_iou"], "pixel_accuracy": m["pixel_accuracy"]})
    return rows


def temperature_table(rows: list[dict]) -> str:
    lines = ["| temperature (fitted on val_a) | NLL | ECE | mean IoU (arg-max) | pixel acc. |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['row']} | {fmt(r['nll'])} | {fmt(r['ece'])} | {fmt(r['mean_iou'])} | {fmt(r['pixel_accuracy'])} |"
              for r in rows]
    return "\n".join(lines)


def row(name: str, metrics: dict) -> dict:
    ious = {c: m["iou"] for c, m in metrics["per_class"].items()}
    return {"row": name, "mean_iou": metrics["mean_iou"], "pixel_accuracy": metrics["pixel_accuracy"],
            "zero_iou": sum(1 for v in ious.values() if v is not None and v == 0.0),
            "never_predicted": metrics.get("never_predicted", []), "iou": ious,
            "tau": metrics["decision"]["prior_correction"]["tau"]}


def table(rows: list[dict]) -> str:
    classes = list(rows[0]["iou"])
    lines = ["| row | tau | mean IoU | pixel acc. | classes at IoU 0 | " + " | ".join(classes) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(classes)]
    for r in rows:
        lines.append(f"| {r['row']} | {fmt(r['tau'], 2)} | {fmt(r['mean_iou'])} | {fmt(r['pixel_accuracy'])} | "
                     f"{r['zero_iou']} | " + " | ".join(fmt(r["iou"][c]) for c in classes) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=480, help="training steps per run (8 epochs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override configs/camvid.yaml (both runs)")
    parser.add_argument("--out", type=Path, help="keep run folders and results.json here (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: a synthetic set, a few steps each")
    parser.add_argument("--reuse", action="store_true", help="evaluate the runs already in --out (no training)")
    args = parser.parse_args()

    from segtrain.config import load_config
    from segtrain.policy.tuning import tune_run

    print(machine_line(), flush=True)
    with output_folder(args.out, "segtrain_prior_") as out:
        source = tiny_dataset(out / "tiny_source") if args.tiny else SHARED_DATASETS / "camvid"
        data_root = split_halves(source, out / "data")
        overrides = [f"data.root={data_root}", "data.val_split=val_a"] + (TINY_OVERRIDES if args.tiny else [])
        steps = 2 if args.tiny else args.steps
        runs = {}
        for weights in ("none", "median_frequency"):
            runs[weights] = out / f"run_{weights}"
            if args.reuse and (runs[weights] / "best.keras").is_file():
                continue
            config = load_config(REPO / "configs" / "camvid.yaml",
                                 overrides + args.overrides + [f"loss.class_weights={weights}",
                                                               "loss.max_weight=20", "predict.prior_correction=tuned"])
            set_budget(config, steps, epochs=1 if args.tiny else 8, validations=1 if args.tiny else 4)
            metrics = timed_run_fit(config, runs[weights])
            print(f"{weights}: {steps} steps in {metrics['train_seconds'] / 60:.2f} min", flush=True)
        weighted, unweighted = runs["median_frequency"], runs["none"]
        rows = [row("none", evaluate(unweighted, data_root, "none")),
                row("median_frequency", evaluate(weighted, data_root, "none")),
                row("median_frequency + weights (tau 1)", evaluate(weighted, data_root, "weights"))]
        tuned = {}
        for name, run, post in (("median_frequency + tuned (tau, class biases)", weighted, False),
                                ("median_frequency + tuned + post-processing", weighted, True),
                                ("none + tuned (class biases)", unweighted, False)):
            tuned[name] = tune_run(str(run), "val_a", "iou", postprocess=post, log=QUIET)
            rows.append(row(name + ("" if tuned[name]["written"] else " (nothing written)"),
                            evaluate(run, data_root, "tuned")))
        calibration = {name: temperatures(run, data_root) for name, run in (("none", unweighted),
                                                                           ("median_frequency", weighted))}
        (out / "results.json").write_text(json.dumps({"rows": rows, "tuned": tuned, "temperatures": calibration},
                                                     indent=2, default=str))
        print()
        print("tiny: a few steps per run, figures mean nothing" if args.tiny else
              f"{steps} steps per run; best.keras picked, temperature fitted and the decision tuned on val_a; "
              "every row scored on val_b, whole images")
        print(table(rows))
        for name, record in tuned.items():
            estimate = record.get("estimate") or {}
            print(f"{name}: level {record['level']}, tau {record.get('tau')}, biases {record.get('bias')}, "
                  f"post-processing {record.get('postprocess')}; held-out estimate on val_a: untuned "
                  f"{fmt(estimate.get('before'))}, levels {estimate.get('levels')}")
        for name, rows_t in calibration.items():
            print(f"\n{name}: one temperature against per-class temperatures (fitted on val_a, scored on val_b)")
            print(temperature_table(rows_t))


if __name__ == "__main__":
    main()
