"""Class weights from the whole training set: a streaming pixel counter and the strategies.

Strategies (p_c = pixels of c / all valid pixels, K classes):
```
none                     w_c = 1
balanced                 w_c = 1 / (K * p_c)          (= n / (K * count_c))
inverse_frequency        w_c = 1 / p_c
inverse_sqrt_frequency   w_c = 1 / sqrt(p_c)
median_frequency         w_c = median(f) / f_c,  f_c = count_c / pixels of images holding c
log                      w_c = 1 / ln(1.02 + p_c)     (ENet)
explicit [w_0, ...]      w_c as given
```
Every strategy is then scaled so that `sum_c p_c * w_c = 1`: the weighted loss keeps the
scale of the unweighted one (balanced and inverse_frequency therefore coincide once scaled).

Cap (`max_weight` M >= 1): the final weights satisfy both `w_c <= M` and
`sum_c p_c w_c = 1`: classes whose scaled weight would exceed M are set to M and the other
classes are rescaled so the invariant holds (repeated until no weight exceeds M). M must be
>= 1 because the weights average to 1.

Classes absent from the training set (count 0) take no part in `sum_c p_c w_c` and raise
a warning. A strategy has no weight for them (it needs their frequency), so they get 1.0,
the average weight. An explicit list does give one: it is scaled by the same factor as the
other classes (with a cap, the factor of the uncapped classes, then capped like them), so
the list's ratios hold for every class it names: `[1, 10, 5]` on counts `[900, 100, 0]`
gives `[1, 10, 5] / 1.9`. (The weight of an absent class still matters: in the validation
loss and in region losses, which also count false positives of the class.)
"""

import math
import warnings

import numpy as np

from segtrain.errors import ConfigError, DataError
from segtrain.labels import IGNORE_INDEX

STRATEGIES = (
    "none",
    "balanced",
    "inverse_frequency",
    "inverse_sqrt_frequency",
    "median_frequency",
    "log",
)


