"""The plan's rules: one small named function per config setting, over the fingerprint of a data set.

Every rule takes the fingerprint (`segtrain.planning.fingerprint.Fingerprint`) and, where they matter, the device,
the memory target and the time budget (the model of `resources.py`), and returns a `Decision`
(`segtrain.planning.encoding`): the value that goes into the config and the fact it came from (`reason`, the value's
one-line comment), plus `notes` for things the user should look at. The mask rules (which raw values are which
classes) sit in `encoding.py`, the device, memory and time model in `resources.py`. The README's "Planning a config"
table lists them all (fact -> setting -> why).
"""

from __future__ import annotations

import math

import numpy as np

from segtrain.errors import ConfigError
from segtrain.planning.encoding import Decision, pct
from segtrain.planning.fingerprint import Fingerprint
from segtrain.planning.resources import (RUNTIME_BYTES, TILE_OVERHEAD, device_flops, format_bytes, forward_flops,
                                         images_per_second, receptive_field, training_bytes)
from segtrain.value_types import format_duration


NARROW_RANGE = 0.25 * 255
"""`normalize: dataset` when a channel's 0.5..99.5 percentile range is narrower than this (a quarter of 0..255)."""


def normalize(fp: Fingerprint) -> Decision:
    """`dataset` when the images have more than 8 bits per sample (read on a fixed scale, their values may use a
    sliver of it) or a channel's 0.5..99.5 percentile range covers under a quarter of 0..255; else `fixed`."""
    low, high = np.asarray(fp.intensity["low"]), np.asarray(fp.intensity["high"])
    span = high - low
    narrowest = int(np.argmin(span))
    channel = f" (channel {narrowest})" if len(span) > 1 else ""
    facts = f"p0.5..p99.5 = {low[narrowest]:.0f}..{high[narrowest]:.0f} of 0..255{channel}"
    if fp.sample_type != "uint8":
        return Decision("dataset", f"{fp.sample_type} images, more than 8 bits; {facts}")
    if span[narrowest] < NARROW_RANGE:
        return Decision("dataset", f"narrow intensities: {facts}, under a quarter of the scale")
    return Decision("fixed", f"8-bit images, {facts}")


MIN_DEPTH, MAX_DEPTH = 3, 5
CONTEXT = 2.0
"""The bottleneck's receptive field should be at least CONTEXT x the width of the large objects: the object and as
much around it (a network's effective field is a fraction of its theoretical one)."""


def _context_class(fp: Fingerprint):
    """The foreground class with the widest large objects (area-weighted p90 width)."""
    present = [c for c in fp.foreground if c.pixels] or fp.classes
    return max(present, key=lambda c: c.width_p90)


def depth(fp: Fingerprint) -> Decision:
    """Down-sampling steps: the smallest depth in 3..5 whose bottleneck sees (`receptive_field`) at least twice the
    width of the widest foreground class's large objects (90% of its pixels lie in objects at most that wide), capped
    so that the median image still spans 8 bottleneck pixels."""
    widest = _context_class(fp)
    need = CONTEXT * widest.width_p90
    chosen = next((d for d in range(MIN_DEPTH, MAX_DEPTH + 1) if receptive_field(d) >= need), MAX_DEPTH)
    while chosen > MIN_DEPTH and fp.median_side < 8 * 2**chosen:
        chosen -= 1
    fact = (f"{widest.name} objects up to {widest.width_p90:.0f} px wide (p90 by area); the bottleneck sees "
            f"{receptive_field(chosen)} px")
    if receptive_field(chosen) < need:
        fact += f" (< {need:.0f}: depth {chosen} is the largest planned)"
    return Decision(chosen, fact)


CROP_CAP = {"cpu": 256, "gpu": 512}
"""Largest planned crop: CPU steps are slow, so more, smaller crops per minute."""


