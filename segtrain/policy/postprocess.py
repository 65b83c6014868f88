"""Post-processing of a label map, per class: remove small components, fill small holes.

Rules, for one class c with settings (min_size N, max_hole M), applied in this order:

1. remove: every connected component of c (8-connected: diagonal neighbours join, so a thin
   diagonal crack stays one piece) with fewer than N pixels takes, pixel by pixel, its
   `fallback` class: the pixel's next most probable class (`second_choice`; the other class
   when there are two);
2. fill: every hole of c, a connected region of pixels that are not c (4-connected, the
   dual of 8-connected components) that does not touch the image border, with fewer than M
   pixels becomes c.

N = 0 or M = 0 turns a step off. Classes are processed in index order, each on the result of
the ones before. Components and holes come from `scipy.ndimage.label`.

`segtrain tune` chooses N and M per class on a labelled split (`segtrain.policy.tuning`); `predict.min_size`
/ `predict.max_hole` set them by hand. Post-processing runs on whole images after the decision rule
(`segtrain.predict.Predictor.labels`); it is not inside an exported model (`segtrain.export` says so
in metadata.json).
"""

from __future__ import annotations

import numpy as np

EIGHT = np.ones((3, 3), dtype=bool)
FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def second_choice(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per pixel, the most probable class other than `labels` (the fallback of a removed pixel); probs (..., K),
    K >= 2 (a last axis of 1 is the foreground probability of two classes)."""
    probs = np.asarray(probs)
    if probs.shape[-1] <= 2:
        return (1 - np.asarray(labels)).astype(np.int64)
    masked = np.array(probs, dtype=np.float64, copy=True)
    np.put_along_axis(masked, np.asarray(labels, np.int64)[..., None], -np.inf, axis=-1)
    return np.argmax(masked, axis=-1)


def component_sizes(mask: np.ndarray, structure=EIGHT) -> np.ndarray:
    """For every pixel of `mask`, the size of its connected component (0 outside the mask)."""
    from scipy import ndimage

    ids, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return np.zeros(mask.shape, np.int64)
    sizes = np.bincount(ids.ravel())
    sizes[0] = 0
    return sizes[ids]


def hole_sizes(mask: np.ndarray) -> np.ndarray:
    """For every pixel outside `mask` in a hole of it (a 4-connected region of ~mask not touching the border),
    the hole's size; 0 elsewhere."""
    from scipy import ndimage

    ids, count = ndimage.label(~mask, structure=FOUR)
    if count == 0:
        return np.zeros(mask.shape, np.int64)
    sizes = np.bincount(ids.ravel())
    border = np.unique(np.concatenate([ids[0], ids[-1], ids[:, 0], ids[:, -1]]))
    sizes[border] = 0
    sizes[0] = 0
    return sizes[ids]


def remove_small(labels: np.ndarray, fallback: np.ndarray, cls: int, min_size: int) -> np.ndarray:
    """Components of class `cls` with fewer than `min_size` pixels take their fallback class (a new array)."""
    if min_size <= 0:
        return labels
    sizes = component_sizes(labels == cls)
    small = (sizes > 0) & (sizes < min_size)
    return np.where(small, fallback, labels)


def fill_holes(labels: np.ndarray, cls: int, max_hole: int) -> np.ndarray:
    """Holes of class `cls` with fewer than `max_hole` pixels become `cls` (a new array)."""
    if max_hole <= 0:
        return labels
    sizes = hole_sizes(labels == cls)
    small = (sizes > 0) & (sizes < max_hole)
    return np.where(small, cls, labels)


def postprocess(labels: np.ndarray, fallback: np.ndarray, settings: dict[int, tuple[int, int]]) -> np.ndarray:
    """Apply {class index: (min_size, max_hole)} in class order to an H x W label map (module docstring)."""
    out = np.asarray(labels)
    for cls in sorted(settings):
        min_size, max_hole = settings[cls]
        out = fill_holes(remove_small(out, fallback, cls, int(min_size)), cls, int(max_hole))
    return out
