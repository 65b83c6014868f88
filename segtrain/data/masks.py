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
        """int32 H x W class indices; raises DataError naming the file if a value is not covered."""
        if self.rgb:
            if raw.ndim != 3:
                raise DataError(f"{source}: expected an RGB mask for data.mask.palette.")
            code = (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
            out = np.full(code.shape, _UNMAPPED, dtype=np.int32)
            for colour, cls in self.colours.items():
                out[code == (colour[0] << 16 | colour[1] << 8 | colour[2])] = cls
            for colour in self.ignore_colours:
                out[code == (colour[0] << 16 | colour[1] << 8 | colour[2])] = IGNORE_INDEX
            bad = out == _UNMAPPED
            if bad.any():
                y, x = np.argwhere(bad)[0]
                raise DataError(
                    f"{source}: colour {tuple(int(c) for c in raw[y, x])} at row {y}, column {x} is in no "
                    "data.mask.palette entry. Add it to the palette or to data.mask.ignore."
                )
            return out
        out = self.table[raw]
        if (out == _UNMAPPED).any():
            unmapped = sorted(int(v) for v in np.unique(raw[out == _UNMAPPED]))
            shown = ", ".join(map(str, unmapped[:10])) + (" ..." if len(unmapped) > 10 else "")
            raise DataError(
                f"{source}: mask values {shown} are not covered by data.mask ({self.describe()}). "
                "Map them in data.mask.values, use data.mask.threshold, or list them in data.mask.ignore."
            )
        return out

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
