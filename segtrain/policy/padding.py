"""One padding rule for NumPy prediction and the exported TensorFlow graph.

Each padded axis is extended at its END (bottom/right) to a multiple of `divisor`:

    a side of 1 that needs a pad is first doubled (its pixel repeated: it cannot be reflected);
    then repeat { p = min(remaining, size - 1); reflect-pad by p } until remaining == 0.

Worked example, a row [a, b, c] padded to 8: reflect by min(5, 2) = 2 -> [a b c b a], then by min(3, 4) = 3
-> [a b c b a b c b]. A pad smaller than the side (the usual case) is a single step, exactly
np.pad(mode="reflect"); a larger one is several steps that each satisfy tf.pad's REFLECT limit (pad < size).
np.pad's own large-pad reflect gives the same values (tests/test_policy_padding.py checks it), but
`pad_to_multiple_np` spells the rule out so NumPy and TensorFlow agree by construction.
"""

from __future__ import annotations

import numpy as np


def padded_size(n: int, divisor: int) -> int:
    """`n` rounded up to a multiple of `divisor`."""
    _check_divisor(divisor)
    return -(-n // divisor) * divisor


def reflect_steps(divisor: int) -> int:
    """Reflect steps that pad any side to a multiple of `divisor`: ceil(log2(divisor)) (see pad_to_multiple_tf)."""
    _check_divisor(divisor)
    return (divisor - 1).bit_length()


def pad_to_multiple_np(image: np.ndarray, divisor: int, axes=(0, 1)) -> np.ndarray:
    """`image` padded at the end of each of `axes` to a multiple of `divisor` by the module's rule."""
    x = np.asarray(image)
    for axis in axes:
        size = x.shape[axis]
        remaining = padded_size(size, divisor) - size
        if size == 1 and remaining:
            x = np.pad(x, _end_widths(x.ndim, axis, 1), mode="symmetric")  # the pixel repeated
            remaining -= 1
        while remaining:
            p = min(remaining, x.shape[axis] - 1)
            x = np.pad(x, _end_widths(x.ndim, axis, p), mode="reflect")  # p < size: a plain reflection
            remaining -= p
    return x


def pad_to_multiple_tf(x, divisor: int, axes=(1, 2)):
    """The module's rule in TensorFlow for sizes along `axes` unknown at trace time (static rank needed).

    Per axis: one SYMMETRIC pad by a computed 0 or 1 (doubles a 1-px side), then `reflect_steps(divisor)`
    unrolled REFLECT pads by min(remaining, size - 1), possibly 0: no tf.cond or tf.while_loop, so tf2onnx
    and the TFLite converter accept the graph.

    Enough steps: after the first pad, size s >= 2 and remaining r <= divisor - 1. A step with r > s - 1 pads
    s - 1, so s - 1 doubles; hence k steps either finish or add (s - 1)(2**k - 1) >= 2**k - 1 pixels, which is
    >= divisor - 1 >= r for k = ceil(log2(divisor)). E.g. divisor 16, side 2: pads 1, 2, 4, 7 -> 16.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    rank, channels = x.shape.rank, x.shape[-1]
    axes = [axis % rank for axis in axes]
    steps = reflect_steps(divisor)
    for axis in axes:
        size = tf.shape(x)[axis]
        remaining = (divisor - size % divisor) % divisor  # non-negative operands: ONNX's Mod differs on negatives
        grow = tf.cast(tf.logical_and(tf.equal(size, 1), remaining > 0), tf.int32)
        x = tf.pad(x, _end_widths(rank, axis, grow), mode="SYMMETRIC")
        remaining -= grow
        for _ in range(steps):
            p = tf.minimum(remaining, tf.shape(x)[axis] - 1)
            x = tf.pad(x, _end_widths(rank, axis, p), mode="REFLECT")
            remaining -= p
    if channels is not None and rank - 1 not in axes:
        # a pad by computed amounts forgets the channel count; TFLite's converter needs it
        x = tf.reshape(x, tf.concat([tf.shape(x)[:-1], [channels]], 0))
    return x


def _end_widths(rank: int, axis: int, amount) -> list:
    widths = [[0, 0] for _ in range(rank)]
    widths[axis] = [0, amount]
    return widths


def _check_divisor(divisor: int) -> None:
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
