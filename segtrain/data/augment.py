"""Random training augmentations as pure TensorFlow functions, one per transform, each keyed by a stateless seed.

Every function takes a stateless seed (a shape [2] int64 tensor) and is a pure function of its inputs and that
seed, so the pipeline (`segtrain.data.pipeline.augment`) derives one seed per transform from the element's
(seed, element index) with `tf.random.experimental.stateless_fold_in` and a resumed run sees exactly the same
augmented data. Images are float32 H x W x C in the 0..255 range of 8-bit data (`segtrain.data.images`); masks
are int32 H x W class indices with IGNORE_INDEX for pixels that count nowhere.

Geometric transforms (`random_scale`, `random_rotate`, `random_elastic`) move image and mask by the same map: the
image is sampled bilinearly (coordinates clamped to the image, so the border pixels are repeated where the map
leaves it), the mask by nearest neighbour, and mask pixels whose nearest source pixel lies outside the input
become IGNORE_INDEX, never a class. Photometric transforms (brightness, contrast, gamma, blur, noise) change the
image only.
"""

from __future__ import annotations

import math

import tensorflow as tf

from segtrain.labels import IGNORE_INDEX

# fold_in keys of each transform's own random stream (the class-aware sampling draw uses 1)
SCALE_STREAM = 2
ROTATE_STREAM = 3
ELASTIC_STREAM = 4
BRIGHTNESS_STREAM = 5
CONTRAST_STREAM = 6
GAMMA_STREAM = 7
BLUR_STREAM = 8
NOISE_STREAM = 9


def stream_seed(seed, stream: int):
    """The seed of one transform's stream, from the element's seed."""
    return tf.cast(tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), stream), tf.int64)


def _uniform(seed, low: float, high: float):
    return tf.random.stateless_uniform([], seed, low, high, dtype=tf.float32)


# ---------------------------------------------------------------------------- photometric (image only)


def random_brightness(image, seed, delta: float):
    """Add one offset, uniform in [-delta * 255, delta * 255], to every pixel (`brightness: 0.1` is +-10% of 0..255)."""
    return image + _uniform(seed, -delta, delta) * 255.0


def random_contrast(image, seed, amount: float):
    """Scale each channel's deviation from its mean by a factor uniform in [1 - amount, 1 + amount]."""
    factor = _uniform(seed, 1.0 - amount, 1.0 + amount)
    mean = tf.reduce_mean(image, axis=[0, 1], keepdims=True)
    return mean + factor * (image - mean)


def random_gamma(image, seed, amount: float):
    """x -> 255 * (x / 255) ** g with log(g) uniform in [-log(1 + amount), log(1 + amount)] (`gamma: 0.2`: g in
    [1/1.2, 1.2]); values <= 0 are left as they are."""
    bound = math.log1p(amount)
    gamma = tf.exp(_uniform(seed, -bound, bound))
    positive = tf.maximum(image, 1e-12) / 255.0
    return tf.where(image > 0, 255.0 * tf.pow(positive, gamma), image)


def random_noise(image, seed, std: float):
    """Add independent Gaussian noise of standard deviation `std` (8-bit units) to every pixel and channel."""
    return image + std * tf.random.stateless_normal(tf.shape(image), seed, dtype=image.dtype)


def _gaussian_kernel(sigma, radius: int):
    """A normalised 1-D Gaussian of 2 * radius + 1 taps; sigma near 0 gives the identity (a single 1)."""
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigma = tf.maximum(tf.cast(sigma, tf.float32), 1e-3)
    kernel = tf.exp(-0.5 * tf.square(taps / sigma))
    return kernel / tf.reduce_sum(kernel)


def _smooth(x, kernel, radius: int, normalise: bool = True):
    """Separable convolution of H x W x C `x` by `kernel` (zero padding; with `normalise`, divided by the kernel
    mass inside the image, so the borders keep their level)."""
    channels = tf.shape(x)[-1]
    size = 2 * radius + 1
    vertical = tf.tile(tf.reshape(kernel, [size, 1, 1, 1]), [1, 1, channels, 1])
    horizontal = tf.tile(tf.reshape(kernel, [1, size, 1, 1]), [1, 1, channels, 1])

    def conv(t):
        t = tf.nn.depthwise_conv2d(t[None], vertical, [1, 1, 1, 1], "SAME")
        return tf.nn.depthwise_conv2d(t, horizontal, [1, 1, 1, 1], "SAME")[0]

    out = conv(x)
    if normalise:
        out = out / conv(tf.ones_like(x))
    return out


def blur_radius(sigma_max: float) -> int:
    """Half-width of the blur kernel for sigmas up to `sigma_max` (3 sigma)."""
    return max(1, int(math.ceil(3.0 * sigma_max)))


def random_blur(image, seed, sigma_low: float, sigma_high: float):
    """Gaussian blur with a sigma (pixels) uniform in [sigma_low, sigma_high]; the borders are normalised, not
    darkened. Sigma 0 leaves the image as it is."""
    sigma = _uniform(seed, sigma_low, sigma_high)
    radius = blur_radius(sigma_high)
    return _smooth(image, _gaussian_kernel(sigma, radius), radius)


# ---------------------------------------------------------------------------- geometric (image and mask)


