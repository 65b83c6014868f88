"""data.val_fraction (segtrain/data/holdout.py): the stratified, seeded choice, and one recorded split that fit,
resume, eval, calibrate and tune all read."""

import csv
import json
import shutil

import numpy as np
import pytest

from segtrain.config import load_config
from segtrain.data.holdout import (NO_CLASS, SPLIT_FILE, HeldOutSplit, class_pixels, describe, make_holdout,
                                   split_pairs, stratified_holdout, stratum_keys)
from segtrain.data.discovery import find_pairs
from segtrain.data.masks import MaskMapping
from segtrain.errors import ConfigError
from tests.helpers import invoke, make_stripes_dataset, write_config, write_pair


# ---------------------------------------------------------------------------- the choice


def test_stratum_is_the_rarest_class_each_image_holds():
    # class 0 in all 5 images, class 1 in 3, class 2 in 1: image 3 holds 1 and 2 -> 2; an empty image -> NO_CLASS
    presence = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)
    assert stratum_keys(presence).tolist() == [0, 1, 1, 2, 0, NO_CLASS]


def test_ties_go_to_the_class_with_fewer_pixels():
    every = np.ones((4, 2), bool)  # both classes in every image, as in a data set of cracks
    assert stratum_keys(every, pixels=[98_000, 1_600]).tolist() == [1, 1, 1, 1]
    holdout = HeldOutSplit("train", 0.25, 0, ["a"], {"crack": [4, 1]})
    assert "every image holds the same rarest class, so a plain seeded draw" in describe(holdout, 3)


def test_quota_per_stratum_by_largest_remainder():
    # 10 images of stratum 0, 5 of stratum 1, 1 of stratum 2; fraction 0.25 -> 4 held out (16 x 0.25).
    # Exact quotas 2.5, 1.25, 0.25: floors 2, 1, 0 (3), the one left goes to the largest remainder, stratum 0.
    keys = [0] * 10 + [1] * 5 + [2]
    held = stratified_holdout(keys, 0.25, seed=3)
    counts = np.bincount(np.asarray(keys)[held], minlength=3)
    assert counts.tolist() == [3, 1, 0]
    assert held == sorted(held) and len(set(held)) == 4


def test_each_stratum_within_one_image_of_its_share():
    rng = np.random.default_rng(0)
    for trial in range(20):
        keys = rng.integers(-1, 4, rng.integers(5, 60))
        fraction = float(rng.uniform(0.1, 0.6))
        held = stratified_holdout(keys, fraction, seed=trial)
        assert len(held) == int(np.floor(fraction * len(keys) + 0.5))
        for k in np.unique(keys):
            quota = fraction * (keys == k).sum()
            assert abs((keys[held] == k).sum() - quota) < 1.0


def test_seeded():
    keys = [0] * 30 + [1] * 10
    assert stratified_holdout(keys, 0.2, 7) == stratified_holdout(keys, 0.2, 7)
    draws = {tuple(stratified_holdout(keys, 0.2, seed)) for seed in range(5)}
    assert len(draws) > 1  # C(30, 6) x C(10, 2) ways: five seeds agreeing would mean the seed is not used


@pytest.mark.parametrize("fraction, n", [(0.05, 4), (0.9, 4)])
def test_a_share_leaving_a_side_empty_is_refused(fraction, n):
    with pytest.raises(ConfigError, match="data.val_fraction.*each side"):
        stratified_holdout([0] * n, fraction, 0)


def test_class_pixels_read_from_the_masks(tmp_path):
    root = make_stripes_dataset(tmp_path / "data", n_train=3, n_val=0, size=16)
    blank = np.zeros((16, 16), np.uint8)
    write_pair(root, "train", "img03", np.zeros((16, 16, 3), np.uint8), blank)
    config = load_config(write_config(tmp_path / "c.yaml", root))
    pairs = find_pairs(root, "train")
    pixels = class_pixels(pairs, MaskMapping(config.data.mask, config.data.classes), 2, 10**8)
    from PIL import Image

    stripes = [int((np.asarray(Image.open(p.mask)) > 127).sum()) for p in pairs]  # threshold 127, read by hand
    assert pixels.tolist() == [[256 - s, s] for s in stripes] and stripes[-1] == 0 and min(stripes[:3]) > 0


# ---------------------------------------------------------------------------- the run


def train_only_dataset(tmp_path, n=12):
    """Stripes in every image but three blank ones (their own stratum: background only)."""
    root = make_stripes_dataset(tmp_path / "data", n_train=n, n_val=0, size=32)
    for i in range(3):
        write_pair(root, "train", f"blank{i}", np.full((32, 32, 3), 20, np.uint8), np.zeros((32, 32), np.uint8))
    return root