class ClassCounter:
    """Streaming per-class pixel counts; memory is O(K) whatever the data size.

    Attributes:
        counts: pixels of each class (int64, K).
        image_pixels: for each class, the total valid pixels of the images holding it.
        num_images: images seen.
    """

    def __init__(self, num_classes, locations=None):
        self.num_classes = int(num_classes)
        self.counts = np.zeros(self.num_classes, np.int64)
        self.image_pixels = np.zeros(self.num_classes, np.int64)
        self.num_images = 0
        self.locations = locations
        """Optional `segtrain.data.sampling.ClassLocations` fed the same masks (class-aware sampling)."""
        self.pixels = None
        """Optional `segtrain.data.normalization.PixelSampler` fed the images' pixel samples by the statistics
        pass (data.normalize: dataset); its statistics go into `class_stats_dict`'s "normalization"."""
        self.warnings: list[str] = []
        """Messages about the data from the pass that filled the counter (`segtrain.data.scan.scan_training_set`);
        `class_stats_dict` adds them to its "warnings"."""

    def update(self, mask):
        """Add one image's mask of class indices (IGNORE_INDEX pixels are skipped)."""
        mask = np.asarray(mask)
        if mask.dtype.kind == "f":
            mask = np.rint(mask)
        values = mask.astype(np.int64).ravel()
        values = values[values != IGNORE_INDEX]
        if values.size and (values.min() < 0 or values.max() >= self.num_classes):
            bad = values[(values < 0) | (values >= self.num_classes)][0]
            raise DataError(
                f"mask holds class {bad}, but there are {self.num_classes} classes "
                f"(0..{self.num_classes - 1}) and ignore index {IGNORE_INDEX}."
            )
        counts = np.bincount(values, minlength=self.num_classes)
        self.counts += counts
        self.image_pixels[counts > 0] += values.size
        self.num_images += 1
        if self.locations is not None:
            self.locations.update(mask)
        return self

    def update_batch(self, masks):
        """Add a batch of masks (first axis = images)."""
        for mask in masks:
            self.update(mask)
        return self

    def merge(self, other):
        """Add another counter's totals (e.g. from a parallel pass)."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge counters with different numbers of classes")
        self.counts += other.counts
        self.image_pixels += other.image_pixels
        self.num_images += other.num_images
        return self

    @property
    def total(self):
        return int(self.counts.sum())

    @property
    def frequencies(self):
        """p_c = count_c / total valid pixels (zeros when nothing was counted)."""
        total = self.counts.sum()
        return self.counts / total if total else np.zeros(self.num_classes)


def _raw_weights(strategy, counts, image_pixels):
    """Unscaled weights; NaN for classes absent from the data (count 0)."""
    counts = np.asarray(counts, float)
    k = counts.size
    present = counts > 0
    p = counts / counts.sum() if counts.sum() else np.zeros(k)
    raw = np.full(k, np.nan)
    if not isinstance(strategy, str):
        return np.asarray(strategy, float).copy()
    if strategy == "none":
        return np.ones(k)
    pp = p[present]
    if strategy == "balanced":
        raw[present] = 1.0 / (k * pp)
    elif strategy == "inverse_frequency":
        raw[present] = 1.0 / pp
    elif strategy == "inverse_sqrt_frequency":
        raw[present] = 1.0 / np.sqrt(pp)
    elif strategy == "log":
        raw[present] = 1.0 / np.log(1.02 + pp)
    elif strategy == "median_frequency":
        if image_pixels is None:
            raise ValueError("median_frequency needs per-class image pixel totals (a ClassCounter)")
        freq = counts[present] / np.asarray(image_pixels, float)[present]
        raw[present] = np.median(freq) / freq if freq.size else freq
    else:
        raise ConfigError(
            f"loss.class_weights: unknown strategy {strategy!r}; "
            f"choose from {', '.join(STRATEGIES)}."
        )
    return raw


def scale_weights(raw, frequencies, max_weight=None):
    """Scale weights so `sum_c p_c w_c = 1`, then cap at `max_weight` keeping that invariant.

    NaN entries (absent classes of a strategy) become 1.0. Other classes with p_c = 0
    (absent classes of an explicit list) do not enter the sum but are scaled by the same
    factor as the uncapped classes, and capped like them.
    """
    w = np.asarray(raw, float).copy()
    p = np.asarray(frequencies, float)
    unknown = np.isnan(w)
    w[unknown] = 1.0
    if max_weight is not None and max_weight < 1:
        raise ConfigError(f"loss.max_weight: must be >= 1 (weights average 1), got {max_weight}.")
    mass = float(np.sum(p * w))
    if p.sum() == 0:
        return np.minimum(w, max_weight) if max_weight is not None else w
    if mass <= 0:
        raise ConfigError(
            "loss.class_weights: the weights of all classes present in the data are 0."
        )
    known = ~unknown  # every class with a weight of its own, present or not
    scaled = w.copy()
    scaled[known] = w[known] / mass
    if max_weight is None:
        return scaled
    capped = np.zeros_like(known)
    for _ in range(w.size):
        free = known & ~capped
        rest = 1.0 - max_weight * float(np.sum(p[capped]))
        free_mass = float(np.sum(p[free] * w[free]))
        if free_mass <= 0:
            break
        scaled[free] = w[free] * rest / free_mass
        over = free & (scaled > max_weight)
        if not over.any():
            break
        capped |= over
        scaled[capped] = max_weight
    return np.minimum(scaled, max_weight)


def _compute(strategy, counts, image_pixels=None, max_weight=None, class_names=None):
    counts = np.asarray(counts)
    counts = counts.astype(np.int64) if counts.dtype.kind in "iub" else counts.astype(np.float64)  # sampled: floats
    k = counts.size
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    if not isinstance(strategy, str):
        strategy = [float(w) for w in np.asarray(strategy, float).ravel()]
        if len(strategy) != k:
            raise ConfigError(f"loss.class_weights: expected {k} weights, got {len(strategy)}.")
    raw = _raw_weights(strategy, counts, image_pixels)
    p = counts / counts.sum() if counts.sum() else np.zeros(k)
    weights = scale_weights(raw, p, max_weight)
    messages = []
    if strategy != "none":
        for c in np.flatnonzero(counts == 0):
            messages.append(
                f"class {names[c]!r} has no pixels in the training set; its weight is "
                f"{weights[c]:g}."
            )
    return raw, weights, messages


def compute_class_weights(strategy, counts, image_pixels=None, max_weight=None, class_names=None):
    """Class weights scaled so `sum_c p_c w_c = 1`, optionally capped (see module doc).

    Args:
        strategy: a name in `STRATEGIES`, or K explicit weights (relative: all scaled by
            one factor, absent classes included; see module doc).
        counts: a `ClassCounter`, or K pixel counts.
        image_pixels: per-class totals of pixels of images holding the class (only for
            `median_frequency` with plain counts; taken from a `ClassCounter`).
        max_weight: cap >= 1, or None.
        class_names: names used in warnings.

    Returns:
        float64 array of K weights. Absent classes raise a `warnings.warn` each.
    """
    if isinstance(counts, ClassCounter):
        counts, image_pixels = counts.counts, counts.image_pixels
    _, weights, messages = _compute(strategy, counts, image_pixels, max_weight, class_names)
    for message in messages:
        warnings.warn(message, stacklevel=2)
    return weights


def _json_floats(values):
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(values, float)]


def sampled_counts(counter):
    """Expected pixels of each class per training crop under class-aware sampling, and expected valid pixels of
    the crops holding each class (`ClassLocations.expected_counts`); None without sampling."""
    locations = getattr(counter, "locations", None)
    return None if locations is None else locations.expected_counts()


def class_stats_dict(counter, class_names, strategy="none", max_weight=None, weights_from="sampled"):
    """JSON-ready class statistics and the weights of every strategy.

    `weights_from` picks the frequencies the strategies use: "data" (the training set's pixels) or "sampled"
    (the pixels expected in training crops under the counter's class-aware sampling; the same as "data"
    when the counter has none).

    Returns:
        `{"classes", "counts", "frequencies", "sampled_frequencies", "weights": {strategy: scaled weights, for
        every name in STRATEGIES}, "image_pixels", "num_images", "total_pixels", "strategy", "max_weight",
        "class_weights_from", "raw_weights", "class_weights", "warnings"}`, and with sampling "sampling"
        ({class: share}) and "sampled_counts" (expected pixels per crop), and with a pixel sample (`counter.pixels`)
        "normalization" (`segtrain.data.normalization`); `raw_weights` / `class_weights` are
        those of `strategy` (unscaled with null for absent classes / final), `warnings` the messages about
        absent classes, then the counter's own `warnings` (from the pass that filled it).
    """
    class_names = list(class_names)
    counts, image_pixels = counter.counts, counter.image_pixels
    sampled = sampled_counts(counter)
    if weights_from not in ("data", "sampled"):
        raise ConfigError(f"loss.class_weights_from: expected data or sampled, got {weights_from!r}.")
    if sampled is not None and weights_from == "sampled":
        counts, image_pixels = sampled
    raw, chosen, messages = _compute(
        strategy, counts, image_pixels, max_weight, class_names
    )
    table = {
        name: _json_floats(_compute(name, counts, image_pixels, max_weight)[1])
        for name in STRATEGIES
    }
    if sampled is None:
        sampled_frequencies = counter.frequencies
    else:
        total = sampled[0].sum()
        sampled_frequencies = sampled[0] / total if total else np.zeros(counter.num_classes)
    stats = {
        "classes": class_names,
        "counts": [int(c) for c in counter.counts],
        "frequencies": _json_floats(counter.frequencies),
        "sampled_frequencies": _json_floats(sampled_frequencies),
        "weights": table,
        "image_pixels": [int(c) for c in counter.image_pixels],
        "num_images": int(counter.num_images),
        "total_pixels": counter.total,
        "strategy": strategy if isinstance(strategy, str) else "explicit",
        "max_weight": None if max_weight is None else float(max_weight),
        "class_weights_from": weights_from,
        "raw_weights": _json_floats(raw),
        "class_weights": _json_floats(chosen),
        "warnings": messages + list(getattr(counter, "warnings", [])),
    }
    if sampled is not None:
        locations = counter.locations
        stats["sampling"] = {class_names[c]: s for c, s in zip(locations.classes, locations.shares)}
        stats["sampled_counts"] = _json_floats(sampled[0])
    if getattr(counter, "pixels", None) is not None:
        stats["normalization"] = counter.pixels.statistics()
    return stats


def format_stats_table(stats):
    """Aligned plain-text table of `class_stats_dict` output; the chosen strategy has a *."""
    headers = ["class", "pixels", "frequency"]
    sampling = "sampling" in stats  # the frequencies expected in training crops under data.sampling
    if sampling:
        headers.append("sampled")
    chosen = stats.get("strategy")
    columns = list(stats["weights"])
    headers += [name + ("*" if name == chosen else "") for name in columns]
    rows = []
    for i, name in enumerate(stats["classes"]):
        freq = stats["frequencies"][i]
        row = [name, str(stats["counts"][i]), "-" if freq is None else f"{freq:.6f}"]
        if sampling:
            sampled = stats["sampled_frequencies"][i]
            row.append("-" if sampled is None else f"{sampled:.6f}")
        for column in columns:
            w = stats["weights"][column][i]
            row.append("-" if w is None else f"{w:.4f}")
        rows.append(row)
    if chosen == "explicit":
        headers.append("explicit*")
        for row, w in zip(rows, stats["class_weights"]):
            row.append("-" if w is None else f"{w:.4f}")
    widths = [max(len(r[j]) for r in rows + [headers]) for j in range(len(headers))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    out = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    total = stats.get("total_pixels")
    if total is not None:
        out.append(f"{stats.get('num_images', 0)} images, {total} labelled pixels")
    if sampling:
        shares = ", ".join(f"{name} {share:g}" for name, share in stats["sampling"].items())
        source = "sampled" if stats.get("class_weights_from", "sampled") == "sampled" else "data"
        out.append(f"sampled: class frequencies expected in training crops under data.sampling ({shares}); "
                   f"weights from the {source} frequencies (loss.class_weights_from: {source})")
    norm = stats.get("normalization")
    if norm is not None and norm.get("method") == "dataset":
        out.append(f"normalization (data.normalize: dataset, {norm['pixels_sampled']} pixels sampled), per channel:")
        for key in ("low", "high", "mean", "std"):
            out.append(f"  {key:<4}  " + "  ".join(f"{v:9.3f}" for v in norm[key]))
    return "\n".join(out)
