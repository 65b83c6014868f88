"""segtrain/planning/rules.py, encoding.py and resources.py (and plan.py, writer.py): each rule on a synthetic data set
built to trigger it; the chosen value and the fact in its reason. Every planned config must load with
segtrain.config.load_config."""

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image

from segtrain.config import load_config
from segtrain.errors import ConfigError
from segtrain.planning import resources, rules
from segtrain.planning.encoding import class_names, ignore_values, mask_encoding
from segtrain.planning.fingerprint import fingerprint
from segtrain.planning.plan import has_budget_key, make_plan
from segtrain.planning.raw import RawMasks
from segtrain.planning.units import parse_budget, parse_ignore, parse_memory
from segtrain.value_types import format_duration
from segtrain.planning.writer import flow, render, write_plan
from tests.helpers import write_pair

GB = 1024**3


# ---------------------------------------------------------------------------- synthetic data sets, one per rule


def _noise(rng, shape, low=30, high=220):
    return rng.integers(low, high, shape, dtype=np.uint8)


def stripes_0_255(root, n=4, size=64):
    """0/255 masks, 255 the minority (vertical stripes 3 px wide, about 14%)."""
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for x in (8, 28, 48):
            mask[:, x : x + 3] = 255
        write_pair(root, "train", f"a{i}", _noise(np.random.default_rng(i), (size, size, 3)), mask)
    return root


def soft_0_237(root, n=4, size=64):
    """EPFL-like soft masks: 0 and 237 at the two ends, a ramp of values between them at the stripes' edges."""
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[:, 20:34] = 237
        mask[:, 18:20] = rng.integers(1, 120, (size, 2))
        mask[:, 34:36] = rng.integers(120, 237, (size, 2))
        write_pair(root, "train", f"a{i}", _noise(rng, (size, size, 3)), mask)
    return root


def class_ids(root, n=4, size=64):
    """Masks of class ids 0, 1, 2 (0 dominant)."""
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[10:20, :] = 1
        mask[40:46, 10:30] = 2
        write_pair(root, "train", f"a{i}", _noise(np.random.default_rng(i), (size, size, 3)), mask)
    return root


def ids_with_void(root, n=3, size=64):
    """Class ids 0, 1, 2 and a 255 border band (void, as in Pascal VOC)."""
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[10:30, 10:30] = 1
        mask[40:50, 40:60] = 2
        mask[:2, :] = 255
        write_pair(root, "train", f"a{i}", _noise(np.random.default_rng(i), (size, size, 3)), mask)
    return root


def rare_0_255(root, n=10, size=128):
    """0/255 masks with a rare 255: one 12 x 12 blob in 2 of the 10 images (0.2% of pixels)."""
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        if i in (3, 7):
            mask[50:62, 60:72] = 255
        write_pair(root, "train", f"a{i:02d}", _noise(np.random.default_rng(i), (size, size, 3)), mask)
    return root


