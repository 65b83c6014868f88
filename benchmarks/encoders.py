"""Encoder U-Nets (`model.encoder`): their training speed against today's U-Net, and what a pretrained encoder buys.

(a) speed: training images per second of each catalogued encoder U-Net against today's U-Net, all with
configs/epfl_roads.yaml's settings (crop 256, batch 4; the encoders with random weights, which cost the same),
through segtrain's own training loop; the variants take turns, a timed call each per round (a burst of load from
other users hits all alike), medians of the rounds.

(b) the mechanism, since ImageNet weights cannot be fetched everywhere: an encoder U-Net pretrained by segtrain on
CamVid (configs/camvid.yaml with the encoder, random start, --pretrain-budget), then fine-tuned on EPFL roads
(configs/epfl_roads.yaml with the encoder) with model.encoder_weights = that run, with and without a frozen first
phase (train.freeze_encoder_epochs, the encoder then at train.encoder_lr_scale 0.1), against the same encoder from
scratch (random weights, encoder_lr_scale 1: a random encoder needs the full rate) and today's U-Net, all at the
same wall-clock budget (train.budget). Prints the val split's mean IoU and road IoU (whole images, the policy fit
leaves) and the minutes of training used. One seed: differences of a point or two are within seed noise.

    python benchmarks/encoders.py --part speed --repeats 5
    python benchmarks/encoders.py --part mechanism --encoder mobilenetv3large --pretrain-budget 20m --budget 10m
    python benchmarks/encoders.py --tiny        # seconds-long smoke run of both parts on synthetic sets
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPO, SHARED_DATASETS, alternate, fmt, load_average, machine_line, output_folder,  # noqa: E402
                     write_dataset)

QUIET = lambda *a, **k: None  # noqa: E731
ALL_ENCODERS = "mobilenetv3small,mobilenetv3large,efficientnetv2b0,resnet50,convnexttiny"


def config_dict(name: str, root: Path, **sections) -> dict:
    """configs/NAME.yaml as a dict, its data.root made absolute (`root`), some keys of its sections replaced."""
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    raw["data"]["root"] = str(root)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------------- (a) speed


def speed(root: Path, encoders: list[str], work: Path, repeats: int, steps: int, crop=None, batch=None) -> list[str]:
    """Training img/s of today's U-Net and of each encoder U-Net with epfl_roads.yaml's settings; table lines."""
    from _common import SegtrainSetup

    from segtrain.config import config_from_dict

    data = {k: v for k, v in (("crop", crop), ("batch_size", batch)) if v is not None}
    variants = {"unet (today's)": config_dict("epfl_roads", root, data=data)}
    for name in encoders:
        variants[f"unet_{name}"] = config_dict("epfl_roads", root, data=data,
                                               model={"encoder": name, "encoder_weights": "none"})
    setups, params = {}, {}
    for label, raw in variants.items():
        setup = SegtrainSetup(config_from_dict(raw), work / f"speed_{label.split()[0]}")
        setup.run_steps(2)  # traces the step, warms the pipeline
        setups[label], params[label] = setup, setup.model.count_params()
        print(f"built {label}: {params[label] / 1e6:.1f} M parameters [{load_average()}]", flush=True)

    def timed_call(setup):
        def run() -> float:
            start = time.perf_counter()
            setup.run_steps(steps)
            return steps * setup.config.data.batch_size / (time.perf_counter() - start)
        return run

    calls = {label: timed_call(setup) for label, setup in setups.items()}
    alternate(calls, 1)  # an untimed round: every variant past its first calls (pipeline, allocator)
    rates = alternate(calls, repeats)
    first = next(iter(setups.values())).config.data
    reference = statistics.median(rates["unet (today's)"])
    lines = [f"crop {first.crop}, batch {first.batch_size}, {steps} steps per timed call, {repeats} rounds",
             "| model | parameters (M) | img/s (median) | runs | vs today's U-Net |", "|---|---:|---:|---|---:|"]
    for label, values in rates.items():
        median = statistics.median(values)
        lines.append(f"| {label} | {params[label] / 1e6:.1f} | {median:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} | {median / reference:.2f}x |")
    return lines


# ---------------------------------------------------------------------------- (b) the mechanism


def fit(raw: dict, budget: str | None, run_dir: Path) -> dict:
    """fit a config dict with train.budget (None: its own epochs, the smoke run); its metrics plus the minutes of
    training and the steps (planned under a budget)."""
    from segtrain.api import fit as fit_run

    config = write_config(raw, run_dir.parent / f"{run_dir.name}.yaml")
    start = time.perf_counter()
    overrides = [f"train.budget={budget}"] if budget else []
    metrics = dict(fit_run(config, overrides, out=run_dir, overwrite=True, log=QUIET).metrics)
    metrics["train_minutes"] = (time.perf_counter() - start) / 60 - metrics.get("post_training_seconds", 0.0) / 60
    if budget:
        plan = json.loads((run_dir / "budget.json").read_text())
        metrics["planned_steps"] = plan["replans"][-1]["total_steps"] if plan.get("replans") else plan["total_steps"]
    else:
        metrics["planned_steps"] = int((run_dir / "history.csv").read_text().splitlines()[-1].split(",")[1])
    return metrics


def mechanism(pretrain_root: Path, target_root: Path, encoder: str, pretrain_budget: str, budget: str,
              freeze_epochs: float, work: Path, tiny: bool = False) -> list[str]:
    """Pretrain on camvid, fine-tune on epfl_roads with and without the frozen phase, against the same encoder
    from scratch and today's U-Net, all at `budget`; table lines."""
    pretrain_name, target_name = ("roads", "roads") if tiny else ("camvid", "epfl_roads")
    model = {"encoder": encoder, "encoder_weights": "none"}
    small = {"crop": 32, "batch_size": 2} if tiny else {}
    short = {"epochs": 2, "steps_per_epoch": 1} if tiny else {}  # the smoke run: two one-step epochs, no budget
    if tiny:
        model["decoder_filters"] = [16, 8, 8, 8, 8]
    pretrained, source = work / "pretrain", f"pretrained on {pretrain_root.name}"
    print(f"pretraining {encoder} on {pretrain_root.name} for {pretrain_budget or 'two one-step epochs'} "
          f"[{load_average()}]", flush=True)
    pre = fit(config_dict(pretrain_name, pretrain_root, model=model, data=small, train=short), pretrain_budget,
              pretrained)
    print(f"pretrained: val mean IoU {fmt(pre['mean_iou'])} in {pre['train_minutes']:.1f} min", flush=True)
    weights = {**model, "encoder_weights": str(pretrained)}
    variants = [
        ("unet (today's)", "-", "-", config_dict(target_name, target_root, data=small, train=short)),
        (f"unet_{encoder}", "none (random)", "no", config_dict(target_name, target_root, model=model, data=small,
                                                              train={**short, "encoder_lr_scale": 1.0})),
        (f"unet_{encoder}", source, "no", config_dict(target_name, target_root, model=weights, data=small,
                                                      train=short)),
        (f"unet_{encoder}", source, f"{freeze_epochs:g} epochs",
         config_dict(target_name, target_root, model=weights, data=small,
                     train={**short, "freeze_encoder_epochs": freeze_epochs})),
    ]
    lines = ["| model | encoder weights | frozen phase | training minutes | steps | mean IoU | road IoU |",
             "|---|---|---|---:|---:|---:|---:|"]
    for i, (label, weights_from, frozen, raw) in enumerate(variants):
        metrics = fit(raw, budget, work / f"finetune_{i}")
        road = list(metrics["per_class"].values())[1]["iou"]
        lines.append(f"| {label} | {weights_from} | {frozen} | {metrics['train_minutes']:.1f} | "
                     f"{metrics['planned_steps']} | {fmt(metrics['mean_iou'])} | {fmt(road)} |")
        print(lines[-1], f"[{load_average()}]", flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("speed", "mechanism", "both"), default="both")
    parser.add_argument("--encoders", default=ALL_ENCODERS, help="(speed) comma-separated encoder names")
    parser.add_argument("--repeats", type=int, default=5, help="(speed) timed rounds")
    parser.add_argument("--steps", type=int, default=4, help="(speed) optimizer steps per timed call")
    parser.add_argument("--encoder", default="mobilenetv3large", help="(mechanism) the encoder to pretrain")
    parser.add_argument("--pretrain-budget", default="20m", help="(mechanism) train.budget on camvid")
    parser.add_argument("--budget", default="10m", help="(mechanism) train.budget of each epfl_roads run")
    parser.add_argument("--freeze-epochs", type=float, default=2.0, help="(mechanism) train.freeze_encoder_epochs")
    parser.add_argument("--out", type=Path, help="keep the configs and run folders here (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: synthetic sets, MobileNetV3Small, seconds")
    args = parser.parse_args()

    print(machine_line(), flush=True)
    with output_folder(args.out, "segtrain_encoders_") as out:
        if args.tiny:
            pretrain_root = write_dataset(out / "tiny_a", 4, 2, 64)
            target_root = write_dataset(out / "tiny_b", 4, 2, 64, seed=1)
            encoders, encoder, repeats, steps = ["mobilenetv3small"], "mobilenetv3small", 1, 1
            pretrain_budget = budget = None
            speed_sizes = {"crop": 32, "batch": 2}
        else:
            pretrain_root, target_root = SHARED_DATASETS / "camvid", SHARED_DATASETS / "epfl_roads"
            encoders, encoder = args.encoders.split(","), args.encoder
            repeats, steps, pretrain_budget, budget = args.repeats, args.steps, args.pretrain_budget, args.budget
            speed_sizes = {}
        if args.part in ("speed", "both"):
            lines = speed(target_root, encoders, out, repeats, steps, **speed_sizes)
            print()
            print("training speed, epfl_roads.yaml's settings:")
            print("\n".join(lines), flush=True)
        if args.part in ("mechanism", "both"):
            lines = mechanism(pretrain_root, target_root, encoder, pretrain_budget, budget, args.freeze_epochs, out,
                              tiny=args.tiny)
            print()
            per_run = f"{budget} per run (train.budget)" if budget else "two one-step epochs per run (the smoke run)"
            print(f"fine-tuning on {target_root.name}: {per_run}, the encoder pretrained on {pretrain_root.name} for "
                  f"{pretrain_budget or 'two one-step epochs'}; val split, whole images, the policy fit leaves")
            print("\n".join(lines))


if __name__ == "__main__":
    main()