def per_image_stems(folder):
    with open(folder / "per_image.csv") as handle:
        return sorted({row["image"] for row in csv.DictReader(handle)})


@pytest.mark.slow
def test_fit_records_the_split_and_every_command_reads_it(tmp_path):
    root = train_only_dataset(tmp_path)
    config_path = write_config(tmp_path / "c.yaml", root, data={"val_fraction": 0.2, "classes": ["background", "stripe"],
                                                                "mask": {"threshold": 127}, "crop": 16, "batch_size": 4})
    run = tmp_path / "run"
    result = invoke("fit", config_path, "--out", run)
    assert result.exit_code == 0, result.output
    assert "validating on 3 of the 15 train/ images" in result.output

    recorded = json.loads((run / SPLIT_FILE).read_text())
    again = make_holdout(load_config(config_path).data, seed=1)  # TINY's train.seed
    assert recorded["val"] == again.val and len(again.val) == 3  # round(0.2 x 15)
    assert recorded["strata"] == {"background": [3, 1], "stripe": [12, 2]}  # quotas 0.6 and 2.4: 1 + 2
    held = set(recorded["val"])

    assert per_image_stems(run) == sorted(held)  # fit's own evaluation: the held-out images
    assert invoke("eval", run, "--out", tmp_path / "ev").exit_code == 0
    assert per_image_stems(tmp_path / "ev") == sorted(held)
    assert invoke("eval", run, "--split", "train", "--out", tmp_path / "et").exit_code == 0
    all_stems = {p.stem for p in find_pairs(root, "train")}
    assert per_image_stems(tmp_path / "et") == sorted(all_stems - held)

    result = invoke("calibrate", run)
    assert result.exit_code == 0 and "(3 images)" in result.output, result.output
    result = invoke("tune", run)
    assert result.exit_code == 0, result.output
    assert "3 images" in result.output

    # resume reads the recorded split even after the seed in the config changed
    config = load_config(run / "config.yaml")
    assert sorted(p.stem for p in split_pairs(config, "val", run)) == sorted(held)


def test_a_run_without_its_split_file_exits_2(tmp_path):
    root = train_only_dataset(tmp_path, n=4)
    run = tmp_path / "run"
    run.mkdir()
    write_config(run / "config.yaml", root, data={"val_fraction": 0.25, "classes": ["background", "stripe"],
                                                  "mask": {"threshold": 127}, "crop": 16, "batch_size": 4})
    shutil.copy(run / "config.yaml", tmp_path / "c.yaml")
    (run / "best.keras").write_bytes(b"not read: the split is checked first")
    result = invoke("eval", run)
    assert result.exit_code == 2
    assert f"{run / SPLIT_FILE}: missing" in result.output


def test_a_held_out_file_gone_is_named(tmp_path):
    root = train_only_dataset(tmp_path, n=4)
    holdout = HeldOutSplit("train", 0.25, 0, ["img01"], {})
    (root / "train" / "images" / "img01.png").unlink()
    (root / "train" / "masks" / "img01.png").unlink()
    with pytest.raises(Exception, match="img01 from train/, no longer there"):
        holdout.select(find_pairs(root, "train"), held_out=True)


def test_fit_without_a_val_folder_suggests_val_fraction(tmp_path):
    root = train_only_dataset(tmp_path, n=4)
    result = invoke("fit", write_config(tmp_path / "c.yaml", root), "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert f"{root / 'val'}: split folder not found" in result.output and "data.val_fraction: 0.2" in result.output
    assert not (tmp_path / "run").exists()


def test_stats_counts_what_fit_trains_on(tmp_path):
    root = train_only_dataset(tmp_path, n=7)  # 10 images: 2 held out
    config = write_config(tmp_path / "c.yaml", root, data={"val_fraction": 0.2, "classes": ["background", "stripe"],
                                                           "mask": {"threshold": 127}, "crop": 16, "batch_size": 4})
    result = invoke("stats", config, "--json")
    assert result.exit_code == 0, result.output
    counted = json.loads(result.output)
    held = set(make_holdout(load_config(config).data, seed=1).val)
    from PIL import Image

    stripe = sum(int((np.asarray(Image.open(p.mask)) > 127).sum()) for p in find_pairs(root, "train")
                 if p.stem not in held)
    assert counted["num_images"] == 8 and counted["counts"][1] == stripe
    text = invoke("stats", config).output
    assert "data.val_fraction 0.2: 2 images held out for validation as fit holds them out" in text