def balanced(root, n=4, size=64):
    """Half the pixels foreground, in every image."""
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[:, : size // 2] = 255
        write_pair(root, "train", f"a{i}", _noise(np.random.default_rng(i), (size, size, 3)), mask)
    return root


def colours(root, n=3, size=32):
    """RGB colour masks: black background, a red and a green class."""
    for i in range(n):
        mask = np.zeros((size, size, 3), np.uint8)
        mask[:10, :, 0] = 255
        mask[20:24, :, 1] = 255
        write_pair(root, "train", f"a{i}", _noise(np.random.default_rng(i), (size, size, 3)), mask)
    return root


def uint16_images(root, n=3, size=32):
    """16-bit grayscale images (values 0..4095, 12-bit data) with 0/255 masks."""
    for split in ("train",):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = np.random.default_rng(i).integers(0, 4096, (size, size), dtype=np.uint16)
            mask = np.zeros((size, size), np.uint8)
            mask[:, 10:16] = 255
            Image.fromarray(image).save(root / split / "images" / f"a{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"a{i}.png")
    return root


def narrow_images(root, n=3, size=32):
    """8-bit images whose values all lie in 100..130 (a sliver of 0..255)."""
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[:, 10:16] = 255
        write_pair(root, "train", f"a{i}", _noise(np.random.default_rng(i), (size, size), 100, 131), mask)
    return root


def large_objects(root, n=2, size=256):
    """Squares 121 px across: the bottleneck should see twice that."""
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[60:181, 60:181] = 255
        write_pair(root, "train", f"a{i}", _noise(np.random.default_rng(i), (size, size, 3)), mask)
    return root


def thin_lines(root, n=2, size=256):
    """Lines 3 px thick (vessels, cracks)."""
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for x in range(20, size, 40):
            mask[:, x : x + 3] = 255
        write_pair(root, "train", f"a{i}", _noise(np.random.default_rng(i), (size, size, 3)), mask)
    return root


def street(root, n=3, size=64):
    """Sky (class 0) in the top third, road (1) below, cars (2): no dominating background, an up and a down."""
    for i in range(n):
        mask = np.ones((size, size), np.uint8)
        mask[: size // 3] = 0
        mask[40:52, 8 + 10 * i : 30 + 10 * i] = 2
        write_pair(root, "train", f"a{i}", _noise(np.random.default_rng(i), (size, size, 3)), mask)
    return root


DATASETS = {f.__name__: f for f in (stripes_0_255, soft_0_237, class_ids, ids_with_void, rare_0_255, balanced,
                                     colours, uint16_images, narrow_images, large_objects, thin_lines, street)}


@pytest.fixture(scope="module")
def fps(tmp_path_factory):
    """The fingerprint of every synthetic data set, by name (read once for the module)."""
    base = tmp_path_factory.mktemp("planning")
    return {name: fingerprint(build(base / name), progress=False) for name, build in DATASETS.items()}


def _plan(fp, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("memory", 4 * GB)
    return make_plan(fp, **kwargs)


# ---------------------------------------------------------------------------- masks  (encoding.py)


def test_0_255_masks_threshold_127(fps):
    fp = fps["stripes_0_255"]
    assert fp.encoding.value.mode == "threshold" and fp.encoding.value.threshold == 127
    assert "0 (" in fp.encoding.reason and "255 (" in fp.encoding.reason and "> 127" in fp.encoding.reason
    assert fp.names.value == ["background", "foreground"]
    assert _plan(fp).value("data.mask") == {"threshold": 127}


def test_soft_masks_threshold_127(fps):
    fp = fps["soft_0_237"]
    assert fp.encoding.value.mode == "threshold" and fp.encoding.value.threshold == 127
    assert "0..237" in fp.encoding.reason and "soft" in fp.encoding.reason


def test_class_id_masks_are_identity(fps):
    fp = fps["class_ids"]
    assert fp.encoding.value.mode == "identity" and fp.encoding.value.num_classes == 3
    assert "0..2 are class ids" in fp.encoding.reason
    assert fp.names.value == ["class_0", "class_1", "class_2"]
    assert _plan(fp).value("data.mask") == {}


def test_two_values_with_a_minority_zero_map_zero_to_the_foreground():
    raw = RawMasks("values", 8, {0: 22, 255: 78}, 1)
    decision = mask_encoding(raw, [])
    assert decision.value.mode == "values" and decision.value.values == {0: 1, 255: 0}
    assert "0 (22.0%) is the minority" in decision.reason


def test_gaps_in_class_ids_are_renumbered_and_discrete_values_mapped():
    ids = mask_encoding(RawMasks("values", 8, {0: 50, 1: 30, 3: 20}, 1), [])
    assert ids.value.mode == "values" and ids.value.values == {0: 0, 1: 1, 3: 2}
    levels = mask_encoding(RawMasks("values", 8, {0: 50, 128: 30, 255: 20}, 1), [])
    assert levels.value.values == {0: 0, 128: 1, 255: 2} and "3 discrete mask values" in levels.reason
    assert class_names(levels.value).value == ["class_0", "class_128", "class_255"]


def test_a_rare_far_value_gets_a_void_note_but_stays_a_class():
    raw = RawMasks("values", 8, {0: 700, 20: 298, 200: 2}, 1)  # 200: 0.2% of pixels, 180 above the others
    decision = ignore_values(raw)
    assert decision.value == [] and len(decision.notes) == 1
    note = decision.notes[0]
    assert "value 200" in note and "void" in note and "--ignore 200" in note and "0.2%" in note


def test_no_void_note_when_ignoring_would_leave_one_class(fps):
    fp = fps["rare_0_255"]  # 0 and a rare 255 (0.2%): a rare foreground, or void; ignoring it leaves one class
    assert fp.ignore.value == [] and fp.ignore.notes == []
    assert fp.encoding.value.mode == "threshold"
    assert not any("--ignore 255" in n for n in _plan(fp).notes)


def test_255_beside_class_ids_is_ignored_as_void(fps):
    fp = fps["ids_with_void"]
    assert fp.ignore.value == [255]
    assert "255" in fp.ignore.reason and "looks like void" in fp.ignore.reason and "0..2" in fp.ignore.reason
    assert fp.encoding.value.mode == "identity" and fp.encoding.value.num_classes == 3
    assert fp.ignored_pixels == 3 * 2 * 64
    assert _plan(fp).value("data.mask") == {"ignore": [255]}


def test_ignore_option(tmp_path):
    fp = fingerprint(class_ids(tmp_path / "d"), ignore=[2], progress=False)
    assert fp.ignore.value == [2] and "--ignore 2" in fp.ignore.reason
    assert fp.encoding.value.num_classes == 2 and fp.classes[1].pixels == 4 * 10 * 64
    missing = ignore_values(RawMasks("values", 8, {0: 5, 1: 5}, 1), [7])
    assert missing.value == [7] and "no train mask holds" in missing.notes[0]
    with pytest.raises(ConfigError, match="colours"):
        ignore_values(RawMasks("colours", 8, {(0, 0, 0): 5, (9, 9, 9): 5}, 1), [255])


def test_colour_masks_make_a_palette(fps):
    fp = fps["colours"]
    encoding = fp.encoding.value
    assert encoding.mode == "palette" and encoding.colours == [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    assert "3 colours" in fp.encoding.reason and "palette" in fp.encoding.reason
    assert fp.names.value == ["class_000000", "class_ff0000", "class_00ff00"]
    palette = _plan(fp).value("data.mask")["palette"]
    assert palette == {"class_000000": [0, 0, 0], "class_ff0000": [255, 0, 0], "class_00ff00": [0, 255, 0]}


# ---------------------------------------------------------------------------- intensities


def test_16_bit_images_normalize_by_the_data_set(fps):
    decision = rules.normalize(fps["uint16_images"])
    assert decision.value == "dataset" and "uint16" in decision.reason


def test_narrow_intensities_normalize_by_the_data_set(fps):
    decision = rules.normalize(fps["narrow_images"])
    assert decision.value == "dataset" and "narrow" in decision.reason and "100..130" in decision.reason


def test_full_range_8_bit_images_keep_the_fixed_scale(fps):
    decision = rules.normalize(fps["stripes_0_255"])
    assert decision.value == "fixed" and "8-bit" in decision.reason


# ---------------------------------------------------------------------------- imbalance


def test_a_rare_class_gets_capped_weights_and_sampling(fps):
    fp = fps["rare_0_255"]
    strategy, cap = rules.class_weights(fp)
    assert strategy.value == "balanced" and "0.2%" in strategy.reason and "1:" in strategy.reason
    assert cap.value == 10 and "would weigh" in cap.reason
    plan = _plan(fp)
    crop = plan.value("data.crop")
    assert crop == 128  # the whole image: a random crop holds the class in the 2 images of 10 that have it
    sampling = plan["data.sampling"]
    assert sampling.value == {"foreground": 0.4}  # s + (1 - s) 0.2 >= 0.5 -> s = 0.375 -> 0.4
    assert "20.0% of random 128-px crops" in sampling.reason and "2/10 images" in sampling.reason


def test_balanced_classes_get_no_weights_and_no_sampling(fps):
    fp = fps["balanced"]
    strategy, cap = rules.class_weights(fp)
    assert strategy.value == "none" and "balanced enough" in strategy.reason and "50.0%" in strategy.reason
    assert cap.value is None
    sampling = rules.sampling(fp, 64)
    assert sampling.value == {} and "100.0% of random 64-px crops" in sampling.reason


def test_several_classes_weigh_by_median_frequency(fps):
    strategy, _ = rules.class_weights(fps["class_ids"])
    assert strategy.value == "median_frequency" and "class_2" in strategy.reason


# ---------------------------------------------------------------------------- sizes


def test_large_objects_make_a_deeper_network(fps):
    large, thin = rules.depth(fps["large_objects"]), rules.depth(fps["thin_lines"])
    assert large.value == 5 and "121 px wide" in large.reason and "284 px" in large.reason
    assert thin.value == 3 and "68 px" in thin.reason


def test_thin_objects_put_their_thickness_in_the_crop_comment(fps):
    decision = rules.crop(fps["thin_lines"], 3, "cpu")
    assert decision.value == 256 and "median image 256x256" in decision.reason
    assert "foreground 3 px thick" in decision.reason


def test_crop_is_a_multiple_of_2_to_the_depth_within_the_median_image(fps):
    fp = fps["soft_0_237"]  # 64 x 64 images
    assert rules.crop(fp, 3, "cpu").value == 64
    assert rules.crop(fps["large_objects"], 5, "gpu").value == 256
    assert rules.depth(fp).value == 3  # the median side spans 8 bottleneck pixels at most at depth 3


# ---------------------------------------------------------------------------- memory and device  (resources.py)


def test_activation_model_scales_with_pixels_and_filters():
    base = resources.activation_values(128, 4, 16, 3, 2)
    assert resources.activation_values(256, 4, 16, 3, 2) / base == pytest.approx(4, rel=0.01)
    assert resources.activation_values(128, 4, 32, 3, 2) / base == pytest.approx(2, rel=0.05)
    assert base == pytest.approx(30.5 * 16 * 128**2, rel=0.05)


def test_parameter_count_matches_build_unet():
    # keras count_params() of segtrain.model.build_unet(3, 1, depth, filters), printed by benchmarks/plan_memory.py
    assert resources.parameter_count(4, 16, 3, 2) == 1_945_521
    assert resources.parameter_count(4, 8, 3, 2) == 488_025
    assert resources.parameter_count(4, 32, 3, 2) == 7_768_929
    assert resources.parameter_count(2, 4, 3, 2) == 7_709


def test_forward_flops_and_receptive_field():
    # 3x3 convolutions 1.446e9 (18 C_in C_out A summed over the levels), transposed convolutions 0.070e9
    assert resources.forward_flops(128, 4, 16, 3, 2) == pytest.approx(1.516e9, rel=0.001)
    assert [resources.receptive_field(d) for d in (3, 4, 5)] == [68, 140, 284]


def test_cpu_memory_target_is_a_quarter_of_ram_capped(monkeypatch):
    monkeypatch.setattr(resources, "total_ram", lambda: 16 * GB)
    small = resources.memory_target("cpu")
    assert small.value == 4 * GB and "25% of 16.0 GB" in small.reason
    monkeypatch.setattr(resources, "total_ram", lambda: 64 * GB)
    assert resources.memory_target("cpu").value == 8 * GB
    given = resources.memory_target("gpu", 16 * GB)
    assert given.value == 16 * GB and "--memory 16.0 GB" in given.reason


def test_filters_and_batch_follow_device_and_memory(fps):
    fp = fps["large_objects"]  # 256 x 256, 3 channels, 2 classes
    _, filters, batch = rules.model_size(fp, 256, 5, "gpu", 16 * GB, 3600)
    assert filters.value == 32 and batch.value == 16 and "16 crops" in batch.reason and "16.0 GB" in batch.reason
    _, filters, batch = rules.model_size(fp, 256, 5, "cpu", 4 * GB, 7200)
    assert filters.value == 16 and batch.value == 4
    for budget in (600, 1800, 7199):
        _, filters, _ = rules.model_size(fp, 256, 5, "cpu", 4 * GB, budget)
        assert filters.value == 8 and "below 2 h" in filters.reason
    # little memory: a smaller batch, then a smaller crop, never below a batch of 2
    per_crop = resources.training_bytes(256, 5, 8, 3, 2, 1, "cpu")
    memory = resources.RUNTIME_BYTES["cpu"] + 3 * per_crop
    _, filters, batch = rules.model_size(fp, 256, 5, "cpu", memory, 600)
    assert (filters.value, batch.value) == (8, 3)  # the largest batch that fits, under the 4 aimed at
    crop, _, batch = rules.model_size(fp, 256, 5, "cpu", resources.RUNTIME_BYTES["cpu"] + per_crop, 600)
    assert crop.value == 160 and batch.value == 2 and "lowered from 256" in crop.reason
    with pytest.raises(ConfigError, match="--memory"):
        rules.model_size(fp, 256, 5, "cpu", resources.RUNTIME_BYTES["cpu"], 600)


def test_cache_moves_to_disk_when_the_data_is_large(fps):
    fp = fps["large_objects"]
    assert rules.cache(fp, 4 * GB).value == "memory"
    disk = rules.cache(fp, rules.cache_bytes(fp))
    assert disk.value == "disk" and "more than half" in disk.reason


# ---------------------------------------------------------------------------- loss and monitor


def test_loss_terms_and_include_background(fps):
    two = rules.loss_terms(fps["stripes_0_255"])
    assert [t["name"] for t in two.value] == ["cross_entropy", "jaccard"]
    several = rules.loss_terms(fps["street"])
    assert [t["name"] for t in several.value] == ["cross_entropy", "dice"] and "3 classes" in several.reason
    sky = rules.include_background(fps["street"])
    assert sky.value is True and "class_0 is 32.8%" in sky.reason
    dominating = rules.include_background(fps["class_ids"])
    assert dominating.value is False and "dominating background" in dominating.reason
    assert rules.include_background(fps["stripes_0_255"]).value is False


def test_monitor(fps):
    assert rules.monitor(fps["stripes_0_255"]).value == "val_iou_foreground"
    several = rules.monitor(fps["class_ids"])
    assert several.value == "val_mean_iou" and "class_2" in several.reason


# ---------------------------------------------------------------------------- budget


def test_augmentation_follows_the_budget_and_the_images_orientation(fps):
    fp = fps["stripes_0_255"]
    short = rules.augmentation(fp, 5 * 60)
    assert short.value == {"flip": False, "rotate90": False} and "5 min" in short.reason
    assert rules.augmentation(fp, 20 * 60).value == {"flip": True, "rotate90": True}
    long = rules.augmentation(fp, 2 * 3600)
    assert long.value["scale"] == [0.8, 1.25] and long.value["rotate"] == 15 and long.value["flip"] is True
    oriented = rules.augmentation(fps["street"], 20 * 60)
    assert oriented.value == {"flip": False, "rotate90": False}
    assert "class_0 sits high" in oriented.reason


def test_schedule_fills_the_budget(fps):
    fp = fps["stripes_0_255"]  # 4 images: a pass is 1 step
    epochs, steps = rules.schedule(fp, 64, 3, 8, 4, "cpu", 20 * 60)
    assert epochs.value == rules.MAX_EPOCHS and steps.value > 1 and "20 min at" in epochs.reason
    epochs, steps = rules.schedule(fps["large_objects"], 256, 5, 16, 4, "cpu", 1)
    assert epochs.value == 1 and steps.value >= 1
    rate = resources.images_per_second(64, 3, 8, 3, 2, "cpu")
    assert f"{rate:.1f} crops/s" in rules.schedule(fp, 64, 3, 8, 4, "cpu", 20 * 60)[0].reason


def test_learning_rate_scales_with_the_batch():
    assert rules.learning_rate(8).value == 0.003
    assert rules.learning_rate(4).value == 0.002 and "sqrt(4/8)" in rules.learning_rate(4).reason
    assert rules.learning_rate(32).value == 0.006


def test_no_val_split_holds_out_a_fifth(fps):
    fp = fps["stripes_0_255"]
    assert rules.val_split(fp).value is None
    decision = rules.val_fraction(fp)
    held = int(math.floor(decision.value * fp.pairs + 0.5))
    assert decision.notes[0].startswith(f"no val/ split found: fit holds out {held} of the {fp.pairs} train/ images")
    assert decision.value == (0.2 if fp.pairs >= 3 else 0.5)


@pytest.mark.parametrize("pairs, share, held", [(1, None, 0), (2, 0.5, 1), (3, 0.2, 1), (4, 0.2, 1), (10, 0.2, 2),
                                                (101, 0.2, 20)])
def test_val_fraction_holds_out_at_least_one_image(fps, pairs, share, held):
    fp = dataclasses.replace(fps["stripes_0_255"], pairs=pairs)
    decision = rules.val_fraction(fp)
    assert decision.value == share
    if share is not None:
        assert int(math.floor(share * pairs + 0.5)) == held  # the rule stratified_holdout applies
    else:
        assert "1 training image" in decision.notes[0]


# ---------------------------------------------------------------------------- the written config


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_planned_config_loads(fps, tmp_path, name):
    plan = _plan(fps[name])
    path = tmp_path / "configs" / f"{name}.yaml"
    text = write_plan(plan, path)
    assert "root: ../../" in text  # relative to the config's folder
    config = load_config(path)
    assert config.data.root == fps[name].root
    assert config.data.classes == plan.value("data.classes")
    assert config.data.crop == plan.value("data.crop") and config.model.depth == plan.value("model.depth")
    if has_budget_key():
        assert config.train.budget == "20m"
    else:
        assert config.train.epochs == plan.value("train.epochs")
    for line in text.splitlines():  # every value line carries its reason
        if ":" in line and not line.startswith("#") and not line.rstrip().endswith(":") \
                and not line.strip().startswith("- {name: cross_entropy"):
            assert " # " in line, line
    if config.data.val_fraction is not None:
        assert "no val/ split found: fit holds out" in text


def test_flow_values():
    assert flow({0: 1, 255: 0}) == "{0: 1, 255: 0}"
    assert flow([0.8, 1.25]) == "[0.8, 1.25]"
    assert flow({"flip": True, "rotate": 15}) == "{flip: true, rotate: 15}"
    assert flow(0.002) == "0.002" and flow(1.0) == "1.0" and flow(None) == "null"
    assert flow("../data/roads") == "../data/roads" and flow("true") == '"true"' and flow("0.5") == '"0.5"'


def test_rendered_text_reads_back_as_the_plan(fps):
    import yaml

    plan = _plan(fps["street"])
    assert yaml.safe_load(render(plan))["data"] == {**plan.to_dict()["data"], "root": fps["street"].root}


def test_units():
    assert parse_budget("20m") == 1200 and parse_budget("1h30m") == 5400 and parse_budget("90s") == 90
    assert parse_budget("45") == 2700 and parse_budget("1.5h") == 5400
    for bad in ("20x", "m", "30m1h", "0m"):
        with pytest.raises(ValueError):
            parse_budget(bad)
    assert format_duration(5400) == "1h30m" and format_duration(90) == "1m30s" and format_duration(1200) == "20m"
    assert parse_memory("16GB") == 16 * GB and parse_memory("512MB") == 512 * 1024**2 and parse_memory("2") == 2 * GB
    with pytest.raises(ValueError):
        parse_memory("lots")
    assert parse_ignore("255") == 255 and parse_ignore("224,224,192") == [224, 224, 192]
    with pytest.raises(ValueError):
        parse_ignore("1,2")


def test_without_a_budget_key_the_plan_writes_epochs(fps, tmp_path, monkeypatch):
    import segtrain.planning.plan as plan_module

    monkeypatch.setattr(plan_module, "has_budget_key", lambda: False)
    plan = _plan(fps["stripes_0_255"])
    assert "train.budget" not in plan.entries
    path = tmp_path / "c.yaml"
    text = write_plan(plan, path)
    config = load_config(path)
    assert config.train.epochs == plan.value("train.epochs") == rules.MAX_EPOCHS
    assert config.train.steps_per_epoch == plan.value("train.steps_per_epoch")
    assert "crops/s" in text.split("epochs:", 1)[1].splitlines()[0]  # the time model's facts in the comment


def test_budget_rule_keeps_the_budget_and_gives_the_estimate(fps):
    epochs, _ = rules.schedule(fps["stripes_0_255"], 64, 3, 8, 4, "cpu", 90 * 60)
    decision = rules.budget(90 * 60, epochs)
    assert decision.value == "1h30m" and "planner's estimate: 90 min at" in decision.reason


# ---------------------------------------------------------------------------- a pretrained encoder


def test_an_encoder_only_for_colour_photographs(fps):
    gray = fps["stripes_0_255"]
    grey_rgb = dataclasses.replace(gray, channels=3, intensity={**gray.intensity, "mean": [90.0, 90.5, 91.0]})
    assert not rules.natural_colour(grey_rgb)  # a grayscale image saved as RGB: spread 1.0 <= 2
    decision = rules.encoder(grey_rgb, "cpu", cached=lambda name: True)
    assert decision.value == "none" and "not colour photographs" in decision.reason


def test_the_preferred_cached_encoder_is_proposed(fps):
    base = fps["stripes_0_255"]
    photo = dataclasses.replace(base, channels=3, intensity={**base.intensity, "mean": [120.0, 100.0, 80.0]})
    assert rules.encoder(photo, "cpu", cached=lambda name: name in ("resnet50", "efficientnetv2b0")).value == \
        "efficientnetv2b0"  # the CPU's order: mobilenetv3large (absent), then efficientnetv2b0
    assert rules.encoder(photo, "gpu", cached=lambda name: name in ("resnet50", "efficientnetv2b0")).value == "resnet50"
    missing = rules.encoder(photo, "cpu", cached=lambda name: False)
    assert missing.value == "none"
    assert "place weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5 in" in missing.notes[0]


def test_a_cached_encoder_reaches_the_config(fps, tmp_path, monkeypatch):
    from segtrain.encoders.catalog import BACKBONES

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras" / "models").mkdir(parents=True)
    (tmp_path / "keras" / "models" / BACKBONES["mobilenetv3large"].imagenet_file).write_bytes(b"weights")
    base = fps["stripes_0_255"]
    photo = dataclasses.replace(base, channels=3, intensity={**base.intensity, "mean": [120.0, 100.0, 80.0]})
    path = tmp_path / "photo.yaml"
    write_plan(_plan(photo), path)
    config = load_config(path)
    assert config.model.encoder == "mobilenetv3large" and config.model.encoder_weights == "imagenet"
    assert config.data.crop % 32 == 0
    assert "mobilenetv3large's ImageNet weights in Keras's cache" in path.read_text()