def crop(fp: Fingerprint, depth_value: int, device_name: str) -> Decision:
    """The training crop: the smaller side of the median image, at most 256 px on the CPU (512 on a GPU), rounded
    down to a multiple of 2**depth (the model's requirement); `model_size` may lower it to fit memory."""
    step = 2**depth_value
    cap = min(fp.median_side, CROP_CAP[device_name])
    value = max(step, cap // step * step)
    thin = min((c for c in fp.foreground if c.pixels), key=lambda c: c.thickness_median, default=None)
    fact = f"median image {fp.median_width}x{fp.median_height}"
    if thin is not None:
        low, high = round(thin.thickness_median), round(thin.thickness_p95)
        fact += f"; {thin.name} {low}{'' if high == low else f'-{high}'} px thick"
    if fp.median_side > CROP_CAP[device_name]:
        fact += f"; at most {CROP_CAP[device_name]} on the {device_name.upper()}"
    return Decision(value, fact)


DECODED_BYTES = 4
"""data.cache memory keeps float32 images and int32 masks."""
CACHE_SHARE = 0.5


def cache_bytes(fp: Fingerprint) -> int:
    """Bytes of the decoded train and val splits in `data.cache: memory` (float32 image + int32 mask per pixel)."""
    return int((fp.train_pixels + fp.val_pixel_count) * (fp.channels + 1) * DECODED_BYTES)


def cache(fp: Fingerprint, host_memory: int, device_name: str = "cpu") -> Decision:
    """`memory` when the decoded train and val images take at most half the host's memory target (the CPU's, also
    when training on a GPU: the cache lives in RAM), else `disk` (a cache file in the run folder, read every epoch)."""
    size = cache_bytes(fp)
    target = f"{format_bytes(host_memory)} {'RAM ' if device_name == 'gpu' else ''}target"
    fact = f"decoded train+val images {format_bytes(size)}"
    if size <= CACHE_SHARE * host_memory:
        return Decision("memory", f"{fact}, within half the {target}")
    return Decision("disk", f"{fact}, more than half the {target}")


FILTER_CHOICES = {"gpu": (32, 16, 8), "cpu": (16, 8)}
CPU_WIDE_BUDGET = 2 * 60 * 60
"""On the CPU, 16 base filters only from a 2-hour budget: a step costs ~3x that of 8 filters, and at 30 minutes on
two cores 8 filters with 3x the steps won on both binary sets tried (docs/BENCHMARKS.md, plan_vs_hand.py)."""
BATCH_PIXELS = {"cpu": 2**18, "gpu": 2**20}
"""Pixels per batch aimed at: 4 crops of 256 px on the CPU, 16 on a GPU."""
MIN_BATCH = 2


def batch_target(crop_value: int, device_name: str) -> int:
    """A power of two near BATCH_PIXELS / crop**2, in 2..32."""
    ideal = BATCH_PIXELS[device_name] / (crop_value * crop_value)
    return int(min(32, max(MIN_BATCH, 2 ** round(math.log2(max(ideal, 1))))))


def model_size(fp: Fingerprint, crop_value: int, depth_value: int, device_name: str, memory: int,
               budget_seconds: float, cache_memory: int = 0) -> tuple[Decision, Decision, Decision]:
    """(crop, base_filters, batch_size) that fit the memory target.

    Memory for the step = target - runtime (`RUNTIME_BYTES`) - the data cache when it shares the memory (CPU).
    Base filters: the widest of 32/16/8 on a GPU (16/8 on the CPU, 8 under a 2-hour budget) whose training step
    (`training_bytes`) fits the batch aimed at (`batch_target`); else the widest that fits a batch of 2, with the
    largest batch that fits; else the crop shrinks by 2**depth until a batch of 2 at 8 filters fits.
    """
    classes, channels = len(fp.classes), fp.channels
    available = memory - RUNTIME_BYTES[device_name] - (cache_memory if device_name == "cpu" else 0)
    choices = FILTER_CHOICES[device_name]
    if device_name == "cpu" and budget_seconds < CPU_WIDE_BUDGET:
        choices = tuple(f for f in choices if f <= 8)
    step = 2**depth_value
    value = crop_value
    while True:
        target = batch_target(value, device_name)

        def fits(filters: int, batch: int) -> bool:
            return training_bytes(value, depth_value, filters, channels, classes, batch, device_name) <= available

        chosen = next(((f, target) for f in choices if fits(f, target)), None)
        if chosen is None:
            for f in choices:
                largest = max((b for b in range(MIN_BATCH, target) if fits(f, b)), default=None)
                if largest is not None:
                    chosen = (f, largest)
                    break
        if chosen is not None or value <= step:
            break
        value -= step
    if chosen is None:
        raise ConfigError(f"the memory target {format_bytes(memory)} leaves {format_bytes(max(available, 0))} for "
                          f"training, too little for a batch of 2 crops of {value} px; pass a larger --memory.")
    filters, batch = chosen
    per_image = training_bytes(value, depth_value, filters, channels, classes, 1, device_name)
    used = training_bytes(value, depth_value, filters, channels, classes, batch, device_name)
    crop_decision = None
    if value != crop_value:
        crop_decision = f"lowered from {crop_value} to fit a batch of {batch} in memory"
    why = {"cpu": f"CPU, {budget_seconds / 60:.0f} min budget" + ("" if budget_seconds >= CPU_WIDE_BUDGET
                                                                   else ": 8 below 2 h"),
           "gpu": "GPU: widest of 32/16/8 that fits"}[device_name]
    filters_decision = Decision(filters, f"{why}; {format_bytes(per_image)} per {value}-px crop in training")
    batch_decision = Decision(batch, f"{batch} crops: {format_bytes(used)} of the {format_bytes(max(available, 0))} "
                                     f"left for training ({format_bytes(memory)} target)")
    return Decision(value, crop_decision or ""), filters_decision, batch_decision


# ---------------------------------------------------------------------------- loss


def loss_terms(fp: Fingerprint) -> Decision:
    """cross_entropy (weight 1) + an overlap term (weight 0.5): jaccard for two classes (it optimises the IoU the
    run is judged and monitored by), dice for several (its per-class gradient is gentler on the rare classes)."""
    k = len(fp.classes)
    overlap = "jaccard" if k == 2 else "dice"
    terms = [{"name": "cross_entropy", "weight": 1.0}, {"name": overlap, "weight": 0.5}]
    why = ("two classes: soft IoU, the metric monitored" if k == 2
           else f"{k} classes: Dice averages the classes, so the rare ones count")
    return Decision(terms, f"per-pixel cross-entropy + 0.5 {overlap} ({why})")


def include_background(fp: Fingerprint) -> Decision:
    """true when there are 3 or more classes and class 0 is no dominating background (under half the pixels and
    under twice the next largest class): it is then a real class (CamVid's sky); else false (the overlap term scores
    the foreground, as nnU-Net does)."""
    first = fp.classes[0]
    others = max(c.share for c in fp.classes[1:])
    if len(fp.classes) >= 3 and first.share < 0.5 and first.share < 2 * others:
        return Decision(True, f"{first.name} is {pct(first.share)} of pixels, no dominating background: score it")
    if len(fp.classes) == 2:
        return Decision(False, f"two classes: score the foreground only ({first.name} is {pct(first.share)})")
    return Decision(False, f"{first.name} is a dominating background ({pct(first.share)} of pixels)")


BALANCED_RATIO = 0.2
"""No class weights when the rarest class has at least this share of the most frequent one's pixels."""
WEIGHT_CAP = {2: 10, "several": 20}


def _rarest(fp: Fingerprint):
    present = [c for c in fp.foreground if c.pixels] or [c for c in fp.classes if c.pixels]
    return min(present, key=lambda c: c.share)


def class_weights(fp: Fingerprint) -> tuple[Decision, Decision]:
    """(loss.class_weights, loss.max_weight) from the imbalance ratio rarest / most frequent class:
    `none` at 0.2 or more; else `balanced` for two classes, `median_frequency` for several (it ignores the images a
    class is absent from, as CamVid's SegNet did), capped at 10 (two classes) or 20 when a weight would exceed it:
    larger weights make the arg-max over-predict the rare class."""
    from segtrain.class_weights import compute_class_weights

    present = [c for c in fp.classes if c.pixels]
    rare, common = min(present, key=lambda c: c.share), max(present, key=lambda c: c.share)
    ratio = rare.share / common.share
    fact = f"rarest {rare.name} {pct(rare.share)} vs {common.name} {pct(common.share)} (1:{1 / ratio:.0f})"
    if ratio >= BALANCED_RATIO:
        return Decision("none", f"balanced enough: {fact}"), Decision(None, "")
    strategy = "balanced" if len(fp.classes) == 2 else "median_frequency"
    counts = np.array([c.pixels for c in fp.classes])
    image_pixels = np.array([c.image_pixels for c in fp.classes])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = compute_class_weights(strategy, counts, image_pixels)
    top = int(np.argmax(weights))
    cap = WEIGHT_CAP[2] if len(fp.classes) == 2 else WEIGHT_CAP["several"]
    strategy_decision = Decision(strategy, f"imbalanced: {fact}")
    if weights[top] > cap:
        return strategy_decision, Decision(cap, f"uncapped, {fp.classes[top].name} would weigh {weights[top]:.0f}")
    return strategy_decision, Decision(None, f"no cap: the largest weight is {weights[top]:.1f} "
                                             f"({fp.classes[top].name}), under {cap}")


PRESENCE_TARGET = 0.5
"""Class-aware sampling when a foreground class is in fewer than half of the random crops."""


def sampling(fp: Fingerprint, crop_value: int) -> Decision:
    """`data.sampling`: for each foreground class that a uniform random crop holds less than half the time
    (`ClassStats.crop_presence_at`: measured per image for every crop position, so it reflects both how many images
    hold the class and how many objects they hold), the share s of crops to centre on it so that
    s + (1 - s) P >= 0.5, rounded up to a tenth, at least 0.1; shares scaled to sum to at most 0.5."""
    shares, facts = {}, []
    for c in fp.foreground:
        if not c.pixels:
            continue
        p = c.crop_presence_at(crop_value)
        if p < PRESENCE_TARGET:
            share = max(0.1, math.ceil(10 * (PRESENCE_TARGET - p) / (1 - p) - 1e-9) / 10)
            shares[c.name] = share
            facts.append(f"{c.name} in {pct(p)} of random {crop_value}-px crops ({c.images}/{fp.pairs} images)")
    if not shares:
        rare = _rarest(fp)
        return Decision({}, f"uniform crops: even the rarest, {rare.name}, is in "
                            f"{pct(rare.crop_presence_at(crop_value))} of random {crop_value}-px crops")
    total = sum(shares.values())
    if total > 0.5:
        shares = {name: round(0.5 * s / total, 2) for name, s in shares.items()}
    return Decision(shares, "; ".join(facts[:3]) + ("; ..." if len(facts) > 3 else ""))


# ---------------------------------------------------------------------------- budget: augmentation, schedule


SHORT_BUDGET = 10 * 60
LONG_BUDGET = 60 * 60
ORIENTED_ROW = 0.15
"""A class (>= 5% of pixels) whose mean row is this far from the middle gives the images an up and a down."""


def augmentation(fp: Fingerprint, budget_seconds: float) -> Decision:
    """data.augment: off under 10 minutes (too few steps to need it); flips and 90-degree turns (segtrain's defaults)
    up to an hour, plus scale [0.8, 1.25] and rotate 15 from an hour on. Flips and turns stay off when a class sits
    at the top or bottom of the images (mean row < 0.35 or > 0.65: street scenes, where sky is up)."""
    minutes = budget_seconds / 60
    oriented = [c for c in fp.classes if c.share >= 0.05 and abs(c.mean_row - 0.5) > ORIENTED_ROW]
    flips = not oriented
    why_flips = ""
    if oriented:
        c = max(oriented, key=lambda c: abs(c.mean_row - 0.5))
        why_flips = (f"no flips or 90-degree turns: {c.name} sits {'high' if c.mean_row < 0.5 else 'low'} "
                     f"(mean row {c.mean_row:.2f}), the images have an up")
    if budget_seconds < SHORT_BUDGET:
        return Decision({"flip": False, "rotate90": False}, f"{minutes:g} min budget: too short to need augmentation")
    value = {"flip": flips, "rotate90": flips}
    if budget_seconds < LONG_BUDGET:
        return Decision(value, f"{minutes:g} min budget: " + (why_flips or "flips and 90-degree turns (the defaults)"))
    value.update({"scale": [0.8, 1.25], "rotate": 15})
    return Decision(value, f"{minutes:g} min budget: scale and rotation" + (f"; {why_flips}" if why_flips else
                                                                             ", flips and 90-degree turns"))


MAX_EPOCHS = 40
RESERVE = 0.9
"""Share of the budget for the epochs; the rest is start-up, the final evaluation and calibration."""


def schedule(fp: Fingerprint, crop_value: int, depth_value: int, filters: int, batch: int, device_name: str,
             budget_seconds: float) -> tuple[Decision, Decision]:
    """(train.epochs, train.steps_per_epoch) that fill 90% of the budget, from the time model: training crops per
    second (`images_per_second`) and the validation pass of each epoch (the val split's pixels through
    `forward_flops`, x `TILE_OVERHEAD`). One epoch is a pass over the training images (steps_per_epoch null) unless
    that gives more than 40 epochs (longer epochs, fewer validations) or less than one (a shorter epoch)."""
    classes, channels = len(fp.classes), fp.channels
    rate = images_per_second(crop_value, depth_value, filters, channels, classes, device_name)
    per_pixel = forward_flops(crop_value, depth_value, filters, channels, classes) / crop_value**2
    val_seconds = fp.val_pixel_count * per_pixel * TILE_OVERHEAD / device_flops(device_name)
    usable = RESERVE * budget_seconds
    natural = math.ceil(fp.pairs / batch)
    epoch_seconds = natural * batch / rate + val_seconds
    epochs = int(usable // epoch_seconds)
    steps = None
    if epochs > MAX_EPOCHS:
        epochs = MAX_EPOCHS
        steps = max(natural, int((usable / MAX_EPOCHS - val_seconds) * rate / batch))
    elif epochs < 1:
        epochs = 1
        steps = max(1, int((usable - val_seconds) * rate / batch))
    source = "assumed" if device_name == "gpu" else "low end measured"
    fact = (f"{budget_seconds / 60:g} min at ~{rate:.1f} crops/s ({device_name.upper()} "
            f"{device_flops(device_name) / 1e9:.0f} GFLOP/s, {source}; "
            f"{3 * forward_flops(crop_value, depth_value, filters, channels, classes) / 1e9:.1f} GFLOP per crop): "
            f"{epochs} x {steps or natural} steps")
    steps_fact = (f"{steps} steps of {batch} (a pass over the {fp.pairs} images is {natural})" if steps else
                  f"one pass over the {fp.pairs} training images ({natural} steps)")
    return Decision(epochs, fact), Decision(steps, steps_fact)


def budget(budget_seconds: float, epochs: Decision) -> Decision:
    """`train.budget` (when this segtrain has it): the --budget itself; `fit` measures its own step time and plans
    steps and epochs to end within it. The comment gives the planner's own estimate (`schedule`)."""
    return Decision(format_duration(budget_seconds), f"fit times its steps and plans the epochs to end within it; "
                                                     f"planner's estimate: {epochs.reason}")


def learning_rate(batch: int) -> Decision:
    """Adam at 3e-3 for a batch of 8 (the shipped configs), scaled by sqrt(batch / 8), one significant digit."""
    rate = 0.003 * math.sqrt(batch / 8)
    rounded = float(f"{rate:.1g}")
    return Decision(rounded, f"Adam 0.003 at batch 8, x sqrt({batch}/8)")


def warmup(epochs: int, estimated: bool = False) -> Decision:
    """One warm-up epoch from 10 epochs on (Adam's first steps with BatchNorm's fresh statistics), else none."""
    count = f"~{epochs} epochs (planner's estimate)" if estimated else f"{epochs} epochs"
    if epochs >= 10:
        return Decision(1, f"{count}: one to warm up")
    return Decision(0, f"{count}: no room for a warm-up")


def monitor(fp: Fingerprint) -> Decision:
    """best.keras by the IoU of the foreground for two classes; for several, by the mean IoU (the rarest class's IoU
    alone swings from epoch to epoch and would trade every other class for it)."""
    if len(fp.classes) == 2:
        fg = fp.classes[1]
        return Decision(f"val_iou_{fg.name}", f"the IoU of the foreground ({pct(fg.share)} of pixels)")
    rare = _rarest(fp)
    return Decision("val_mean_iou", f"{len(fp.classes)} classes: the mean IoU (the rarest, {rare.name}, alone "
                                    "would be noisy)")


def val_split(fp: Fingerprint) -> Decision:
    """The val split when ROOT/val holds pairs (else None: see val_fraction)."""
    if fp.val_split:
        return Decision(fp.val_split, f"{fp.val_pairs} val pairs")
    return Decision(None, "")


VAL_SHARE = 0.2
"""The share of a train-only data set held out for validation: one fold of five, as nnU-Net's cross-validation."""


def val_fraction(fp: Fingerprint) -> Decision:
    """No val/ split: hold out a fifth of train/ (fit records which images: split.json), at least one image; a
    single image cannot be split (a note)."""
    if fp.val_split:
        return Decision(None, "")
    n = fp.pairs
    if n < 2:
        return Decision(None, "", [f"no val/ split found and {n} training image: add images, or create "
                                   f"{fp.root}/val/{{images,masks}}; `segtrain fit` validates every epoch."])
    share = VAL_SHARE if n * VAL_SHARE >= 0.5 else math.ceil(1000 / n) / 1000
    held = int(math.floor(share * n + 0.5))
    return Decision(share, f"no val/ split: {held} of {n} train images held out (seeded, stratified by rarest class)",
                    [f"no val/ split found: fit holds out {held} of the {n} train/ images to validate on "
                     "(data.val_fraction; recorded in the run's split.json, which eval, calibrate and tune read)."])


ENCODER_PREFERENCE = {"cpu": ("mobilenetv3large", "efficientnetv2b0", "mobilenetv3small", "resnet50", "convnexttiny"),
                      "gpu": ("convnexttiny", "resnet50", "efficientnetv2b0", "mobilenetv3large", "mobilenetv3small")}
"""The backbones the plan proposes, best first: the light ones on the CPU, the strong ones on a GPU."""
COLOUR_SPREAD = 2.0
"""Channel means further apart than this (0..255) mark colour images; a grayscale image saved as RGB has none."""


def natural_colour(fp: Fingerprint) -> bool:
    """3-channel 8-bit colour images: what ImageNet backbones were trained on."""
    means = list(fp.intensity.get("mean", []))
    spread = max(means) - min(means) if len(means) == 3 else 0.0
    return fp.channels == 3 and fp.sample_type == "uint8" and spread > COLOUR_SPREAD


def encoder(fp: Fingerprint, device_name: str, cached=None) -> Decision:
    """A pretrained encoder for 3-channel colour photographs when ImageNet weights are in Keras's cache (the first in
    ENCODER_PREFERENCE), else none with a note saying which file would enable it. `cached(name)`: whether a
    backbone's weights are there (default: the file in Keras's cache folder)."""
    from segtrain.encoders.catalog import BACKBONES
    from segtrain.encoders.weights import imagenet_cached, keras_cache_dir

    if not natural_colour(fp):
        return Decision("none", f"{fp.channels}-channel {fp.sample_type} images, not colour photographs: the plain "
                                "U-Net")
    folder = keras_cache_dir() / "models"
    cached = cached or imagenet_cached
    order = ENCODER_PREFERENCE[device_name]
    for name in order:
        if cached(name):
            return Decision(name, f"colour photographs and {name}'s ImageNet weights in Keras's cache")
    first = BACKBONES[order[0]]
    return Decision("none", "colour photographs, but no ImageNet weights in Keras's cache",
                    [f"a pretrained encoder would suit these colour photographs: place {first.imagenet_file} in "
                     f"{folder} (from {first.imagenet_url}) and plan again, or set model.encoder: {order[0]} "
                     "and model.encoder_weights: imagenet on a machine that can download it."])