def random_scale(image, mask, seed, low: float, high: float):
    """Zoom by a factor s, log-uniform in [low, high]: H x W -> round(H * s) x round(W * s) (at least 1), the image
    bilinearly, the mask by nearest neighbour (so ignored pixels stay ignored). s < 1 zooms out: a crop taken
    afterwards pads what the image no longer covers with IGNORE_INDEX."""
    factor = tf.exp(_uniform(seed, math.log(low), math.log(high)))
    shape = tf.cast(tf.shape(mask), tf.float32)
    size = tf.maximum(tf.cast(tf.round(shape * factor), tf.int32), 1)
    image = tf.image.resize(image, size, method="bilinear")
    mask = tf.cast(tf.image.resize(tf.cast(mask[..., None], tf.float32), size, method="nearest")[..., 0], tf.int32)
    return image, mask


def _projective(x, transform, interpolation: str, fill_mode: str, fill_value: float):
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=transform[None], output_shape=tf.shape(x)[:2],
        fill_value=tf.constant(fill_value, tf.float32), interpolation=interpolation, fill_mode=fill_mode,
    )
    return out[0]


def random_rotate(image, mask, seed, max_degrees: float):
    """`rotate` by an angle uniform in [-max_degrees, max_degrees]."""
    return rotate(image, mask, _uniform(seed, -max_degrees, max_degrees))


def rotate(image, mask, degrees):
    """Rotate about the centre by `degrees`, keeping the size: the image bilinearly (border pixels repeated where
    the rotated frame leaves it), the mask by nearest neighbour, and the mask pixels the rotation uncovers (the
    corners) become IGNORE_INDEX.

    Output pixel (y, x) reads the input at (sin a (x - cx) + cos a (y - cy) + cy, cos a (x - cx) - sin a (y - cy)
    + cx), (cy, cx) the centre.
    """
    angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    shape = tf.cast(tf.shape(mask), tf.float32)
    cy, cx = (shape[0] - 1.0) / 2.0, (shape[1] - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    # output (x, y) reads input (cos*(x-cx) - sin*(y-cy) + cx, sin*(x-cx) + cos*(y-cy) + cy)
    transform = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])
    image = _projective(image, transform, "BILINEAR", "NEAREST", 0.0)
    moved = _projective(tf.cast(mask[..., None], tf.float32), transform, "NEAREST", "CONSTANT", float(IGNORE_INDEX))
    return image, tf.cast(tf.round(moved[..., 0]), tf.int32)


def sample(image, mask, rows, cols):
    """Image and mask read at the H x W float source coordinates (rows, cols): the image bilinearly with the
    coordinates clamped to the image, the mask at the nearest pixel, IGNORE_INDEX where that lies outside."""
    shape = tf.shape(mask)
    h, w = shape[0], shape[1]
    r = tf.clip_by_value(rows, 0.0, tf.cast(h - 1, tf.float32))
    c = tf.clip_by_value(cols, 0.0, tf.cast(w - 1, tf.float32))
    r0, c0 = tf.floor(r), tf.floor(c)
    fr, fc = (r - r0)[..., None], (c - c0)[..., None]
    r0, c0 = tf.cast(r0, tf.int32), tf.cast(c0, tf.int32)
    r1, c1 = tf.minimum(r0 + 1, h - 1), tf.minimum(c0 + 1, w - 1)

    def at(rr, cc):
        return tf.gather_nd(image, tf.stack([rr, cc], axis=-1))

    top = at(r0, c0) * (1.0 - fc) + at(r0, c1) * fc
    bottom = at(r1, c0) * (1.0 - fc) + at(r1, c1) * fc
    out_image = top * (1.0 - fr) + bottom * fr
    rn = tf.cast(tf.floor(rows + 0.5), tf.int32)
    cn = tf.cast(tf.floor(cols + 0.5), tf.int32)
    inside = (rn >= 0) & (rn < h) & (cn >= 0) & (cn < w)
    picked = tf.gather_nd(mask, tf.stack([tf.clip_by_value(rn, 0, h - 1), tf.clip_by_value(cn, 0, w - 1)], axis=-1))
    return out_image, tf.where(inside, picked, tf.constant(IGNORE_INDEX, mask.dtype))


def random_elastic(image, mask, seed, alpha: float, sigma: float):
    """Elastic deformation: one smooth random displacement field moves image and mask (`sample`).

    The field is white Gaussian noise smoothed by a Gaussian of `sigma` pixels (the size of the wobbles) and
    scaled so that each component's standard deviation is `alpha` pixels (how far pixels move). Mask pixels
    whose source lies outside the image become IGNORE_INDEX.
    """
    shape = tf.shape(mask)
    radius = blur_radius(sigma)
    kernel = _gaussian_kernel(sigma, radius)
    noise = tf.random.stateless_normal(tf.concat([shape, [2]], 0), seed, dtype=tf.float32)
    # the smoothed unit noise has standard deviation sum(kernel**2) (the 2-D kernel is kernel x kernel)
    field = _smooth(noise, kernel, radius, normalise=False) * (alpha / tf.reduce_sum(tf.square(kernel)))
    rows, cols = tf.meshgrid(tf.range(shape[0]), tf.range(shape[1]), indexing="ij")
    rows = tf.cast(rows, tf.float32) + field[..., 0]
    cols = tf.cast(cols, tf.float32) + field[..., 1]
    return sample(image, mask, rows, cols)
