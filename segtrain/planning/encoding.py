"""The mask encoding: how a data set's raw mask values become classes, decided from the raw-mask pass (`raw.py`).

`ignore_values` picks the raw values to ignore, `mask_encoding` how the others map to classes (an `Encoding`),
`class_names` names the classes and `mask_section` writes all three as the config's `data.mask` section. Each rule
returns a `Decision`, the type every rule of the plan returns: the value that goes into the config and the fact it
came from (`reason`, the value's one-line comment), plus `notes` for things the user should look at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from segtrain.errors import ConfigError, DataError
from segtrain.planning.raw import MAX_COLOURS, RawMasks, describe_raw


@dataclass
class Decision:
    """A chosen value, the fact it follows from (one line) and anything the user should check."""

    value: Any
    reason: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Encoding:
    """How raw mask values become classes: mode threshold | values | identity | palette.

    `sources[i]` is the raw value(s) or colour class i comes from (a class name is built from it).
    """

    mode: str
    num_classes: int
    threshold: Optional[int] = None
    values: Optional[dict] = None
    colours: Optional[list] = None
    sources: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "num_classes": self.num_classes, "threshold": self.threshold,
                "values": None if self.values is None else {str(k): v for k, v in self.values.items()},
                "colours": None if self.colours is None else [list(c) for c in self.colours],
                "sources": [describe_raw(s) for s in self.sources]}


VOID_SHARE = 0.05
"""A raw value holding fewer pixels than this, far from the other values, may mark void (`ignore_values`)."""
VOID_GAP = 64
"""'Far': at least this far from every other value (and > 4 x the largest gap between them)."""
CLASS_ID_LIMIT = 64
"""Masks whose values all lie below this hold class ids."""
SOFT_VALUES = 16
"""More distinct values than this (and not class ids) are a soft or anti-aliased binary mask."""


def pct(share: float) -> str:
    """A share as a short percentage: 22.0%, 1.6%, 0.04%."""
    if share == 0:
        return "0%"
    if share < 0.001:
        return f"{100 * share:.2g}%"
    return f"{100 * share:.1f}%"


def _key(value, raw: RawMasks):
    """--ignore's value as a RawMasks key (an int, or an (r, g, b) tuple), checked against the masks' kind."""
    if isinstance(value, (list, tuple)):
        if raw.kind != "colours":
            raise ConfigError(f"--ignore {','.join(map(str, value))}: the masks hold single values, not colours; "
                              "give one value, e.g. --ignore 255.")
        return tuple(int(c) for c in value)
    if raw.kind == "colours":
        raise ConfigError(f"--ignore {value}: the masks are RGB colours; give a colour as R,G,B, "
                          "e.g. --ignore 255,255,255.")
    return int(value)


def _void_value(raw: RawMasks, values: list) -> Optional[int]:
    """The largest sample value (255 in 8-bit masks, 65535 in 16-bit ones) beside >= 2 small class ids, else None."""
    top = 2**raw.bits - 1
    others = [v for v in values if v != top]
    if top in values and len(others) >= 2 and max(others) < CLASS_ID_LIMIT:
        return top
    return None


def ignore_values(raw: RawMasks, requested: Optional[list] = None) -> Decision:
    """Raw values (or colours) to ignore: those given by `--ignore`, and the sample type's largest value (255) when
    the other values are small class ids (the usual 'void' label, as in Pascal VOC). A rare value far from all the
    others only gets a note: it may be void, or a rare foreground (CrackForest's cracks are 1.6% of 0/255 masks)."""
    ignored, reasons, notes = [], [], []
    for value in requested or []:
        key = _key(value, raw)
        if key not in raw.counts:
            notes.append(f"--ignore {describe_raw(key)}: no train mask holds this value.")
        ignored.append(key)
        reasons.append(f"--ignore {describe_raw(key)} ({pct(raw.share(key))} of train pixels)")
    if raw.kind == "values":
        rest = sorted(v for v in raw.counts if v not in ignored)
        void = _void_value(raw, rest)
        if void is not None:
            ids = [v for v in rest if v != void]
            ignored.append(void)
            reasons.append(f"{void} ({pct(raw.share(void))} of pixels) beside class ids {ids[0]}..{ids[-1]} looks "
                           f"like void: ignored (map it in mask.values to learn it as a class)")
            rest.remove(void)
        if len(rest) <= SOFT_VALUES:
            for value in rest:
                others = [v for v in rest if v != value]
                if len(others) < 2 or raw.share(value) >= VOID_SHARE:  # ignoring it would leave one class
                    continue
                gap = min(abs(value - v) for v in others)
                spread = max(np.diff(others).max(initial=0), 1)
                if gap >= VOID_GAP and (len(others) < 2 or gap > 4 * spread):
                    notes.append(f"value {value} holds only {pct(raw.share(value))} of the pixels, far from the "
                                 f"other values ({', '.join(map(str, others))}): if it marks void (unlabelled) pixels, "
                                 f"plan again with --ignore {value}.")
    reason = "; ".join(reasons) if reasons else "no value ignored"
    return Decision(ignored, reason, notes)


def mask_encoding(raw: RawMasks, ignored: list) -> Decision:
    """How raw mask values become classes (ignored values left out):

    - RGB colour masks: a palette, one class per colour (black, else the most frequent colour, is class 0).
    - Two values a < b: the clear minority (< 40% of pixels) is the foreground: `threshold: (a + b) // 2` when it is
      b (0/255 masks: 127), `values: {a: 1, b: 0}` when it is a (ISBI membranes: 0 is the membrane); 0/1 masks
      are class ids.
    - Values below 64 (class ids): identity when they are 0..K-1, else `values` renumbering them in order.
    - More than 16 distinct values (soft masks, e.g. EPFL roads' 0..237) or two end values holding 90% of the pixels
      with every value between them under 1% (anti-aliased): `threshold` at half the sample scale (127, 32767 for
      16-bit masks), or at the middle of the values' range when they never exceed it.
    - Anything else (a few discrete values such as 0/128/255): `values`, one class per value in value order.
    """
    keys = [k for k in raw.counts if k not in ignored]
    labelled = sum(raw.counts[k] for k in keys)
    share = {k: raw.counts[k] / labelled for k in keys} if labelled else {}
    if not keys:
        raise DataError("every mask pixel of the split is ignored: there is nothing to learn. Check --ignore.")
    if len(keys) == 1:
        raise DataError(f"every labelled mask pixel holds {describe_raw(keys[0])}: there is only one class. Check the "
                        "masks (a foreground saved as another file type or another folder?).")
    if raw.kind == "colours":
        return _palette(keys, share)
    values = sorted(keys)
    listing = ", ".join(f"{v} ({pct(share[v])})" for v in values[:6]) + (" ..." if len(values) > 6 else "")
    if len(values) == 2:
        a, b = values
        if share[a] < 0.4:
            return Decision(Encoding("values", 2, values={a: 1, b: 0}, sources=[b, a]),
                            f"two mask values: {a} ({pct(share[a])}) is the minority, so the foreground; "
                            f"{b} ({pct(share[b])}) the background")
        if (a, b) == (0, 1):
            return Decision(Encoding("identity", 2, sources=[0, 1]), f"two mask values {listing}: class ids (identity)")
        threshold = (a + b) // 2
        notes = []
        if share[b] > 0.6:
            notes.append(f"the foreground (value {b}) is the majority ({pct(share[b])}); if {a} is the foreground, "
                         f"use mask.values: {{{a}: 1, {b}: 0}}.")
        return Decision(Encoding("threshold", 2, threshold=threshold, sources=[a, b]),
                        f"two mask values {listing}: value > {threshold} is the foreground", notes)
    if values[-1] < CLASS_ID_LIMIT:
        if values == list(range(len(values))):
            return Decision(Encoding("identity", len(values), sources=values),
                            f"mask values 0..{values[-1]} are class ids: identity, {len(values)} classes")
        return Decision(Encoding("values", len(values), values={v: i for i, v in enumerate(values)}, sources=values),
                        f"mask values {', '.join(map(str, values))} are class ids, renumbered 0..{len(values) - 1}")
    lo, hi = values[0], values[-1]
    ends = share[lo] + share[hi]
    anti_aliased = ends >= 0.9 and all(share[v] < 0.01 for v in values[1:-1])
    if len(values) > SOFT_VALUES or anti_aliased:
        scale = 2**raw.bits - 1
        half = scale // 2
        threshold = half if hi > half else (lo + hi) // 2
        where = f"half the {raw.bits}-bit scale" if threshold == half else "the middle of the values' range"
        above = sum(share[v] for v in values if v > threshold)
        notes = []
        if above > 0.6:
            notes.append(f"values above {threshold} are the majority ({pct(above)}); if the foreground is dark, map "
                         "the values with mask.values instead.")
        return Decision(Encoding("threshold", 2, threshold=threshold, sources=[f"<={threshold}", f">{threshold}"]),
                        f"{len(values)} distinct values {lo}..{hi}, {pct(ends)} of pixels at the two ends: soft "
                        f"masks; value > {threshold} ({where}) is the foreground, {pct(above)} of pixels", notes)
    return Decision(Encoding("values", len(values), values={v: i for i, v in enumerate(values)}, sources=values),
                    f"{len(values)} discrete mask values {listing}: one class each, in value order")


def _palette(colours: list, share: dict) -> Decision:
    if len(colours) > MAX_COLOURS:
        raise DataError(f"the RGB masks hold {len(colours)} colours (more than {MAX_COLOURS}), which is no class "
                        "palette (JPEG or anti-aliased masks?). Save masks as PNG class values or with one exact "
                        "colour per class.")
    first = (0, 0, 0) if (0, 0, 0) in colours else max(colours, key=lambda c: share[c])
    order = [first] + sorted((c for c in colours if c != first), key=lambda c: (-share[c], c))
    listing = ", ".join(f"{describe_raw(c)} {pct(share[c])}" for c in order[:3]) + (" ..." if len(order) > 3 else "")
    return Decision(Encoding("palette", len(order), colours=order, sources=order),
                    f"RGB masks with {len(order)} colours: a palette, one class per colour ({listing}); class 0 is "
                    f"{'black' if first == (0, 0, 0) else 'the most frequent colour'}")


def class_names(encoding: Encoding) -> Decision:
    """background, foreground for two classes; class_<raw value> (class_<rrggbb> for colours) otherwise."""
    if encoding.num_classes == 2:
        return Decision(["background", "foreground"], "two classes; rename freely (names label metrics and files)")
    names = []
    for source in encoding.sources:
        if isinstance(source, tuple):
            names.append("class_" + "".join(f"{c:02x}" for c in source))
        else:
            names.append(f"class_{source}")
    kind = "colour" if encoding.mode == "palette" else "value"
    return Decision(names, f"{len(names)} classes named by their raw {kind}; rename freely (names label metrics "
                           "and files)")


def mask_section(encoding: Encoding, names: list, ignored: list) -> dict:
    """The data.mask section (MaskConfig's fields) for an encoding, its class names and the ignored values."""
    section: dict = {}
    if encoding.mode == "threshold":
        section["threshold"] = encoding.threshold
    elif encoding.mode == "values":
        section["values"] = dict(sorted(encoding.values.items()))
    elif encoding.mode == "palette":
        section["palette"] = {name: list(colour) for name, colour in zip(names, encoding.colours)}
    if ignored:
        section["ignore"] = [list(v) if isinstance(v, tuple) else v for v in ignored]
    return section
