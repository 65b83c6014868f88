"""Fit a run's temperature on a labelled split and store it in the run's policy.json (`segtrain calibrate`, and the
end of `segtrain fit`).

One temperature, or one per class with three or more classes when that lowers the NLL on held-out images
(`segtrain.policy.temperature.choose_temperature`), fitted on a seeded sample of at most
`segtrain.policy.calibration.MAX_PIXELS` valid pixels of the split's logits. A temperature whose calibration
error on the fitting pixels is worse than T = 1's is not kept: the run stays at T = 1 and says so. A new
temperature makes a tuned operating point stale (it was chosen on the old probabilities): it is removed from
policy.json, with a message to tune again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click
import numpy as np

from segtrain.errors import DataError
from segtrain.policy.calibration import ECE_BINS, MAX_PIXELS, PixelSample, expected_calibration_error
from segtrain.policy.predictor import SplitLogits
from segtrain.policy.store import POLICY_FILE, StoredPolicy, read_stored, trained_class_weights, write_stored
from segtrain.policy.temperature import (TEMPERATURE_BOUNDS, apply_temperature, choose_temperature,
                                         negative_log_likelihood)


def fit_temperature_on(split_logits: SplitLogits, split: str, limit: int = MAX_PIXELS) -> dict:
    """The calibration record (temperature, method, figures) fitted on a split's logits."""
    sample = PixelSample(limit)
    for _, _, truth, logits in split_logits:
        sample.add(logits, truth)
    if len(sample.labels) == 0:
        raise DataError(f"split {split!r}: no labelled (non-ignored) pixels to fit a temperature on.")
    z, y = sample.logits, sample.labels
    choice = choose_temperature(z, y, sample.groups)
    temperature = choice["temperature"]
    record = {
        "method": choice["method"], "temperature": temperature, "split": split, "pixels": int(len(y)),
        "valid_pixels_seen": int(sample.seen), "images": len(split_logits.pairs),
        "nll_before": negative_log_likelihood(z, y, 1.0), "nll_after": negative_log_likelihood(z, y, temperature),
        "ece_before": expected_calibration_error(apply_temperature(z, 1.0), y),
        "ece_after": expected_calibration_error(apply_temperature(z, temperature), y),
        "ece_bins": ECE_BINS, "heldout": choice["heldout"],
        "description": "T minimising the NLL of softmax(z / T) (sigmoid for one channel) over a seeded sample of "
                       "the split's valid pixels; per-class temperatures only where they lowered the NLL on "
                       "held-out images",
    }
    if record["ece_after"] > record["ece_before"]:
        record["rejected"] = {"temperature": temperature, "ece_after": record["ece_after"]}
        record.update(method="scalar", temperature=1.0, nll_after=record["nll_before"],
                      ece_after=record["ece_before"])
    return record


def store_calibration(record: dict, model_path: Path, config, run_dir: Path, log=click.echo) -> StoredPolicy:
    """Put `record` into RUN/policy.json for `model_path` (a new file when it belonged to another model), drop a
    tuned point chosen on the old probabilities, and print the result."""
    from segtrain.policy.store import model_digest

    stored = read_stored(run_dir)
    if stored is None or stored.model_sha256 != model_digest(model_path):
        stored = StoredPolicy.new(model_path, trained_class_weights(config, run_dir))
    if stored.tuned is not None:
        log(f"note: the tuned operating point in {run_dir / POLICY_FILE} was chosen on the old probabilities and is "
            f"removed; run `segtrain tune {run_dir}` again.")
        stored.tuned = None
    stored.calibration = record
    path = write_stored(stored, run_dir)
    log(calibration_line(record).replace("\n", f" -> {path}\n", 1) if "\n" in calibration_line(record)
        else calibration_line(record) + f" -> {path}")
    return stored


def calibration_line(record: dict) -> str:
    """One line: the temperature, NLL and ECE before and after, and any warning."""
    t = record["temperature"]
    shown = f"{t:.4f}" if np.ndim(t) == 0 else "per class " + ", ".join(f"{v:.3g}" for v in t)
    line = (f"Calibration fitted on {record['split']} ({record['pixels']} pixels of {record['images']} images): "
            f"T = {shown}; "
            f"NLL {record['nll_before']:.4f} -> {record['nll_after']:.4f}, ECE {record['ece_before']:.4f} -> "
            f"{record['ece_after']:.4f}")
    heldout = record.get("heldout") or {}
    if heldout.get("nll_per_class") is not None:
        line += (f"\n  held-out images: NLL one T {heldout['nll_scalar']:.4f}, per class "
                 f"{heldout['nll_per_class']:.4f} -> {record['method'].replace('_', '-')}")
    if "rejected" in record:
        line += (f"\n  warning: the fitted T = {record['rejected']['temperature']} made the calibration error worse "
                 f"on the pixels it was fitted on (ECE {record['rejected']['ece_after']:.4f}); T = 1 is kept.")
    elif np.ndim(t) == 0 and min(abs(np.log(float(t) / b)) for b in TEMPERATURE_BOUNDS) < 0.01:
        line += (f"\n  warning: T = {float(t):.4g} is at the bound of the search {TEMPERATURE_BOUNDS}: the model's "
                 "logits are far from calibrated (an undertrained model gives logits near 0).")
    return line


def calibrate_run(checkpoint, split: Optional[str] = None, data_root: Optional[str] = None,
                  log=click.echo, overrides: Sequence[str] = ()) -> dict:
    """`segtrain calibrate RUN [--split S] [--data DIR] [--set predict.KEY=VALUE]`: fit the temperature of the run's
    model on a labelled split (default: the run's data.val_split) and store it in RUN/policy.json."""
    from segtrain.data.holdout import split_pairs
    from segtrain.data.masks import MaskMapping
    from segtrain.policy.predictor import Predictor
    from segtrain.runs import resolve_checkpoint, run_config

    model_path, run_dir = resolve_checkpoint(checkpoint)
    config = run_config(run_dir, overrides)
    split = split or config.data.val_split
    pairs = split_pairs(config, split, run_dir, data_root)
    if data_root is not None:
        config.data.root = data_root
    predictor = Predictor.load(model_path, config, log=log, use_calibration=False, use_tuned=False)
    log(f"Calibrating {model_path} on {split} ({len(pairs)} images)")
    split_logits = SplitLogits(predictor, pairs, MaskMapping(config.data.mask, config.data.classes), "calibrating")
    record = fit_temperature_on(split_logits, split)
    store_calibration(record, model_path, config, run_dir, log)
    if not config.predict.calibrate:
        log("warning: the run's config.yaml sets predict.calibrate: false, so predict, eval and export ignore the "
            "temperature (pass --set predict.calibrate=true to use it).")
    return record
