"""The config's mask mapping: raw mask values (or colours) to class indices, and back.

Value masks are 8-bit or 16-bit (raw values 0..65535: class ids, or values such as 1000 mapped by
data.mask.values); predictions are written back as 8-bit PNG, or 16-bit PNG when a class's raw value
exceeds 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segtrain.config import MaskConfig
from segtrain.errors import DataError
from segtrain.labels import IGNORE_INDEX

_UNMAPPED = -2  # in the lookup table: a raw value the config does not cover
RAW_VALUES = 65536  # value masks hold 8-bit or 16-bit values


class MaskMapping:
    """Maps raw masks to class-index arrays (IGNORE_INDEX for ignored pixels) and encodes predictions back."""

    def __init__(self, mask: MaskConfig, classes: list[str]):
        self.classes = list(classes)
        self.num_classes = len(classes)
        self.rgb = mask.palette is not None
        self.ignore_values = [v for v in mask.ignore if isinstance(v, int)]
        self.ignore_colours = [tuple(v) for v in mask.ignore if isinstance(v, list)]
        if self.rgb:
            self.mode = "palette"
            self.colours = {tuple(mask.palette[name]): i for i, name in enumerate(self.classes)}
        else:
            table = np.full(RAW_VALUES, _UNMAPPED, dtype=np.int32)
            if mask.threshold is not None:
                self.mode = "threshold"
                values = np.arange(RAW_VALUES)
                table[:] = (values > mask.threshold).astype(np.int32)
            elif mask.values is not None:
                self.mode = "values"
                for raw, cls in mask.values.items():  # ranges checked by the config
                    table[raw] = cls
            else:
                self.mode = "identity"
                table[: self.num_classes] = np.arange(self.num_classes)
            for value in self.ignore_values:
                table[value] = IGNORE_INDEX
            self.table = table
        self.threshold = mask.threshold

    def describe(self) -> str:
        if self.mode == "palette":
            return "palette colours"
        if self.mode == "threshold":
            return f"threshold (value > {self.threshold} is class 1)"
        if self.mode == "values":
            covered = [int(v) for v in np.flatnonzero(self.table != _UNMAPPED)]
            return f"values {covered}"
        return f"values 0..{self.num_classes - 1} (identity; set data.mask.values or threshold otherwise)"

    def to_classes(self, raw: np.ndarray, source: Path | str = "mask") -> np.ndarray:
        """int32 H x W class indices; raises DataError naming the file and every value (colour) it holds that the
        config does not cover, with their pixel counts."""
        out, unmapped = self.classes_and_unmapped(raw, source)
        if unmapped:
            raise DataError(unmapped_message(self, {key: (count, source) for key, count in unmapped.items()},
                                             files=1, where=str(source)))
        return out

    def classes_and_unmapped(self, raw: np.ndarray, source: Path | str = "mask") -> tuple[np.ndarray, dict]:
        """(int32 H x W class indices, {raw value or (r, g, b) colour: pixels} of what the config does not cover).

        Uncovered pixels are IGNORE_INDEX in the class indices, so a pass can keep counting and report every
        uncovered value of a data set at once (`segtrain.data.scan.scan_pairs`)."""
        if self.rgb:
            if raw.ndim != 3:
                raise DataError(f"{source}: expected an RGB mask for data.mask.palette.")
            code = _colour_codes(raw)
            out = np.full(code.shape, _UNMAPPED, dtype=np.int32)
            for colour, cls in self.colours.items():
                out[code == _colour_code(colour)] = cls
            for colour in self.ignore_colours:
                out[code == _colour_code(colour)] = IGNORE_INDEX
            bad = out == _UNMAPPED
            if not bad.any():
                return out, {}
            codes, counts = np.unique(code[bad], return_counts=True)
            unmapped = {_code_colour(int(c)): int(n) for c, n in zip(codes, counts)}
        else:
            out = self.table[raw]
            bad = out == _UNMAPPED
            if not bad.any():
                return out, {}
            values, counts = np.unique(raw[bad], return_counts=True)
            unmapped = {int(v): int(n) for v, n in zip(values, counts)}
        out[bad] = IGNORE_INDEX
        return out, unmapped

    def encode(self, classes: np.ndarray) -> np.ndarray:
        """Class indices back to the training masks' encoding (uint8 H x W, uint16 when a class's raw value exceeds
        255, or uint8 H x W x 3 for palettes)."""
        classes = np.asarray(classes)
        if self.rgb:
            lut = np.zeros((self.num_classes, 3), dtype=np.uint8)
            for colour, cls in self.colours.items():
                lut[cls] = colour
            return lut[classes]
        lut = np.zeros(self.num_classes, dtype=np.int64)
        for cls in range(self.num_classes):
            raws = np.flatnonzero(self.table == cls)
            if raws.size == 0:
                raise DataError(f"class {self.classes[cls]!r} has no raw mask value to be written as; see data.mask.")
            # the smallest raw value of a class, but 255-like for a thresholded foreground (the largest 8-bit value
            # above the threshold, 65535-like for a threshold above 254)
            if self.mode == "threshold" and cls == 1:
                eight_bit = raws[raws <= 255]
                lut[cls] = eight_bit.max() if eight_bit.size else raws.max()
            else:
                lut[cls] = raws.min()
        return lut.astype(np.uint16 if lut.max() > 255 else np.uint8)[classes]


MAX_LISTED = 10
"""Uncovered values (colours) an error lists, the most frequent first."""


def _colour_codes(raw: np.ndarray) -> np.ndarray:
    return (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2].astype(np.int64)


def _colour_code(colour) -> int:
    return int(colour[0]) << 16 | int(colour[1]) << 8 | int(colour[2])


def _code_colour(code: int) -> tuple[int, int, int]:
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


class UnmappedTally:
    """Every raw value (colour) the config does not cover, over many masks: its total pixels and the first file
    (in the order added) holding it; `files` counts the masks holding any, `first` is the first of them."""

    def __init__(self):
        self.found: dict = {}
        self.files = 0
        self.first = None

    def add(self, unmapped: dict, source: Path | str) -> None:
        if not unmapped:
            return
        self.files += 1
        if self.first is None:
            self.first = source
        for key, count in unmapped.items():
            total, first = self.found.get(key, (0, source))
            self.found[key] = (total + count, first)

    def __bool__(self) -> bool:
        return bool(self.found)

    def error(self, mapping: MaskMapping, where: str) -> DataError:
        return DataError(unmapped_message(mapping, self.found, self.files, where))


def unmapped_message(mapping: MaskMapping, found: dict, files: int, where: str) -> str:
    """The error for values (colours) the config does not cover: `found` maps each to (pixels, a file holding it),
    `files` is how many masks hold any, `where` the file (one mask) or folder named first. At most MAX_LISTED are
    listed, the most pixels first, each with its pixels and a file; then how to cover them."""
    ranked = sorted(found.items(), key=lambda item: (-item[1][0], item[0]))
    kind = "colour" if mapping.rgb else "value"

    def shown(key) -> str:
        return f"({key[0]}, {key[1]}, {key[2]})" if mapping.rgb else str(key)

    total = sum(count for count, _ in found.values())
    head = ", ".join(shown(key) for key, _ in ranked[:MAX_LISTED]) + (" ..." if len(ranked) > MAX_LISTED else "")
    lines = [
        f"{where}: mask {kind}s {head} are not covered by data.mask ({mapping.describe()}).",
        f"{len(ranked)} {kind}{'s' if len(ranked) > 1 else ''}, {total} pixel{'s' if total > 1 else ''} in "
        f"{files} mask{'s' if files > 1 else ''}, the most pixels first:",
    ]
    for key, (count, source) in ranked[:MAX_LISTED]:
        lines.append(f"  {shown(key)}: {count} pixel{'s' if count > 1 else ''}, e.g. {source}")
    if len(ranked) > MAX_LISTED:
        rest = ranked[MAX_LISTED:]
        lines.append(f"  ... and {len(rest)} more ({sum(c for _, (c, _) in rest)} pixels)")
    if mapping.rgb:
        lines.append("Add each colour that is a class to data.mask.palette (class name: [r, g, b]), or list it in "
                     "data.mask.ignore (ignore: [[r, g, b], ...]) to leave its pixels out of the loss and the metrics. "
                     "Many rare colours usually mean anti-aliased or JPEG-saved masks: save the masks as PNG without "
                     "smoothing.")
    else:
        lines.append("Map each in data.mask.values (raw value: class index), use data.mask.threshold for soft 0..255 "
                     "masks, or list them in data.mask.ignore (ignore: [255]) to leave their pixels out of the loss "
                     "and the metrics.")
    return "\n".join(lines)
